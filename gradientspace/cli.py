"""`gradientspace` command line: each subcommand loads a config and calls one API function."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, config_from_run, load_config
from .strategies import GENERALIST, STRATEGIES, get

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


class UsageError(Exception):
    """A bad command line; argparse's message, made one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage and the message on two lines; we keep one
        raise UsageError(f"{self.prog}: error: {message} (see `{self.prog} --help`)")


def _strategies(text: str | None, flag: str = "--strategies") -> list[str] | None:
    if text is None:
        return None
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown or not names:
        raise ConfigError(f"{flag}: {unknown[0] if unknown else text!r} is not a strategy (choose from {', '.join(STRATEGIES)})")
    return names


def cmd_cluster(args: argparse.Namespace) -> int:
    from .workflow import run_until

    config = load_config(args.config, _overrides(args, CLUSTER_FLAGS))
    outcome = run_until(config, "cluster", overwrite=args.overwrite)["cluster"]
    if not outcome.labels:  # a non-zero rank of a multi-process run
        return 0
    print(f"\nmethod {outcome.method}   K = {outcome.k}   samples {len(outcome.labels)}   run {outcome.run_dir}")
    print(f"cluster sizes: {outcome.sizes}")
    for name, value in outcome.metrics.items():
        print(f"  {name:<24} {value:.4f}" if isinstance(value, float) else f"  {name:<24} {value}")
    print(f"assignments: {outcome.run_dir / 'clusters.jsonl'}")
    return 0


def _run_config(args: argparse.Namespace, flags: dict[str, str] | None = None):
    return config_from_run(args.run, _overrides(args, flags or {}))


def cmd_train_experts(args: argparse.Namespace) -> int:
    from .workflow import run_until

    _strategies(args.strategies)
    config = _run_config(args, {"strategies": "experts.strategies", "epochs": "experts.epochs"})
    for strategy, summary in run_until(config, "experts", overwrite=args.overwrite).get("experts", {}).items():
        fallback = "" if get(strategy).one_adapter else f"  fell back to the generalist {summary['fallback'] or 'none'}"
        print(f"{strategy:<20} groups {summary['groups']}  sizes {summary['sizes']}{fallback}")
    print(f"experts: {config.out}/experts/<k>/ (peft adapter folders); baselines: {config.out}/strategies/")
    return 0


def cmd_train_router(args: argparse.Namespace) -> int:
    from .workflow import run_until

    _strategies(args.strategies)
    config = _run_config(args, {"strategies": "experts.strategies"})
    for strategy, summary in run_until(config, "router", overwrite=args.overwrite).get("router", {}).items():
        print(f"router for {strategy:<20} held-out accuracy {summary['heldout_accuracy']:.3f}   train accuracy {summary['train_accuracy']:.3f}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import json

    from .data import Record, load_records
    from .inference import StrategyModel
    from .runs import Run

    config = _run_config(args, {"threshold": "router.threshold"})
    if (args.prompt is None) == (args.data is None):
        raise ConfigError("give exactly one of --prompt TEXT or --data FILE")
    if args.max_new_tokens < 1:  # not a config key, so no `check` covers it
        raise ConfigError(f"--max-new-tokens: {args.max_new_tokens} must be at least 1")
    _strategies(args.strategy, "--strategy")
    Run(config.out).require("warmup", f"run `gradientspace run` or `gradientspace train-router {config.out}` first")
    records = [Record("prompt", [{"role": "user", "content": args.prompt}], "")] if args.prompt else load_records(args.data, skip_bad=args.skip_bad, prompts_only=True)[0]
    engine = StrategyModel(config, [args.strategy])
    for record, generation in zip(records, engine.generate(args.strategy, records, args.max_new_tokens, progress=len(records) > 1)):
        print(json.dumps({"id": record.id, "expert": generation.expert, "probability": round(generation.probability, 4), "text": generation.text}))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import markdown_table
    from .workflow import run_until

    strategies = _strategies(args.strategies)
    config = _run_config(args, {"data": "evaluate.data", "limit": "evaluate.limit"})
    results = run_until(config, "evaluate", strategies, overwrite=args.overwrite).get("eval")
    if results is None:  # a non-zero rank of a multi-process run
        return 0
    print(markdown_table(results, strategies or list(config.experts.strategies)))
    print(f"results: {config.out}/eval.json, {config.out}/eval.md")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Read-only: draws what the run holds so far, and writes nothing to its manifest (the run may be in progress elsewhere)."""
    from .report import make_report

    config_from_run(args.run)  # a missing or corrupt run fails here, in one line
    for figure in make_report(args.run):
        print(figure)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import time

    from .evaluate import markdown_table
    from .runs import Run
    from .workflow import run_all

    config = load_config(args.config, _overrides(args, {"out": "out"}))
    started, start = time.time(), time.perf_counter()
    result = run_all(config, overwrite=args.overwrite)
    if result.get("eval") is None:  # a non-zero rank of a multi-process run
        return 0
    print("\n" + markdown_table(result["eval"], list(config.experts.strategies)))

    manifest = Run(config.out).manifest
    for strategy, summary in manifest.get("experts", {}).items():
        if strategy in config.experts.strategies and strategy != GENERALIST:
            kept = [g for g in summary["groups"] if g not in summary["fallback"]]
            gains = ", ".join(f"{g}: {e['initial_eval_loss']:.3f} → {e['best_eval_loss']:.3f}" for g, e in summary["experts"].items()
                              if e.get("initial_eval_loss") is not None and e.get("best_eval_loss") is not None)
            print(f"{strategy}: experts kept {kept or 'none'}, fell back to the generalist {summary['fallback'] or 'none'} "
                  f"(validation NLL generalist → expert: {gains})")
    latency = result["eval"].get("latency", {})
    single_ms = (latency.get("single") or {}).get("total_first_token_ms")
    if single_ms:
        print("time to first token vs single: " + ", ".join(f"{s} {v['total_first_token_ms'] / single_ms:.2f}×" for s, v in latency.items()
                                                             if v.get("total_first_token_ms")))
    stages = manifest["stages"]
    ran = {name: entry for name, entry in stages.items() if entry.get("finished_at", 0) >= started}
    print("seconds per stage run now: " + (", ".join(f"{name} {entry.get('seconds', 0):.0f}" for name, entry in ran.items()) or "none"))
    skipped = [name for name in stages if name not in ran]
    if skipped:
        print(f"skipped (done earlier, same inputs): {', '.join(skipped)}")
    print(f"total {time.perf_counter() - start:.0f} s.  Run: {config.out}   report: {config.out}/report.html   results: {config.out}/eval.md")
    return 0


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="re-run stages of an existing run whose config differs, instead of refusing")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")


SERVE_FLAGS = {"host": "serve.host", "port": "serve.port", "threshold": "router.threshold"}


def _require_serve_extra() -> None:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "httpx") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"this command needs {', '.join(missing)}: pip install 'gradientspace[serve]'")


def cmd_serve(args: argparse.Namespace) -> int:
    _require_serve_extra()
    from .serving.server import serve

    serve(_run_config(args, {**SERVE_FLAGS, "max_batch_size": "serve.max_batch_size"}))
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    _require_serve_extra()
    from .serving.route_proxy import route

    route(_run_config(args, SERVE_FLAGS), args.upstream, args.backend)
    return 0


def cmd_backend_command(args: argparse.Namespace) -> int:
    from .serving.backends import backend_command

    if args.port is not None and not 1 <= args.port <= 65535:  # not a config key, so no `check` covers it
        raise ConfigError(f"--port: {args.port} is not a TCP port (1 to 65535)")
    print(backend_command(args.run, _run_config(args).model.name, args.backend, args.port))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gradientspace", description="Cluster instruction data by exact LoRA gradients; one LoRA expert per cluster.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
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
    _add_run_flags(cluster)
    cluster.set_defaults(func=cmd_cluster)

    run = sub.add_parser("run", help="the whole pipeline from one YAML config: cluster, experts, router, evaluate, report")
    run.add_argument("config", help="YAML config")
    run.add_argument("--out", help="run directory (overrides the config's `out`)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE")
    _add_run_flags(run)
    run.set_defaults(func=cmd_run)

    def run_command(name: str, help_text: str, func) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text)
        command.add_argument("run", help="run directory made by `gradientspace cluster` or `run`")
        command.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key of the run")
        _add_run_flags(command)
        command.set_defaults(func=func)
        return command

    experts = run_command("train-experts", "one LoRA expert per cluster, plus the comparison strategies' adapters", cmd_train_experts)
    experts.add_argument("--strategies", help=f"comma-separated, from {', '.join(STRATEGIES)}")
    experts.add_argument("--epochs", type=int)
    router = run_command("train-router", "the MiniLM router: prompt → expert", cmd_train_router)
    router.add_argument("--strategies", help=f"comma-separated; those with a router: {', '.join(n for n, s in STRATEGIES.items() if s.routed)}")
    generate = run_command("generate", "route each prompt to one expert and generate", cmd_generate)
    generate.add_argument("--prompt")
    generate.add_argument("--data", help="a data file of prompts (records' outputs are ignored)")
    generate.add_argument("--strategy", default="routed")
    generate.add_argument("--threshold", type=float, help="router confidence below which the generalist answers (default: the one chosen on validation)")
    generate.add_argument("--max-new-tokens", type=int, default=128)
    generate.add_argument("--skip-bad", action="store_true")
    evaluate = run_command("evaluate", "held-out NLL, accuracy and latency of every strategy", cmd_evaluate)
    evaluate.add_argument("--data", help="test data (default: the config's evaluate.data)")
    evaluate.add_argument("--strategies", help="comma-separated (default: experts.strategies)")
    evaluate.add_argument("--limit", type=int)
    serve = run_command("serve", "OpenAI-compatible server: each request routed to one expert, concurrent requests batched", cmd_serve)
    route = run_command("route", "only the router, in front of a vLLM / SGLang server that holds the experts", cmd_route)
    for command in (serve, route):
        command.add_argument("--host", help="listen address (default 127.0.0.1)")
        command.add_argument("--port", type=int, help="listen port (default 8000)")
        command.add_argument("--threshold", type=float, help="router confidence below which the generalist answers")
    serve.add_argument("--max-batch-size", type=int, help="most requests decoded together")
    route.add_argument("--upstream", required=True, help="base URL of the vLLM / SGLang server, e.g. http://127.0.0.1:8001")
    route.add_argument("--backend", required=True, choices=["vllm", "sglang"])
    backend = run_command("backend-command", "print the vLLM / SGLang command that serves the run's adapters", cmd_backend_command)
    backend.add_argument("--backend", required=True, choices=["vllm", "sglang"])
    backend.add_argument("--port", type=int, help="port the backend listens on (its own default when left out)")
    
    report = sub.add_parser("report", help="PNG figures of a run and one self-contained report.html")
    report.add_argument("run")
    report.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    report.set_defaults(func=cmd_report)
    return parser


def _error(message: str) -> None:
    print(" ".join(str(message).split()), file=sys.stderr)  # one line, whatever the message held


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input ends in one line on stderr and exit 2, a run busy with another command in exit 75
    (EX_TEMPFAIL: try again later), any other failure in exit 1 (`--debug`: traceback)."""
    from .data import DataError
    from .models import ModelError
    from .runs import RunBusy, RunError
    from .serving.backends import BackendError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UsageError as err:
        _error(str(err))
        return 2
    except SystemExit as exit:  # --help
        return int(exit.code or 0)
    except RunBusy as err:
        if debug:
            raise
        _error(f"gradientspace: error: {err}")
        return 75
    except (ConfigError, DataError, ModelError, RunError, FileNotFoundError, BackendError) as err:
        if debug:
            raise
        _error(f"gradientspace: error: {err}")
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as err:  # a bug or an environment failure: still one line unless --debug
        if debug:
            raise
        _error(f"gradientspace: error: {type(err).__name__}: {err} (re-run with --debug for the traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
