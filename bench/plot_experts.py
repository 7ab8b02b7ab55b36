"""Aggregate bench/experts.py results: the arms table, the routed − single bootstrap CI, the data curve.

Reads every `bench/results/experts/*.json` (one per data set, size and seed; several files of the
same run with different arm subsets are merged) and writes `bench/results/experts.md` (mean ± std
over seeds per arm, per label; compute; fall-backs; the paired bootstrap 95 % CI of routed − single,
and of routed − random-clusters (the control with the same training but no clustering), over test
records, pooled over seeds by averaging each record's difference, with the per-seed spread, a
t-interval over seeds and each seed's own CI of routed − single) and
`bench/results/experts_curve.png` (top: overall test NLL of routed and single against training
records per label; bottom: routed − single with its record-bootstrap 95 % CI, so a reader sees
where, if anywhere, the curves cross).

    python bench/plot_experts.py
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ORDER = [
    "single",
    "single-wide",
    "routed",
    "gradient-oracle",
    "random-clusters",
    "embedding-clusters",
    "projection-clusters",
    "oracle",
    "elrea-ensemble",
]


def load(folder: Path) -> dict:
    """{(data set, per label): {seed: merged result}}."""
    runs: dict = {}
    for path in sorted(folder.glob("*.json")):
        result = json.loads(path.read_text())
        key = (result["dataset"], result["per_label"])
        merged = runs.setdefault(key, {}).setdefault(result["seed"], {**result, "arms": {}})
        merged["arms"].update(result["arms"])
    return runs


def paired_bootstrap(differences: np.ndarray, samples: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    rng = np.random.default_rng(seed)
    means = differences[rng.integers(0, len(differences), size=(samples, len(differences)))].mean(axis=1)
    return float(differences.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def seed_interval(per_seed: list[float]) -> str:
    """The 95 % t-interval over seeds: the bootstrap above pools seeds per record, so it leaves out how much
    a whole run (its data sample, its generalist's early stop) moves the difference."""
    from scipy import stats

    mean, half = (
        statistics.mean(per_seed),
        stats.t.ppf(0.975, len(per_seed) - 1) * statistics.stdev(per_seed) / len(per_seed) ** 0.5,
    )
    return f"95 % t-interval over seeds {mean - half:+.4f} … {mean + half:+.4f}"


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(dataset: str, per_label: int, seeds: dict) -> list[str]:
    arms = [a for a in ORDER if any(a in r["arms"] for r in seeds.values())]
    labels = [l for l in next(iter(seeds.values()))["arms"][arms[0]]["by_label"] if l != "overall"]
    lines = [
        f"### {dataset}, {per_label} training records per label (seeds {sorted(seeds)})",
        "",
        "| arm | seeds | overall NLL | − single on the same seeds | "
        + " | ".join(labels)
        + " | exact match (short answers) | fell back | steps | tokens | train s (with generalist; mean over seeds) |",
        "| --- | ---: | ---: | ---: |" + " ---: |" * len(labels) + " --- | --- | ---: | ---: | ---: |",
    ]
    for arm in arms:
        runs = [r["arms"][arm] for r in seeds.values() if arm in r["arms"]]
        overall = mean_std([a["by_label"]["overall"]["nll"] for a in runs])
        # an arm run on fewer seeds than single must be read against single on those seeds, not single's mean over all
        paired = [
            r["arms"][arm]["by_label"]["overall"]["nll"] - r["arms"]["single"]["by_label"]["overall"]["nll"]
            for r in seeds.values()
            if arm in r["arms"] and "single" in r["arms"]
        ]
        versus_single = f"{statistics.mean(paired):+.4f}" if paired and arm != "single" else "–"
        per_label_cells = [mean_std([a["by_label"][l]["nll"] for a in runs]) for l in labels]
        exact = [
            a["by_label"][l].get("exact_match")
            for a in runs
            for l in labels
            if a["by_label"][l].get("exact_match") is not None
        ]
        fallback = (
            "; ".join(",".join(a.get("fallback", [])) or "none" for a in runs)
            if arm not in ("single", "single-wide")
            else "–"
        )
        # compute per seed (the generalist's early stop differs between seeds), shown as the mean over seeds
        compute = [a["compute"] for a in runs]
        steps = statistics.mean(c.get("steps_with_generalist", c["steps"]) for c in compute)
        tokens = statistics.mean(c.get("tokens_with_generalist", c["tokens"]) for c in compute)
        seconds = statistics.mean(c.get("train_seconds_with_generalist", c.get("train_seconds")) for c in compute)
        lines.append(
            f"| {arm} | {len(runs)} | {overall} | {versus_single} | "
            + " | ".join(per_label_cells)
            + f" | {mean_std(exact) if exact else '–'} | {fallback} | "
            f"{steps:.0f} | {tokens:.0f} | {seconds:.0f} |"
        )
    lines.append("")
    # against the generalist, and routed against the control that has the same training but no clustering
    comparisons = [(arm, "single") for arm in ("routed", "gradient-oracle", "random-clusters", "single-wide")] + [
        ("routed", "random-clusters")
    ]
    for arm, baseline in comparisons:
        both = [r for r in seeds.values() if arm in r["arms"] and baseline in r["arms"]]
        if not both:
            continue
        per_seed = [
            np.array(r["arms"][arm]["per_record_nll"]) - np.array(r["arms"][baseline]["per_record_nll"]) for r in both
        ]
        mean, low, high = paired_bootstrap(np.mean(per_seed, axis=0))
        spread = (
            f"; per seed {mean_std([float(d.mean()) for d in per_seed])}, {seed_interval([float(d.mean()) for d in per_seed])}"
            if len(per_seed) > 1
            else ""
        )
        lines.append(
            f"- {arm} − {baseline}, test NLL, paired bootstrap over {len(per_seed[0])} test records ({len(both)} seed(s) averaged per record): "
            f"**{mean:+.4f}** (95 % CI {low:+.4f} … {high:+.4f}){spread}"
        )
        if len(per_seed) > 1 and (arm, baseline) == ("routed", "single"):  # which runs carry the mean
            cells = [
                f"seed {r['seed']} {m:+.4f} ({lo:+.4f} … {hi:+.4f})"
                for r, (m, lo, hi) in zip(both, map(paired_bootstrap, per_seed))
            ]
            lines.append("  - each seed alone: " + "; ".join(cells))
    lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--results", type=Path, default=Path("bench/results/experts"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    runs = load(args.results)
    lines = [
        "# Routed experts vs one adapter, the earlier protocol (bench/experts.py; the generalist early-stopped, not annealed)",
        "",
    ]
    for (dataset, per_label), seeds in sorted(runs.items()):
        lines.extend(table(dataset, per_label, seeds))
    (args.out / "experts.md").write_text("\n".join(lines) + "\n")
    datasets = sorted({d for d, _ in runs})
    figure, axes = plt.subplots(2, len(datasets), figsize=(5.5 * len(datasets), 7), squeeze=False, sharex=True)
    for column, dataset in enumerate(datasets):
        sizes = sorted((per_label, seeds) for (d, per_label), seeds in runs.items() if d == dataset)
        axis = axes[0][column]
        for arm, style in (("single", "o-"), ("routed", "s-"), ("random-clusters", "^--")):
            points = [
                (x, [r["arms"][arm]["by_label"]["overall"]["nll"] for r in seeds.values() if arm in r["arms"]])
                for x, seeds in sizes
            ]
            points = [(x, ys) for x, ys in points if ys]
            if points:
                axis.errorbar(
                    [x for x, _ in points],
                    [statistics.mean(ys) for _, ys in points],
                    yerr=[statistics.stdev(ys) if len(ys) > 1 else 0 for _, ys in points],
                    fmt=style,
                    label=arm,
                    capsize=3,
                )
        axis.set_ylabel("test NLL (mean ± std over seeds)")
        axis.set_title(dataset)
        axis.legend()
        axis = axes[1][column]
        differences = []
        for x, seeds in sizes:
            both = [r for r in seeds.values() if "routed" in r["arms"] and "single" in r["arms"]]
            if both:
                per_record = np.mean(
                    [
                        np.array(r["arms"]["routed"]["per_record_nll"])
                        - np.array(r["arms"]["single"]["per_record_nll"])
                        for r in both
                    ],
                    axis=0,
                )
                differences.append((x, len(both), *paired_bootstrap(per_record)))
        axis.axhline(0, color="grey", linewidth=0.8)
        axis.errorbar(
            [d[0] for d in differences],
            [d[2] for d in differences],
            yerr=[[d[2] - d[3] for d in differences], [d[4] - d[2] for d in differences]],
            fmt="s-",
            capsize=3,
        )
        for x, count, mean, _, _ in differences:
            axis.annotate(
                f"{count} seed{'s' if count > 1 else ''}",
                (x, mean),
                textcoords="offset points",
                xytext=(6, 4),
                fontsize=8,
            )
        axis.set_xscale("log", base=2)
        axis.set_xticks([x for x, _ in sizes], [str(x) for x, _ in sizes])
        axis.set_xlabel("training records per label")
        axis.set_ylabel("routed − single (95 % CI over test records)")
    figure.tight_layout()
    figure.savefig(args.out / "experts_curve.png", dpi=150)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
