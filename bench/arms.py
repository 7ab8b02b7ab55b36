"""The arms table of bench/experts.py as a reviewer reads it: routed against the best single adapter, seeds paired.

For each data set and size, every seed is one run in which every arm was trained on the same data
sample. Per run, the single adapter of record is whichever of `single` (the early-stopped generalist)
and `single-continued` (the generalist continued with the experts' annealed schedule) has the lower
validation NLL — chosen before the test split is read. Then, per arm and over seeds:

- test NLL (mean ± std over seeds), validation NLL, experts kept / blended / fallen back, the share
  of test prompts the generalist served, and compute (optimizer steps, tokens and training seconds
  with the generalist each arm branched from, plus the gradient pass for gradient-clustered arms);
- paired differences (routed − best single, routed − random-clusters, and each other arm against
  the best single) with three intervals: the t-interval over seeds (how much a whole run moves it),
  the bootstrap over test records with seeds averaged per record, and the two-level bootstrap over
  seeds and then records within each seed;
- a what-if, on the runs whose result records which adapter served each test record: routed with
  every prompt it gave the generalist served instead by the single adapter of record. Keep decisions
  and blends stay as they were made (against the generalist), so this moves only the fall-back
  records; it is an estimate of that protocol change, not a run of it.

Writes `arms.md` and `arms.json` in `--out` and prints the Markdown.

    python bench/arms.py --results bench/results/experts-v2 --out bench/results
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
from plot_experts import load, mean_std, paired_bootstrap

ARMS = ["single", "single-continued", "best-single", "routed", "random-clusters", "oracle", "gradient-oracle"]
GENERALIST_ADAPTER = "single__0"
FALLBACK_WHAT_IF = "routed-falling-back-to-best-single"  # not an arm that ran: see the module docstring


def best_single(arms: dict) -> str:
    """The single adapter of record: the lower validation NLL of `single` and `single-continued` (a tie keeps `single`)."""
    candidates = [a for a in ("single", "single-continued") if a in arms]
    return min(candidates, key=lambda a: (arms[a]["validation_nll"], a != "single"))


def with_best_single(run: dict) -> dict:
    """The run's arms plus `best-single`, the arm chosen on validation, and the fall-back what-if where it can be computed."""
    arms = dict(run["arms"])
    arms["best-single"] = {**arms[best_single(arms)], "chosen": best_single(arms)}
    routed = arms.get("routed")
    if routed and "per_record_adapter" in routed:
        arms[FALLBACK_WHAT_IF] = {
            "per_record_nll": [
                record if adapter == GENERALIST_ADAPTER else own
                for own, record, adapter in zip(
                    routed["per_record_nll"], arms["best-single"]["per_record_nll"], routed["per_record_adapter"]
                )
            ]
        }
    return arms


def t_interval(values: list[float]) -> tuple[float, float]:
    from scipy import stats

    if len(values) < 2:
        return float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return statistics.mean(values) - half, statistics.mean(values) + half


def two_level_bootstrap(differences: np.ndarray, samples: int = 4000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of the mean of [seeds, records] paired differences, resampling seeds, then records within each."""
    rng = np.random.default_rng(seed)
    runs, records = differences.shape
    chosen_runs = rng.integers(0, runs, size=(samples, runs, 1))
    chosen_records = rng.integers(0, records, size=(samples, runs, records))
    means = differences[chosen_runs, chosen_records].mean(axis=(1, 2))
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def compare(runs: list[dict], arm: str, baseline: str) -> dict | None:
    """Paired test-NLL difference `arm` − `baseline` over the runs holding both, with its three intervals."""
    both = [r for r in runs if arm in r and baseline in r]
    if not both:
        return None
    differences = np.array([np.array(r[arm]["per_record_nll"]) - np.array(r[baseline]["per_record_nll"]) for r in both])
    per_seed = differences.mean(axis=1).tolist()
    mean, low, high = paired_bootstrap(differences.mean(axis=0))
    return {
        "arm": arm,
        "baseline": baseline,
        "seeds": len(both),
        "mean": mean,
        "per_seed": per_seed,
        "t_interval_over_seeds": t_interval(per_seed),
        "record_bootstrap": (low, high),
        "seed_and_record_bootstrap": two_level_bootstrap(differences),
    }


def decisions(arm: dict) -> tuple[int, int, int]:
    """(experts kept whole, blended with the generalist, fallen back) of one run's arm."""
    weights = [e.get("lambda", 0.0) for e in arm.get("experts", {}).values()]
    return sum(w == 1 for w in weights), sum(0 < w < 1 for w in weights), sum(w == 0 for w in weights)


def summarize(dataset: str, per_label: int, seeds: dict) -> dict:
    runs = {seed: with_best_single(run) for seed, run in sorted(seeds.items())}
    rows = {}
    for arm in ARMS:
        present = [a[arm] for a in runs.values() if arm in a]
        if not present:
            continue
        compute = [a["compute"] for a in present]
        served = [
            a["adapters_used"].get(GENERALIST_ADAPTER, 0) / max(sum(a["adapters_used"].values()), 1) for a in present
        ]
        rows[arm] = {
            "seeds": len(present),
            "test_nll": [a["by_label"]["overall"]["nll"] for a in present],
            "validation_nll": [a["validation_nll"] for a in present],
            "kept_blended_fell_back": [decisions(a) for a in present] if "experts" in present[0] else None,
            "generalist_share": served,
            "chosen": [a.get("chosen") for a in present] if arm == "best-single" else None,
            "steps": statistics.mean(c.get("steps_with_generalist", c["steps"]) for c in compute),
            "tokens": statistics.mean(c.get("tokens_with_generalist", c["tokens"]) for c in compute),
            "train_seconds": statistics.mean(
                c.get("train_seconds_with_generalist", c["train_seconds"]) for c in compute
            ),
            "gradient_pass_seconds": statistics.mean(c.get("gradient_pass_seconds") or 0 for c in compute),
        }
    pairs = [
        ("routed", "best-single"),
        ("routed", "random-clusters"),
        ("routed", "single"),
        ("single-continued", "single"),
        ("random-clusters", "best-single"),
        ("oracle", "best-single"),
        ("gradient-oracle", "best-single"),
        (FALLBACK_WHAT_IF, "best-single"),
    ]
    comparisons = [c for c in (compare(list(runs.values()), arm, base) for arm, base in pairs) if c]
    return {"dataset": dataset, "per_label": per_label, "seeds": sorted(runs), "arms": rows, "comparisons": comparisons}


def markdown(summary: dict) -> list[str]:
    lines = [
        f"### {summary['dataset']}, {summary['per_label']} training records per label (seeds {summary['seeds']})",
        "",
        "| arm | seeds | test NLL | validation NLL | experts kept / blended / fell back (per seed) | generalist served | steps | tokens | train s | gradient pass s |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for arm, row in summary["arms"].items():
        kept = (
            "; ".join("/".join(map(str, d)) for d in row["kept_blended_fell_back"])
            if row["kept_blended_fell_back"]
            else "–"
        )
        name = f"{arm} ({', '.join(row['chosen'])})" if row["chosen"] else arm
        lines.append(
            f"| {name} | {row['seeds']} | {mean_std(row['test_nll'])} | {mean_std(row['validation_nll'])} | {kept} | "
            f"{statistics.mean(row['generalist_share']):.0%} | {row['steps']:.0f} | {row['tokens']:.0f} | {row['train_seconds']:.0f} | "
            f"{row['gradient_pass_seconds']:.0f} |"
        )
    lines.append("")
    for c in summary["comparisons"]:
        low, high = c["t_interval_over_seeds"]
        seeds = f"t-interval over seeds {low:+.4f} … {high:+.4f}; " if c["seeds"] > 1 else ""
        lines.append(
            f"- {c['arm']} − {c['baseline']} ({c['seeds']} seed(s)): **{c['mean']:+.4f}** — {seeds}"
            f"bootstrap over records {c['record_bootstrap'][0]:+.4f} … {c['record_bootstrap'][1]:+.4f}; "
            f"over seeds and records {c['seed_and_record_bootstrap'][0]:+.4f} … {c['seed_and_record_bootstrap'][1]:+.4f}; "
            f"per seed {', '.join(f'{d:+.4f}' for d in c['per_seed'])}"
        )
    lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("bench/results/experts-v2"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    summaries = [
        summarize(dataset, per_label, seeds) for (dataset, per_label), seeds in sorted(load(args.results).items())
    ]
    lines = ["# Routed experts vs the best single adapter, seeds paired (bench/experts.py → bench/arms.py)", ""]
    for summary in summaries:
        lines.extend(markdown(summary))
    (args.out / "arms.md").write_text("\n".join(lines) + "\n")
    (args.out / "arms.json").write_text(json.dumps(summaries, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
