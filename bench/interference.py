"""Do the gradient-interference statistics predict where an expert pays? Spearman ρ over every group of every run.

Each run directory of bench/experts.py holds, per gradient cluster, the interference statistics the
cluster stage computed from the sketch (`manifest.json` → `interference`: the cosine between the
cluster's mean gradient and the other samples', and the share of its gradient energy outside the
others' leading directions). The same statistics are computed here, from the same sketch, for the
groups of the other arms that train one expert per group (`random-clusters`, `oracle`): three
partitions of each run, so three times the groups, and groups whose interference ranges from none
(random) to the labels' own. For every group, what its expert gained on validation:

- `own share`: the generalist's NLL minus the expert's best NLL on the cluster's own validation share
  (the records clustered with it), from the expert's training;
- `routed`: the generalist's NLL minus the expert's (λ = 1) on the validation records the router sends
  it, from the keep decision (`keep.py`); clusters the router sends no record are left out.

For each statistic and gain it prints Spearman ρ with a 95 % bootstrap interval over groups — over
all partitions and over each alone — and writes them to `--out`. The groups of one run share its
generalist and validation split, so they are not independent draws: the second interval resamples
whole runs, and is the one to read. A statistic worth a `select: auto` rule needs an interval that excludes 0.

Run directories do not outlive the machine that made them, so each run's rows are kept in
`bench/results/interference-<run>.json`; given such files instead of folders, the script pools
their rows (each labelled by its file) and computes ρ over every cluster of every run.

    python bench/interference.py bench/out/experts-v2/mix4-100-seed1 --out bench/results/interference-mix4-100-seed1.json
    python bench/interference.py bench/results/interference-*.json --out bench/results/interference.json   # pooled
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

STATISTICS = ("mean_cosine", "outside_energy")
MIN_RUNS = 5  # below this, resampling runs has too few distinct draws for its interval to mean anything (2 runs: 3)


PARTITIONED = ("routed", "random-clusters", "oracle")  # the arms that train one expert per group of their own partition


def statistics_of(run_dir: Path | None, manifest: dict, strategy: str) -> dict[str, dict]:
    """Per group of a strategy's partition, its interference statistics: the cluster stage's for the gradient clusters,
    computed from the same sketch for the other partitions (no gradient pass is repeated)."""
    if strategy == "routed":
        return manifest["stages"].get("cluster", {}).get("interference", {})
    partition_file = run_dir / "strategies" / strategy / "partition.json" if run_dir else None
    if partition_file is None or not partition_file.exists() or not (run_dir / "sketch.safetensors").exists():
        return {}
    from safetensors.torch import load_file

    from gradientspace.clustering.kmeans import interference

    partition = json.loads(partition_file.read_text())
    # the sketch's rows follow the records' order, which clusters.jsonl keeps
    order = [json.loads(line)["id"] for line in (run_dir / "clusters.jsonl").read_text().splitlines()]
    coordinates = load_file(str(run_dir / "sketch.safetensors"))["coordinates"]
    by_number = interference(coordinates, [partition["assignment"][i] for i in order])
    return {partition["groups"][int(number)]: row for number, row in by_number.items()}


def clusters(manifest: dict, run: str, run_dir: Path | None = None) -> list[dict]:
    """One row per group of every partitioned arm of one run: its statistics and its expert's validation gains
    (positive: the expert helps). Without the run directory only the gradient clusters' rows can be made."""
    rows = []
    for strategy in PARTITIONED:
        experts = manifest.get("experts", {}).get(strategy, {}).get("experts", {})
        decisions = manifest["stages"].get(f"keep/{strategy}", {}).get("groups", {})
        for group, statistics in statistics_of(run_dir, manifest, strategy).items():
            # the strategy's summary, or (before every strategy's adapters are done) the expert's own stage entry
            expert = experts.get(group) or manifest["stages"].get(f"experts/{strategy}/{group}", {})
            decision = decisions.get(group, {})
            own = (
                expert["initial_eval_loss"] - expert["best_eval_loss"]
                if expert.get("initial_eval_loss") is not None and expert.get("best_eval_loss") is not None
                else None
            )
            routed = (
                decision.get("fallback_nll", decision.get("generalist_nll")) - decision["candidate_nll"]["1.0"]
                if "candidate_nll" in decision and "1.0" in decision["candidate_nll"]
                else None
            )
            rows.append(
                {
                    "run": run,
                    "strategy": strategy,
                    "cluster": group,
                    **statistics,
                    "gain_own_share": own,
                    "gain_routed": routed,
                }
            )
    return rows


def rows_of(source: Path) -> list[dict]:
    """Group rows of a folder of run directories, or of a stored result file (labelled by its name)."""
    if source.is_file():
        return [
            {"strategy": "routed", **row, "run": f"{source.stem}/{row['run']}"}
            for row in json.loads(source.read_text())["clusters"]
        ]
    return [
        row
        for manifest in sorted(source.rglob("manifest.json"))
        for row in clusters(json.loads(manifest.read_text()), str(manifest.parent.relative_to(source)), manifest.parent)
    ]


def rho_with_interval(x: list[float], y: list[float], runs: list[str], samples: int = 4000, seed: int = 0) -> dict:
    """Spearman ρ with two 95 % bootstrap intervals: resampling groups, and resampling whole runs (every group of a run
    shares its generalist and validation split, so the groups of one run are not independent draws)."""
    rng = np.random.default_rng(seed)
    x, y, runs = np.asarray(x), np.asarray(y), np.asarray(runs)
    by_run = [np.flatnonzero(runs == run) for run in np.unique(runs)]

    def interval(draw) -> list[float] | None:
        resampled = []
        for _ in range(samples):
            chosen = draw()
            if len(set(x[chosen])) > 1 and len(set(y[chosen])) > 1:
                resampled.append(spearmanr(x[chosen], y[chosen]).statistic)
        return [float(np.percentile(resampled, 2.5)), float(np.percentile(resampled, 97.5))] if resampled else None

    return {
        "clusters": len(x),
        "runs": len(by_run),
        "rho": float(spearmanr(x, y).statistic),
        "interval": interval(lambda: rng.integers(0, len(x), len(x))),
        "interval_over_runs": interval(
            lambda: np.concatenate([by_run[i] for i in rng.integers(0, len(by_run), len(by_run))])
        )
        if len(by_run) >= MIN_RUNS
        else None,
    }


def analyse(rows: list[dict], samples: int = 4000) -> dict:
    """ρ per statistic and gain: over every group of every partition (`all`), and over each partition's groups alone."""
    result = {}
    for partitions in ("all", *PARTITIONED):
        chosen = rows if partitions == "all" else [r for r in rows if r["strategy"] == partitions]
        for gain in ("gain_own_share", "gain_routed"):
            usable = [r for r in chosen if r[gain] is not None]
            if len(usable) >= 3:
                result.setdefault(partitions, {})[gain] = {
                    s: rho_with_interval(
                        [r[s] for r in usable], [r[gain] for r in usable], [r["run"] for r in usable], samples
                    )
                    for s in STATISTICS
                }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "runs",
        type=Path,
        nargs="+",
        help="folders holding bench/experts.py run directories (searched for manifest.json), "
        "or stored result files of this script to pool",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/interference.json"))
    args = parser.parse_args()
    rows = [row for source in args.runs if source.resolve() != args.out.resolve() for row in rows_of(source)]
    result = {"clusters": rows, "spearman": analyse(rows)}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{len(rows)} clusters from {len({r['run'] for r in rows})} runs")
    for partitions, by_gain in result["spearman"].items():
        for gain, by_statistic in by_gain.items():
            for statistic, value in by_statistic.items():
                over_runs = value["interval_over_runs"]
                runs_text = (
                    f", over {value['runs']} runs {over_runs[0]:+.3f} … {over_runs[1]:+.3f}" if over_runs else ""
                )
                print(
                    f"{partitions:<15} {statistic:<15} vs {gain:<15} ρ = {value['rho']:+.3f} (95 % bootstrap over "
                    f"{value['clusters']} groups {value['interval'][0]:+.3f} … {value['interval'][1]:+.3f}{runs_text})"
                )


if __name__ == "__main__":
    main()
