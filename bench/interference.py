"""Do the gradient-interference statistics predict where an expert pays? Spearman ρ over every cluster of every run.

Each run directory of bench/experts.py holds, per gradient cluster, the interference statistics the
cluster stage computed from the sketch (`manifest.json` → `interference`: the cosine between the
cluster's mean gradient and the other samples', and the share of its gradient energy outside the
others' leading directions) and what its expert gained on validation:

- `own share`: the generalist's NLL minus the expert's best NLL on the cluster's own validation share
  (the records clustered with it), from the expert's training;
- `routed`: the generalist's NLL minus the expert's (λ = 1) on the validation records the router sends
  it, from the keep decision (`keep.py`); clusters the router sends no record are left out.

For each statistic and gain it prints Spearman ρ with a 95 % bootstrap interval over clusters, and
writes them to `--out`. A statistic worth a `select: auto` rule needs an interval that excludes 0.

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


def clusters(manifest: dict, run: str) -> list[dict]:
    """One row per gradient cluster of one run: its statistics and its expert's validation gains (positive: the expert helps)."""
    experts = manifest.get("experts", {}).get("routed", {}).get("experts", {})
    decisions = manifest["stages"].get("keep/routed", {}).get("groups", {})
    rows = []
    for cluster, statistics in manifest["stages"].get("cluster", {}).get("interference", {}).items():
        # the strategy's summary, or (before every strategy's adapters are done) the expert's own stage entry
        expert = experts.get(cluster) or manifest["stages"].get(f"experts/routed/{cluster}", {})
        decision = decisions.get(cluster, {})
        own = expert["initial_eval_loss"] - expert["best_eval_loss"] if expert.get("initial_eval_loss") is not None and expert.get("best_eval_loss") is not None else None
        routed = decision["generalist_nll"] - decision["candidate_nll"]["1.0"] if "candidate_nll" in decision and "1.0" in decision["candidate_nll"] else None
        rows.append({"run": run, "cluster": cluster, **statistics, "gain_own_share": own, "gain_routed": routed})
    return rows


def rows_of(source: Path) -> list[dict]:
    """Cluster rows of a folder of run directories, or of a stored result file (labelled by its name)."""
    if source.is_file():
        return [{**row, "run": f"{source.stem}/{row['run']}"} for row in json.loads(source.read_text())["clusters"]]
    return [row for manifest in sorted(source.rglob("manifest.json"))
            for row in clusters(json.loads(manifest.read_text()), str(manifest.parent.relative_to(source)))]


def rho_with_interval(x: list[float], y: list[float], samples: int = 4000, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    x, y = np.asarray(x), np.asarray(y)
    resampled = []
    for _ in range(samples):
        chosen = rng.integers(0, len(x), len(x))
        if len(set(x[chosen])) > 1 and len(set(y[chosen])) > 1:
            resampled.append(spearmanr(x[chosen], y[chosen]).statistic)
    return {"clusters": len(x), "rho": float(spearmanr(x, y).statistic), "interval": [float(np.percentile(resampled, 2.5)), float(np.percentile(resampled, 97.5))]}


def analyse(rows: list[dict]) -> dict:
    result = {}
    for gain in ("gain_own_share", "gain_routed"):
        usable = [r for r in rows if r[gain] is not None]
        if len(usable) >= 3:
            result[gain] = {s: rho_with_interval([r[s] for r in usable], [r[gain] for r in usable]) for s in STATISTICS}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="folders holding bench/experts.py run directories (searched for manifest.json), "
                        "or stored result files of this script to pool")
    parser.add_argument("--out", type=Path, default=Path("bench/results/interference.json"))
    args = parser.parse_args()
    rows = [row for source in args.runs if source.resolve() != args.out.resolve() for row in rows_of(source)]
    result = {"clusters": rows, "spearman": analyse(rows)}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{len(rows)} clusters from {len({r['run'] for r in rows})} runs")
    for gain, by_statistic in result["spearman"].items():
        for statistic, value in by_statistic.items():
            low, high = value["interval"]
            print(f"{statistic:<15} vs {gain:<15} ρ = {value['rho']:+.3f} (95 % bootstrap over {value['clusters']} clusters {low:+.3f} … {high:+.3f})")


if __name__ == "__main__":
    main()
