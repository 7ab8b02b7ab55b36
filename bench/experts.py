"""Are routed experts better than the one adapter a user would otherwise train?

For each data set (../shared/data/mix4, skills4), training size (`--per-label` records per label)
and seed, one run directory goes through the default protocol: the generalist (`single`) trains
with early stopping on the validation split; every expert branches from it and stops on its own
cluster's validation share; each is then kept, blended with the generalist or dropped on the
validation records its router sends it (`gradientspace/routing/keep.py`); the router threshold is chosen on
validation. Every arm is scored on the validation split (where the single adapter of record is
chosen), then the test split (`--test-per-label` per label) is scored once, at the end. Arms:

| arm | what it is |
| --- | --- |
| single | one LoRA (rank r) on everything: the generalist (early-stopped, its schedule not annealed) |
| single-continued | the generalist continued on everything with the experts' branch schedule (the annealed baseline), same keep rule |
| single-wide | one LoRA of rank K·r on everything: as many parameters as K experts |
| routed | gradient clusters + MiniLM router (ours) |
| gradient-oracle | gradient-cluster experts, each test record sent by its own response gradient (no router can) |
| random-clusters / embedding-clusters / projection-clusters | the same protocol on other partitions |
| oracle | experts per true label (the ceiling of label routing) |
| elrea-ensemble | ELREA-style mixture of every expert and the generalist |

Per arm: test NLL per label and overall, exact match where decoding is meaningful (every skills4
classification record), the experts that fell back, training tokens, optimizer steps and seconds.
One JSON per (data set, size, seed) goes to `--results`, and beside it the run's score matrices
(`<result>-scores/{validation,test}/`: every record under every adapter, the routers' probabilities,
the prompt features; `gradientspace/evaluation/scores.py`), from which any other fall-back or routing
policy is a lookup. `bench/arms.py` and `bench/confirmatory.py` aggregate them.

Test records (`--test-set`): `first` is the 50 per label drawn with seed 0 that every benchmark
before the confirmatory protocol scored (`--test-per-label` of them); `fresh` is drawn, 50 per label
(`--test-per-label`), from the records none of them ever scored (`bench/protocol.md`).

    python bench/experts.py --datasets skills4 --per-label 100 --seeds 0 1 2
    python bench/experts.py --datasets skills4 mix4 --per-label 25 50 200 --strategies routed single
    torchrun --standalone --nproc_per_node 2 bench/experts.py --datasets skills4 --per-label 200 --seeds 0

Under torchrun the pipeline spreads its work as `gradientspace run` does (the gradient pass and the
scoring sharded, the experts dealt over the ranks; tests/test_distributed.py shows the outputs equal
one process's), and rank 0 writes the data files and the result.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from gradientspace import distributed
from gradientspace.clustering.stages import cluster
from gradientspace.commands import decide_experts, router_thresholds
from gradientspace.config import load_config
from gradientspace.evaluation.evaluate import EvaluateStage, evaluate_strategies
from gradientspace.evaluation.scores import Scores, ScoreStage
from gradientspace.experts.adapters import train_experts
from gradientspace.experts.strategies import STRATEGIES, get
from gradientspace.routing.pipeline import serving_stages
from gradientspace.routing.router import train_routers
from gradientspace.runner import Run
from gradientspace.runs import write_json, write_jsonl

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SHORT_ANSWER_LABELS = {"skills4": ["classification"], "mix4": []}  # labels whose answers exact match can judge


def balanced_rows(path: Path, per_label: int, seed: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        by_label.setdefault(row["source"], []).append(row)
    chosen = [
        row
        for label in sorted(by_label)
        for row in random.Random(f"{seed}-{label}").sample(by_label[label], min(per_label, len(by_label[label])))
    ]
    random.Random(seed).shuffle(chosen)
    return chosen


SCORED_BEFORE = 50  # per label, drawn with seed 0: the test records of every benchmark run before bench/protocol.md


def test_rows(path: Path, test_set: str, per_label: int) -> list[dict]:
    """The test records: `first`, those every earlier benchmark scored; `fresh`, drawn from those none of them scored."""
    if test_set == "first":
        return balanced_rows(path, per_label, 0)
    scored = {row["id"] for row in balanced_rows(path, SCORED_BEFORE, 0)}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        if row["id"] not in scored:
            by_label.setdefault(row["source"], []).append(row)
    if any(len(members) < per_label for members in by_label.values()):
        sys.exit(
            f"{path}: fewer than {per_label} never-scored test records for some label ({ {k: len(v) for k, v in by_label.items()} })"
        )
    chosen = [
        row for label in sorted(by_label) for row in random.Random(f"fresh-{label}").sample(by_label[label], per_label)
    ]
    random.Random("fresh").shuffle(chosen)
    return chosen


def code_commit() -> str | None:
    """The commit of the code that ran (a confirmatory run cites its protocol's); None outside a git checkout. The package
    must be this checkout's (from a worktree: PYTHONPATH=<worktree>), else the commit would name code that did not run."""
    import subprocess

    import gradientspace

    checkout = Path(__file__).resolve().parents[1]
    if Path(gradientspace.__file__).resolve().parents[1] != checkout:
        sys.exit(
            f"bench/experts.py in {checkout} imported gradientspace from {Path(gradientspace.__file__).parent}: "
            f"run it with PYTHONPATH={checkout}"
        )
    done = subprocess.run(
        ["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "-C", str(Path(__file__).parent), "status", "--porcelain", "--", "gradientspace", "bench"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return None if done.returncode else done.stdout.strip() + ("-modified" if dirty else "")


def compute(manifest: dict, strategy: str, config) -> dict:
    """Training cost of one arm: its own adapters, and with the generalist they branched from."""
    own = get(strategy).owner
    stages = {name: entry for name, entry in manifest["stages"].items() if name.startswith(f"experts/{own}/")}
    cost = {key: sum(entry.get(key) or 0 for entry in stages.values()) for key in ("tokens", "steps", "train_seconds")}
    if get(own).start(config) == "generalist":
        generalist = manifest["stages"].get("experts/single/0", {})
        cost.update(
            {
                f"{key}_with_generalist": cost[key] + (generalist.get(key) or 0)
                for key in ("tokens", "steps", "train_seconds")
            }
        )
    if own == "routed" or getattr(get(own).partitioner, "reads_gradients", False):
        cost["gradient_pass_seconds"] = manifest["stages"].get("gradients", {}).get("seconds")
    return cost


def bench_one(name: str, per_label: int, seed: int, args) -> dict | None:
    """One run through every arm; its report on rank 0, None on the other ranks."""
    folder = args.out / f"{name}-{per_label}-seed{seed}"
    if distributed.is_main():
        folder.mkdir(parents=True, exist_ok=True)
        write_jsonl(folder / "train.jsonl", balanced_rows(SHARED / name / "train.jsonl", per_label, seed))
        write_jsonl(
            folder / "test.jsonl", test_rows(SHARED / name / "test.jsonl", args.test_set, args.test_per_label)
        )  # one for every seed
    distributed.barrier()  # the other ranks read them
    config = load_config(
        None,
        {
            "out": str(folder / "run"),
            "seed": seed,
            "model.name": args.model,
            "data.path": str(folder / "train.jsonl"),
            "data.max_length": args.max_length,
            "cluster.method": "gradientspace",  # the arm the benchmark measures: GradientSpace's gradient clusters
            "cluster.k": args.k,
            "cluster.projection_dim": 8192,
            "experts.strategies": args.strategies,
            "evaluate.data": str(folder / "test.jsonl"),
            "evaluate.generate_per_domain": 0,
            "evaluate.latency_prompts": 0,
            "evaluate.decode_all_domains": SHORT_ANSWER_LABELS.get(name, []) if args.decode else [],
            "evaluate.max_new_tokens": args.max_new_tokens,
            **dict(item.split("=", 1) for item in args.set),
        },
    )
    start = time.perf_counter()
    run = Run(config)
    outcome = cluster(run)
    if distributed.is_main():
        print(f"[{name} {per_label}/label seed {seed}] clusters NMI {outcome.metrics.get('nmi'):.3f}", file=sys.stderr)
    train_experts(run)
    routers = train_routers(run)
    decide_experts(run)
    thresholds = router_thresholds(run)
    run.build(
        *[stage for strategy in args.strategies for stage in serving_stages(run, strategy)]
    )  # e.g. the ensemble's centroids
    # every arm on the validation split, served exactly as on test: the single adapter of record (`single` or
    # `single-continued`) is chosen there. Its matrix is written before the test split's, which the evaluation reads.
    run.build(ScoreStage("validation"))
    validation = Scores(run.path("scores", "validation")) if distributed.is_main() else None
    # the ensemble: scored anew, every rank its share (rank 0 alone reads the matrix, so it names them to the others)
    mixtures = distributed.from_main([s for s in args.strategies if validation and None in validation.strategy_nll(s)])
    mixed = evaluate_strategies(run, mixtures, run.validation, write=False, answers=False) if mixtures else {}
    run.build(EvaluateStage(args.strategies))
    if not distributed.is_main():
        return None
    results = json.loads(run.path("eval.json").read_text())
    validation_nll = {
        s: mixed[s]["overall"]["nll"] if s in mixtures else round(float(np.mean(validation.strategy_nll(s))), 4)
        for s in args.strategies
    }
    test = results["ids"]
    run.directory.reload()
    manifest = run.directory.manifest
    arms = {}
    for strategy in args.strategies:
        table = results[strategy]
        arms[strategy] = {
            "by_label": {
                label: {k: v for k, v in row.items() if k in ("nll", "exact_match", "n", "generated")}
                for label, row in table.items()
            },
            "per_record_nll": results["per_record"][strategy]["nll"],
            "adapters_used": results["experts_used"][strategy],
            # which adapter served each test record: what-if questions (another fall-back adapter) need it
            "per_record_adapter": results["per_record"][strategy]["adapter"],
            "validation_nll": validation_nll[strategy],
            "compute": compute(manifest, strategy, config),
        }
        summary = manifest.get("experts", {}).get(get(strategy).owner, {})
        if "fallback" in summary:  # decided strategies: each group's λ and why (`keep.py`)
            arms[strategy]["fallback"] = summary["fallback"]
            arms[strategy]["experts"] = summary["experts"]
    report = {
        "dataset": name,
        "per_label": per_label,
        "seed": seed,
        "test_set": args.test_set,
        "code": code_commit(),
        "train": len(outcome.labels),
        "test": len(test),
        "ids": results["ids"],
        "config": config.to_dict(),
        "cluster_metrics": outcome.metrics,
        "cluster_sizes": outcome.sizes,
        "routers": routers,
        "thresholds": thresholds,
        "arms": arms,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "stage_seconds": {k: v.get("seconds") for k, v in manifest["stages"].items()},
    }
    print(
        f"[{name} {per_label}/label seed {seed}] "
        + ", ".join(f"{s} {arms[s]['by_label']['overall']['nll']:.4f}" for s in args.strategies),
        file=sys.stderr,
    )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["skills4", "mix4"])
    parser.add_argument("--per-label", type=int, nargs="+", default=[100])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--test-per-label", type=int, default=50)
    parser.add_argument(
        "--test-set",
        choices=["first", "fresh"],
        default="first",
        help="test records: those every earlier benchmark scored, or never-scored ones",
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=8, help="decoding budget for short answers (exact match)")
    parser.add_argument("--no-decode", dest="decode", action="store_false", help="NLL only")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides for every run"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/out/experts-runs"))
    parser.add_argument("--results", type=Path, default=Path("bench/results/experts"))
    args = parser.parse_args()
    missing = [d for d in args.datasets if not (SHARED / d / "train.jsonl").exists()]
    if missing:
        sys.exit(
            f"bench/experts.py needs {', '.join(str(SHARED / d) for d in missing)} (development data, not shipped with the package)"
        )
    distributed.init()  # under torchrun: the process group the pipeline and the barriers below use
    for per_label in args.per_label:
        for seed in args.seeds:
            for name in args.datasets:
                result_file = (
                    args.results
                    / f"{name}-{per_label}-seed{seed}-{'-'.join(sorted(args.strategies)) if len(args.strategies) < len(STRATEGIES) else 'all'}.json"
                )
                if result_file.exists():
                    print(f"done already: {result_file}", file=sys.stderr)
                    continue
                report = bench_one(name, per_label, seed, args)
                if report is not None:
                    # the matrices first: a result file is only written whole, with its matrices beside it
                    scores = result_file.with_name(result_file.stem + "-scores")
                    shutil.rmtree(scores, ignore_errors=True)
                    shutil.copytree(args.out / f"{name}-{per_label}-seed{seed}" / "run" / "scores", scores)
                    write_json(result_file, report)
                    print(f"wrote {result_file} and {scores}", file=sys.stderr)
                distributed.barrier()  # every rank sees the file before the next run's check
    distributed.close()


if __name__ == "__main__":
    main()
