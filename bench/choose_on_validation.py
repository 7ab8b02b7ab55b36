"""Choose an expert-training setting per run on validation, then read its test numbers.

`bench/experts.py --set …` reruns the experts of a run directory with another setting (say a lower
`experts.branch_learning_rate`); the generalist, clusters and router stay the same. This script
compares such variants the way a user may: for each run (data set, size, seed) found in every
results folder, it scores each variant on **validation only** — the routed validation NLL with each
cluster's validation records sent to that cluster's adapter (the kept expert, else the generalist),
weighted by the clusters' validation sizes — picks the lowest (the first folder on a tie), and only then reads that variant's
test routed − single. It prints a Markdown table per run and the chosen variant's routed − single
over runs (paired bootstrap over test records, seeds averaged per record; t-interval over runs).

    python bench/choose_on_validation.py bench/results/experts bench/results/experts-branchlr
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from plot_experts import load, paired_bootstrap, seed_interval


def routed_validation_nll(arm: dict) -> float:
    """Validation NLL of the routed arm by cluster: each expert's best validation loss if it was kept,
    else the generalist's loss on that cluster's validation records (`initial_eval_loss`)."""
    experts = arm["experts"].values()
    losses = [e["best_eval_loss"] if e["kept"] else e["initial_eval_loss"] for e in experts]
    sizes = [e["validation_samples"] for e in experts]
    return float(np.average(losses, weights=sizes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "folders", type=Path, nargs="+", help="results folders of bench/experts.py, the default setting first"
    )
    args = parser.parse_args()
    variants = {folder.name: load(folder) for folder in args.folders}
    common = set.intersection(
        *({(key, seed) for key, seeds in runs.items() for seed in seeds} for runs in variants.values())
    )
    print(
        "| run | "
        + " | ".join(f"{name}: validation NLL / kept / test routed − single" for name in variants)
        + " | chosen on validation |"
    )
    print("|---|" + "---|" * len(variants) + "---|")
    chosen_differences: dict = {}
    for (dataset, per_label), seed in sorted(common):
        cells, scores = [], {}
        for name, runs in variants.items():
            result = runs[(dataset, per_label)][seed]["arms"]
            scores[name] = routed_validation_nll(result["routed"])
            difference = np.array(result["routed"]["per_record_nll"]) - np.array(result["single"]["per_record_nll"])
            kept = sum(e["kept"] for e in result["routed"]["experts"].values())
            cells.append(
                f"{scores[name]:.4f} / {kept} of {len(result['routed']['experts'])} / {difference.mean():+.4f}"
            )
        best = min(scores, key=scores.get)
        result = variants[best][(dataset, per_label)][seed]["arms"]
        chosen_differences.setdefault((dataset, per_label), []).append(
            np.array(result["routed"]["per_record_nll"]) - np.array(result["single"]["per_record_nll"])
        )
        print(f"| {dataset} {per_label}/label seed {seed} | " + " | ".join(cells) + f" | {best} |")
    print()
    for (dataset, per_label), per_seed in sorted(chosen_differences.items()):
        mean, low, high = paired_bootstrap(np.mean(per_seed, axis=0))
        spread = f"; {seed_interval([float(d.mean()) for d in per_seed])}" if len(per_seed) > 1 else ""
        print(
            f"- {dataset}, {per_label} per label, {len(per_seed)} run(s), setting chosen on validation per run: routed − single "
            f"**{mean:+.4f}** (95 % CI over test records {low:+.4f} … {high:+.4f}){spread}"
        )


if __name__ == "__main__":
    main()
