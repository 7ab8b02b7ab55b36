"""Experts per strategy at equal budgets, on real data: the paper's central claim, measured.

For each data set (../shared/data/mix4 and skills4; `--per-label` training and `--test-per-label`
test records per label, seeded), one run directory goes through the whole pipeline with every
strategy: routed (gradient clusters + router), single, oracle, random-clusters,
embedding-clusters, projection-clusters (k = 8192) and elrea-ensemble. All adapters train for
the same number of epochs over their own data (equal tokens), and are snapshotted after epochs
1 and 2 of 4, so each is scored at 1, 2 and 4 epochs: a budget curve. Test split only.

    python bench/experts.py --datasets mix4 skills4 > bench/out/experts.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from gradientspace.config import load_config
from gradientspace.data import load_records
from gradientspace.evaluate import evaluate_strategies
from gradientspace.experts import train_experts
from gradientspace.pipeline import cluster
from gradientspace.router import train_routers
from gradientspace.runs import Run, write_jsonl
from gradientspace.workflow import elrea_centroids

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
STRATEGIES = ["routed", "single", "oracle", "random-clusters", "embedding-clusters", "projection-clusters", "elrea-ensemble"]


def balanced_rows(path: Path, per_label: int, seed: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        by_label.setdefault(row["source"], []).append(row)
    chosen = [row for label in sorted(by_label) for row in random.Random(f"{seed}-{label}").sample(by_label[label], per_label)]
    random.Random(seed).shuffle(chosen)
    return chosen


def summarise(results: dict, strategies: list[str]) -> dict:
    keep = {}
    for strategy in strategies:
        table = results.get(strategy, {})
        keep[strategy] = {domain: {k: v for k, v in row.items() if k in ("nll", "exact_match", "rouge_l", "n")} for domain, row in table.items()}
    return keep


def bench_dataset(name: str, args) -> dict:
    folder = args.out / name
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "train.jsonl", balanced_rows(SHARED / name / "train.jsonl", args.per_label, 0))
    write_jsonl(folder / "test.jsonl", balanced_rows(SHARED / name / "test.jsonl", args.test_per_label, 0))
    config = load_config(None, {
        "out": str(folder / "run"), "model.name": args.model, "data.path": str(folder / "train.jsonl"), "data.max_length": args.max_length,
        "cluster.k": 4, "cluster.projection_dim": 8192, "experts.strategies": args.strategies, "experts.epochs": max(args.epochs),
        "experts.snapshot_epochs": args.epochs, "experts.batch_size": 4, "experts.learning_rate": 2e-4,
        "evaluate.data": str(folder / "test.jsonl"), "evaluate.generate_per_domain": 0, "evaluate.latency_prompts": 0,
        "evaluate.max_new_tokens": args.max_new_tokens,
    })
    outcome = cluster(config)
    print(f"[{name}] clusters NMI {outcome.metrics.get('nmi'):.3f}", file=sys.stderr)
    train_experts(config)
    routers = train_routers(config)
    if "elrea-ensemble" in args.strategies:
        elrea_centroids(config)
    test, _ = load_records(config.evaluate.data)
    report = {"train": len(outcome.labels), "test": len(test), "cluster_metrics": outcome.metrics, "router": routers, "by_epochs": {}}
    for epochs in args.epochs:
        final = epochs == max(args.epochs)
        if final:  # decode and time only the full budget
            config.evaluate.generate_per_domain, config.evaluate.latency_prompts = args.generate_per_domain, args.latency_prompts
        done = Path(config.out) / f"eval-epoch-{epochs}.json"
        if done.exists() and not final:  # resume: NLL-only evaluations of earlier budgets are kept
            results = json.loads(done.read_text())
        else:
            results = evaluate_strategies(config, args.strategies, test, adapter_epoch=epochs)
        report["by_epochs"][str(epochs)] = summarise(results, args.strategies)
        if final and {"single", "routed", "elrea-ensemble"} <= set(args.strategies):
            latency = results["latency"]
            report["latency"] = latency
            report["experts_used"] = results["experts_used"]
            single_first = latency["single"]["total_first_token_ms"]
            report["latency_ratios_vs_single"] = {s: round(latency[s]["total_first_token_ms"] / single_first, 2) for s in args.strategies if latency[s]["total_first_token_ms"]}
            report["tokens_per_second_ratio_routed_vs_ensemble"] = round(latency["routed"]["tokens_per_second"] / latency["elrea-ensemble"]["tokens_per_second"], 2)
        print(f"[{name}] epochs {epochs}: " + ", ".join(f"{s} {report['by_epochs'][str(epochs)][s]['overall']['nll']:.3f}" for s in args.strategies), file=sys.stderr)
    report["stage_seconds"] = {k: v.get("seconds") for k, v in Run(config.out).manifest["stages"].items()}
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", nargs="+", default=["mix4", "skills4"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--per-label", type=int, default=20)
    parser.add_argument("--test-per-label", type=int, default=10)
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--generate-per-domain", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--latency-prompts", type=int, default=3)
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES, choices=STRATEGIES)
    parser.add_argument("--out", type=Path, default=Path("bench/out/experts-runs"))
    args = parser.parse_args()
    missing = [d for d in args.datasets if not (SHARED / d / "train.jsonl").exists()]
    if missing:
        sys.exit(f"bench/experts.py needs {', '.join(str(SHARED / d) for d in missing)} (development data, not shipped with the package)")
    report = {"model": args.model, "per_label": args.per_label, "test_per_label": args.test_per_label, "max_length": args.max_length,
              "epochs": args.epochs, "strategies": args.strategies, "datasets": {}}
    for name in args.datasets:
        report["datasets"][name] = bench_dataset(name, args)
        print(json.dumps(report, indent=2), file=open(args.out / "partial.json", "w"))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
