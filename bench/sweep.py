"""Tune how experts branch from the generalist, choosing on the validation split only.

Starts from a finished `bench/experts.py` run directory. Each variant is a copy of that run with
one setting changed; only what the change invalidates is recomputed (the manifest's stage keys
decide): branch settings retrain the routed experts from the same generalist; K re-clusters the
same sketch. Every variant is scored by the routed strategy's mean NLL on the validation split
(experts kept, blended or fallen back and the router threshold chosen there too, as in a real run), next to
the generalist's. The test split is not read: the chosen variant goes back through
`bench/experts.py --set …` for its test numbers.

    python bench/sweep.py --base bench/out/experts-runs/skills4-100-seed0 > bench/out/sweep-skills4.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from gradientspace.clustering.stages import cluster
from gradientspace.commands import decide_experts, router_thresholds
from gradientspace.config import config_from_run
from gradientspace.experts.adapters import train_experts
from gradientspace.routing.model import StrategyModel
from gradientspace.routing.router import train_routers
from gradientspace.runner import Run

VARIANTS = {
    "base": {},
    "branch-lr-1e-4": {"experts.branch_learning_rate": 1e-4},
    "branch-lr-5e-4": {"experts.branch_learning_rate": 5e-4},
    "branch-1-epoch": {"experts.branch_epochs": 1},
    "k2": {"cluster.k": 2},
}
NOT_COPIED = (
    "eval*",
    "report",
    "elrea",
    "strategies/random-clusters",
    "strategies/embedding-clusters",
    "strategies/projection-clusters",
    "strategies/oracle",
    "strategies/single-wide",
)


def validation_score(out: Path, overrides: dict) -> dict:
    config = config_from_run(out, {**overrides, "experts.strategies": ["routed", "single"]})
    start = time.perf_counter()
    run = Run(config)
    outcome = cluster(run)
    train_experts(run, ["single", "routed"])
    train_routers(run, ["routed"])
    kept = decide_experts(run, ["routed"]).get("routed", {})
    thresholds = router_thresholds(run)
    validation = run.validation
    engine = StrategyModel(config, ["routed", "single"])
    scores = {s: sum(engine.nll(s, validation)) / len(validation) for s in ("routed", "single")}
    return {
        "overrides": overrides,
        "nmi": outcome.metrics.get("nmi"),
        "fallback": [g for g, d in kept.items() if d["lambda"] == 0],
        "threshold": thresholds.get("routed"),
        "validation_nll": scores,
        "validation_gain_vs_single": scores["single"] - scores["routed"],
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", type=Path, required=True, help="a bench/experts.py run folder (holds run/)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    report = {"base": str(args.base), "chosen_on": "validation split", "variants": {}}
    for name in args.variants:
        out = args.base / f"sweep-{name}"
        if not out.exists():
            shutil.copytree(args.base / "run", out, ignore=shutil.ignore_patterns(*NOT_COPIED))
        report["variants"][name] = validation_score(out, VARIANTS[name])
        print(f"[{name}] {report['variants'][name]['validation_nll']}", file=sys.stderr)
    report["chosen"] = min(report["variants"], key=lambda n: report["variants"][n]["validation_nll"]["routed"])
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
