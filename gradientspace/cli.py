"""`gradientspace` command line: each subcommand loads a config and calls one API function."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config

# flag → dotted config key; flags left unset keep the YAML (or default) value
CLUSTER_FLAGS = {
    "model": "model.name", "data": "data.path", "out": "out", "k": "cluster.k", "method": "cluster.method",
    "seed": "seed", "tokens": "gradients.tokens", "rank": "sketch.rank", "max_length": "data.max_length",
    "limit": "data.limit", "projection_dim": "cluster.projection_dim", "batch_size": "gradients.batch_size",
}


def _overrides(args: argparse.Namespace, flags: dict[str, str]) -> dict[str, object]:
    overrides = {key: getattr(args, flag) for flag, key in flags.items() if getattr(args, flag, None) is not None}
    if getattr(args, "skip_bad", False):
        overrides["data.skip_bad"] = True
    for item in getattr(args, "set", None) or []:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value
    return overrides


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file; flags override it")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config key, e.g. --set sketch.internal_rank=128")


def cmd_models(args: argparse.Namespace) -> int:
    from .models import alias_status, cache_dir

    print(f"{'alias':<14} {'status':<38} description")
    for row in alias_status():
        print(f"{row['alias']:<14} {row['status']:<38} {row['description']}")
    print(f"\nAny Hugging Face model id or local folder works too. Converted models are cached in {cache_dir()} (GRADIENTSPACE_CACHE).")
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    from .pipeline import cluster

    config = load_config(args.config, _overrides(args, CLUSTER_FLAGS))
    outcome = cluster(config)
    if not outcome.labels:  # a non-zero rank of a multi-process run
        return 0
    print(f"\nmethod {outcome.method}   K = {outcome.k}   samples {len(outcome.labels)}   run {outcome.run_dir}")
    print(f"cluster sizes: {outcome.sizes}")
    for name, value in outcome.metrics.items():
        print(f"  {name:<24} {value:.4f}" if isinstance(value, float) else f"  {name:<24} {value}")
    print(f"assignments: {outcome.run_dir / 'clusters.jsonl'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradientspace", description="Cluster instruction data by exact LoRA gradients; one LoRA expert per cluster.")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="list built-in model aliases and whether each is available")
    models.set_defaults(func=cmd_models)

    cluster = sub.add_parser("cluster", help="warm-up, per-sample gradients, online SVD sketch, clusters")
    _add_common(cluster)
    cluster.add_argument("--model", help="HF id, local folder or alias (default smollm2-135m)")
    cluster.add_argument("--data", help="JSONL/JSON/Parquet file, saved datasets folder, or mix4-packaged")
    cluster.add_argument("--k", help="number of clusters, or `auto`")
    cluster.add_argument("--method", help="gradientspace | random-projection | embedding | random | exact")
    cluster.add_argument("--out", help="run directory (re-running with the same config resumes)")
    cluster.add_argument("--tokens", help="loss tokens for gradients: response | instruction")
    cluster.add_argument("--rank", type=int, help="reported sketch rank r")
    cluster.add_argument("--projection-dim", type=int, help="random-projection dimension")
    cluster.add_argument("--max-length", type=int)
    cluster.add_argument("--batch-size", type=int, help="samples per gradient batch")
    cluster.add_argument("--limit", type=int, help="use only the first N records")
    cluster.add_argument("--seed", type=int)
    cluster.add_argument("--skip-bad", action="store_true", help="skip malformed records instead of stopping")
    cluster.set_defaults(func=cmd_cluster)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .data import DataError
    from .models import ModelError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, ModelError) as err:
        print(f"gradientspace: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
