"""Cluster quality of every method against the hidden `source` labels, on real data.

For each data set (../shared/data/mix4 and skills4: N per label from train.jsonl, seeded) and each
gradient token option, ONE gradient pass (w.r.t. the warm-up adapter) feeds every gradient
method at once: the online SVD at r = 16 and r = 32 (internal rank 4r), Rademacher projections
to k = 16 and k = 8192, and the exact full gradients. MiniLM embeddings and random labels need no
gradients. k-means runs with several seeds; NMI / ARI / purity are averaged over them.

    python bench/clusters.py --datasets mix4 skills4 --per-label 60 --seeds 5 > bench/out/clusters.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from gradientspace.clustering.kmeans import (
    RademacherProjector,
    label_metrics,
    random_labels,
    spherical_kmeans,
    within_cluster_cosine,
)
from gradientspace.clustering.stages import gradient_batches, train_warmup
from gradientspace.config import load_config
from gradientspace.data.loading import load_records
from gradientspace.gradients.engine import layout_of, stream_gradients
from gradientspace.gradients.sketch import OnlineSVD
from gradientspace.models.encoder import embed_texts
from gradientspace.models.loading import load_lora_model
from gradientspace.runs import config_hash, peak_memory_mb

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def balanced_subset(records, per_label: int, seed: int):
    by_label: dict[str, list] = {}
    for record in records:
        by_label.setdefault(record.source, []).append(record)
    chosen = []
    for label in sorted(by_label):
        chosen.extend(random.Random(f"{seed}-{label}").sample(by_label[label], per_label))
    random.Random(seed).shuffle(chosen)
    return chosen


class Timed:
    """A consumer plus the seconds spent feeding it."""

    def __init__(self, consumer):
        self.consumer, self.seconds = consumer, 0.0

    def add(self, rows, indices):
        start = time.perf_counter()
        self.consumer.add(rows, indices)
        self.seconds += time.perf_counter() - start


def kmeans_scores(features, sources, k, seeds, coordinates=None):
    runs = []
    for seed in range(seeds):
        labels = spherical_kmeans(features, k, seed) if features is not None else random_labels(len(sources), k, seed)
        scores = label_metrics(labels, sources)
        if coordinates is not None:
            scores["within_cluster_cosine"] = within_cluster_cosine(coordinates, labels)
        runs.append(scores)
    summary = {}
    for name in runs[0]:
        values = [r[name] for r in runs]
        summary[name] = round(statistics.mean(values), 4)
        summary[f"{name}_std"] = round(statistics.pstdev(values), 4)
    return summary


def bench_dataset(name: str, args) -> dict:
    records, _ = load_records(str(SHARED / name / "train.jsonl"))
    records = balanced_subset(records, args.per_label, seed=0)
    sources = [r.source for r in records]
    k = len(set(sources))
    out: dict = {"samples": len(records), "labels": sorted(set(sources)), "k": k, "by_tokens": {}}

    start = time.perf_counter()
    embeddings = embed_texts([r.prompt_text for r in records], torch.device("cpu"))
    out["embedding"] = {
        **kmeans_scores(embeddings, sources, k, args.seeds),
        "seconds": round(time.perf_counter() - start, 2),
    }
    out["random"] = kmeans_scores(None, sources, k, args.seeds)
    print(f"[{name}] embedding NMI {out['embedding']['nmi']}", file=sys.stderr)

    for tokens in args.tokens:
        config = load_config(
            None,
            {
                "model.name": args.model,
                "data.path": name,
                "data.max_length": args.max_length,
                "out": str(args.out / name),
                "gradients.tokens": tokens,
                "gradients.batch_size": args.batch_size,
            },
        )
        loaded = load_lora_model(config.model, seed=config.seed)
        warm_start = time.perf_counter()
        warmup_dir = (
            args.out / name / "warmup"
        )  # its checkpoints are named by this key: a re-run of the same settings resumes
        train_warmup(warmup_dir, config, records, loaded, config_hash(config.to_dict(), [r.id for r in records]))
        warmup_seconds = time.perf_counter() - warm_start
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(loaded.model, load_file(str(warmup_dir / "adapter_model.safetensors")))
        dim = layout_of(loaded.model).dim
        consumers = {
            "sketch_r16": Timed(OnlineSVD(dim, 16, 64, block_size=64)),
            "sketch_r32": Timed(OnlineSVD(dim, 32, 128, block_size=64)),
            "random_projection_k16": Timed(RademacherProjector(dim, 16, seed=0)),
            "random_projection_k8192": Timed(RademacherProjector(dim, 8192, seed=0)),
        }
        exact_rows: dict[int, torch.Tensor] = {}
        _, batches = gradient_batches(records, loaded, config)
        pass_start = time.perf_counter()
        gradient_seconds = 0.0
        tick = time.perf_counter()
        for _, indices, grads, _ in stream_gradients(
            loaded.model, batches, loaded.tokenizer.pad_token_id, loaded.device, normalize=True
        ):
            gradient_seconds += time.perf_counter() - tick
            for consumer in consumers.values():
                consumer.add(grads, indices)
            for i, row in zip(indices, grads):
                exact_rows[i] = row.clone()
            tick = time.perf_counter()
        exact = torch.stack([exact_rows[i] for i in range(len(records))])
        result = {
            "warmup_seconds": round(warmup_seconds, 1),
            "gradient_seconds": round(gradient_seconds, 1),
            "pass_seconds": round(time.perf_counter() - pass_start, 1),
            "dim": dim,
            "methods": {},
        }

        for key, timed in consumers.items():
            start = time.perf_counter()
            if key.startswith("sketch"):
                sketch = timed.consumer.result()
                order = torch.argsort(sketch.indices)
                features = sketch.coordinates[order]
                extra = {
                    "captured_energy": round(sketch.captured_energy, 4),
                    "state_mb": round((dim + len(records)) * timed.consumer.internal_rank * 8 / 2**20, 1),
                }
            else:
                features, indices = timed.consumer.result()
                features = features[torch.argsort(torch.tensor(indices))]
                extra = {
                    "state_mb": round((timed.consumer.block_rows + len(records)) * timed.consumer.k * 4 / 2**20, 1)
                }
            feed = timed.seconds + time.perf_counter() - start
            scores = kmeans_scores(features, sources, k, args.seeds, coordinates=None)
            result["methods"][key] = {**scores, **extra, "feature_seconds": round(feed, 2)}
        start = time.perf_counter()
        result["methods"]["exact_full_gradients"] = {
            **kmeans_scores(exact, sources, k, args.seeds),
            "state_mb": round(exact.numel() * 4 / 2**20, 1),
            "kmeans_seconds": round(time.perf_counter() - start, 2),
        }
        result.update(peak_memory_mb())
        out["by_tokens"][tokens] = result
        print(
            f"[{name}/{tokens}] " + ", ".join(f"{m}: NMI {v['nmi']}" for m, v in result["methods"].items()),
            file=sys.stderr,
        )
        del exact, exact_rows, loaded
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", nargs="+", default=["mix4", "skills4"])
    parser.add_argument("--tokens", nargs="+", default=["response", "instruction"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--per-label", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench/out/clusters-runs"))
    args = parser.parse_args()
    missing = [d for d in args.datasets if not (SHARED / d / "train.jsonl").exists()]
    if missing:
        sys.exit(
            f"bench/clusters.py needs {', '.join(str(SHARED / d) for d in missing)} (development data, not shipped with the package)"
        )
    report = {
        "model": args.model,
        "per_label": args.per_label,
        "seeds": args.seeds,
        "max_length": args.max_length,
        "datasets": {},
    }
    for name in args.datasets:
        report["datasets"][name] = bench_dataset(name, args)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
