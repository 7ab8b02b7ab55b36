"""Where routed experts lose to the single adapter: vary one knob at a time and re-score routed.

Starts from a finished `bench/experts.py` run directory (same data, test set and budget). Each
variant is a copy of that run with one setting changed; only what the change invalidates is
recomputed (the run manifest's stage keys decide): K re-clusters the same sketch; the gradient
token choice and the sketch rank redo the gradient pass; the warm-up length redoes everything,
the single adapter included (both start from the warm-up adapter). Test split, NLL per domain at
each snapshot epoch, next to the base run's single and oracle.

    python bench/sweep.py --base bench/out/experts-runs/mix4 > bench/out/sweep-mix4.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from gradientspace.config import config_from_run
from gradientspace.data import load_records
from gradientspace.evaluate import evaluate_strategies
from gradientspace.experts import train_experts
from gradientspace.pipeline import cluster
from gradientspace.router import train_routers

VARIANTS = {
    "k2": {"cluster.k": 2},
    "k8": {"cluster.k": 8},
    "instruction-tokens": {"gradients.tokens": "instruction"},
    "rank32": {"sketch.rank": 32},
    "warmup-30pct": {"warmup.fraction": 0.3},
}
NOT_COPIED = ("eval-epoch-*", "report", "elrea")


def nll_table(results: dict, strategy: str) -> dict:
    return {domain: round(row["nll"], 4) for domain, row in results[strategy].items()}


def run_variant(base_run: Path, out: Path, overrides: dict, epochs: list[int], test_path: Path) -> dict:
    if not out.exists():
        shutil.copytree(base_run, out, ignore=shutil.ignore_patterns(*NOT_COPIED))
    config = config_from_run(out, overrides)
    start = time.perf_counter()
    outcome = cluster(config)
    retrain = ["routed", "single"] if "warmup.fraction" in overrides else ["routed"]
    train_experts(config, retrain)
    router = train_routers(config, ["routed"])
    test, _ = load_records(str(test_path))
    scores = {}
    for epoch in epochs:
        results = evaluate_strategies(config, retrain, test, adapter_epoch=epoch, write=False)
        scores[str(epoch)] = {s: nll_table(results, s) for s in retrain}
    return {"overrides": overrides, "nmi": outcome.metrics.get("nmi"), "router": router["routed"], "sizes": outcome.metrics.get("sizes"),
            "nll_by_epochs": scores, "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", type=Path, required=True, help="a bench/experts.py data-set folder (holds run/ and test.jsonl)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    base_run = args.base / "run"
    report = {"base": str(args.base), "base_nll_by_epochs": {}, "variants": {}}
    for epoch in args.epochs:
        base = json.loads((base_run / f"eval-epoch-{epoch}.json").read_text())
        report["base_nll_by_epochs"][str(epoch)] = {s: nll_table(base, s) for s in ("routed", "single", "oracle")}
    for name in args.variants:
        report["variants"][name] = run_variant(base_run, args.base / f"sweep-{name}", VARIANTS[name], args.epochs, args.base / "test.jsonl")
        overall = {e: {s: t["overall"] for s, t in row.items()} for e, row in report["variants"][name]["nll_by_epochs"].items()}
        print(f"[{name}] {overall}", file=sys.stderr)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
