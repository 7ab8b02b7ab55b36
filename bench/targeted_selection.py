"""Does `gradientspace select` find a target task's records? Precision of the top 10 % against two other similarities.

For each data set (../shared/data/mix4, skills4; `--per-label` records per label) and seed, one run is
clustered as `gradientspace cluster` does (warm-up, the gradient pass into the sketch, and a Rademacher
projection of the same gradients to as many dimensions as the sketch's rank). Then, for each label
in turn, the target is that label's validation records (never trained on, never in the pool) and the
pool is the training split. Each pool record is scored by its mean cosine similarity to the targets in
three spaces:

| space | what |
| --- | --- |
| sketch | the run's sketch coordinates (Uᵀg, r dimensions): what `gradientspace select` uses |
| projection | the same gradients under a random ±1/√r projection to r dimensions (LESS's way, at equal dimension) |
| embedding | MiniLM prompt embeddings (384 dimensions): what a user without gradients would use |

The measure is the share of the top 10 % (and 5 %, 20 %) of the pool that carries the target's
label, against the label's share of the pool (what a random choice gets), with a Wilson 95 % interval
over the chosen records. Labels are read only here, to score; nothing that selects reads them.
The target gradients' seconds are recorded beside the embedding's: compute beside quality.

    python bench/targeted_selection.py --datasets mix4 skills4 --per-label 100 --seeds 0 --out bench/out/targeted-selection --results bench/results
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
from experts import SHARED, balanced_rows, code_commit
from safetensors.torch import load_file

from gradientspace.clustering.stages import cluster
from gradientspace.config import load_config
from gradientspace.models.encoder import embed_texts
from gradientspace.models.loading import pick_device
from gradientspace.runner import Run
from gradientspace.runs import write_json, write_jsonl
from gradientspace.selection import mean_cosine, target_features

SHARES = (0.05, 0.1, 0.2)
SPACES = ("sketch", "projection", "embedding")


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = hits / n
    centre, half = (
        (p + z * z / (2 * n)) / (1 + z * z / n),
        z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n),
    )
    return (round(centre - half, 4), round(centre + half, 4))


def precision(scores: np.ndarray, labels: list[str], target: str, share: float) -> dict:
    """The share of the top `share` of the pool (by score) that carries `target`, with its Wilson interval."""
    top = max(1, math.ceil(share * len(scores)))
    chosen = np.argsort(-scores, kind="stable")[:top]
    hits = sum(labels[i] == target for i in chosen)
    return {"precision": round(hits / top, 4), "interval": wilson(hits, top), "chosen": top}


def bench_one(name: str, per_label: int, seed: int, args) -> dict:
    folder = args.out / f"{name}-{per_label}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "train.jsonl", balanced_rows(SHARED / name / "train.jsonl", per_label, seed))
    config = load_config(
        None,
        {
            "out": str(folder / "run"),
            "seed": seed,
            "model.name": args.model,
            "data.path": str(folder / "train.jsonl"),
            "cluster.method": "gradientspace",  # selection ranks records in the sketch the gradient pass makes
            "cluster.k": 4,
            "experts.strategies": ["projection-clusters"],
            **dict(item.split("=", 1) for item in args.set),
        },
    )
    rank = config.sketch.rank
    config = load_config(
        None, {"cluster.projection_dim": rank}, tree=config.to_dict()
    )  # the projection at the sketch's dimension
    run = Run(config)
    cluster(run)
    records, held = run.records, run.validation_ids
    pool = [i for i, r in enumerate(records) if r.id not in held]
    targets = [i for i, r in enumerate(records) if r.id in held]
    pool_labels = [records[i].source for i in pool]

    start = time.perf_counter()
    target_space = target_features(run, [records[i] for i in targets], projections=(rank,))
    gradient_seconds = time.perf_counter() - start
    projection = load_file(str(run.path(f"projection-{rank}.safetensors")))["features"].numpy()
    sketch = load_file(str(run.path("sketch.safetensors")))["coordinates"].numpy()
    start = time.perf_counter()
    embedded = embed_texts(
        (r.prompt_text for r in records), pick_device(config.model.device)
    ).numpy()  # as the embedding baseline reads them
    embedding_seconds = time.perf_counter() - start
    spaces = {
        "sketch": (sketch[pool], target_space["sketch"]),
        "projection": (projection[pool], target_space[f"projection-{rank}"]),
        "embedding": (embedded[pool], embedded[targets]),
    }

    by_label = {}
    for label in sorted(set(pool_labels)):
        mine = [j for j, i in enumerate(targets) if records[i].source == label]
        row = {"targets": len(mine), "base_rate": round(pool_labels.count(label) / len(pool), 4)}
        for space, (pool_rows, target_rows) in spaces.items():
            scores = mean_cosine(pool_rows, target_rows[mine])
            row[space] = {f"top{round(share * 100)}": precision(scores, pool_labels, label, share) for share in SHARES}
        by_label[label] = row
    mean = {
        space: {
            f"top{round(s * 100)}": round(
                float(np.mean([row[space][f"top{round(s * 100)}"]["precision"] for row in by_label.values()])), 4
            )
            for s in SHARES
        }
        for space in SPACES
    }
    clustered = run.stage_entry(
        "cluster"
    )  # the run's named clusters: can a reader tell each one's domain from its terms?
    report = {
        "dataset": name,
        "per_label": per_label,
        "seed": seed,
        "code": code_commit(),
        "pool": len(pool),
        "targets": len(targets),
        "rank": rank,
        "model": config.model.name,
        "by_label": by_label,
        "mean_over_labels": mean,
        "clusters": {
            "terms": clustered.get("terms"),
            "composition": clustered.get("composition"),
            "metrics": clustered.get("metrics"),
        },
        "seconds": {
            "target_gradients": round(gradient_seconds, 1),
            "embedding_all_records": round(embedding_seconds, 1),
            "stages": {k: v.get("seconds") for k, v in run.directory.manifest["stages"].items()},
        },
    }
    print(
        f"[{name} {per_label}/label seed {seed}] top 10 %: " + ", ".join(f"{s} {mean[s]['top10']:.3f}" for s in SPACES),
        file=sys.stderr,
    )
    return report


def markdown(reports: list[dict]) -> str:
    lines = [
        "# Targeted selection: the share of the top 10 % of the pool that carries the target's label",
        "",
        "Generated by `bench/targeted_selection.py` from `targeted-selection.json`. Target: one label's validation records; "
        "pool: the training split; random choice gets the base rate. Interval: Wilson 95 % over the chosen records.",
        "",
        "| data | seed | label | targets | base rate | sketch (select) | projection (equal dim) | embedding (MiniLM) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for report in reports:
        for label, row in report["by_label"].items():
            cell = lambda space: (
                f"{row[space]['top10']['precision']:.2f} ({row[space]['top10']['interval'][0]:.2f}–{row[space]['top10']['interval'][1]:.2f})"
            )
            lines.append(
                f"| {report['dataset']} {report['per_label']}/label | {report['seed']} | {label} | {row['targets']} | {row['base_rate']:.2f} | "
                f"{cell('sketch')} | {cell('projection')} | {cell('embedding')} |"
            )
        mean = report["mean_over_labels"]
        base = np.mean([row["base_rate"] for row in report["by_label"].values()])
        lines.append(
            f"| {report['dataset']} {report['per_label']}/label | {report['seed']} | **mean** | | {base:.2f} | "
            f"**{mean['sketch']['top10']:.2f}** | **{mean['projection']['top10']:.2f}** | **{mean['embedding']['top10']:.2f}** |"
        )
    lines += [
        "",
        "The runs' clusters, named by their most distinctive terms (class-based TF-IDF), and the labels they hold:",
        "",
        "| data | seed | cluster | terms | labels |",
        "| --- | --- | --- | --- | --- |",
    ]
    for report in reports:
        clusters = report["clusters"]
        for k, terms in (clusters["terms"] or {}).items():
            labels = ", ".join(
                f"{label} {n}"
                for label, n in sorted((clusters["composition"] or {}).get(k, {}).items(), key=lambda kv: -kv[1])
            )
            lines.append(f"| {report['dataset']} | {report['seed']} | {k} | {', '.join(terms)} | {labels} |")
    lines += [
        "",
        "Seconds: "
        + "; ".join(
            f"{r['dataset']} seed {r['seed']}: target gradients {r['seconds']['target_gradients']} s "
            f"({r['targets']} records), MiniLM over all {r['pool'] + r['targets']} records {r['seconds']['embedding_all_records']} s, "
            f"the run's gradient pass {r['seconds']['stages'].get('gradients')} s"
            for r in reports
        )
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["mix4", "skills4"])
    parser.add_argument("--per-label", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any config key, e.g. data.max_length=64"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/out/targeted-selection"))
    parser.add_argument("--results", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    reports = [bench_one(name, args.per_label, seed, args) for name in args.datasets for seed in args.seeds]
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(args.results / "targeted-selection.json", {"reports": reports})
    (args.results / "targeted-selection.md").write_text(markdown(reports))
    print(markdown(reports))


if __name__ == "__main__":
    main()
