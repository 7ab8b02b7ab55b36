"""`gradientspace` command line: each subcommand loads a config and calls one API function."""

from __future__ import annotations

import argparse
import sys
import warnings

from gradientspace.config import (
    ConfigError,
    RunConfig,
    config_from_run,
    config_keys,
    configuration_markdown,
    key_default,
    key_help,
    load_config,
)
from gradientspace.experts.strategies import GENERALIST, ROUTED, STRATEGIES, routed
from gradientspace.serving.backends import BACKENDS

# flag → dotted config key; flags left unset keep the YAML (or default) value
CLUSTER_FLAGS = {
    "model": "model.name",
    "data": "data.path",
    "out": "out",
    "k": "cluster.k",
    "method": "cluster.method",
    "seed": "seed",
    "tokens": "gradients.tokens",
    "rank": "sketch.rank",
    "max_length": "data.max_length",
    "limit": "data.limit",
    "projection_dim": "cluster.projection_dim",
    "batch_size": "gradients.batch_size",
}
EXPERTS_FLAGS = {"strategies": "experts.strategies", "epochs": "experts.epochs"}
EVALUATE_FLAGS = {"data": "evaluate.data", "limit": "evaluate.limit"}
SKIP_BAD = {
    "skip_bad": "data.skip_bad"
}  # a store_true flag: set only when given (see `_overrides`), so not in the maps above


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


def _help_from_config(parser: argparse.ArgumentParser, flags: dict[str, str]) -> None:
    """Each flag that sets a config key shows that key's help from config.py, the one place it is written,
    after any note of the flag's own."""
    for action in parser._actions:
        if action.dest in flags:
            key = flags[action.dest]
            text = f"{key_help(key)} [config key {key}, default {key_default(key)}]"
            action.help = (f"{action.help}. {text}" if action.help else text).replace(
                "%", "%%"
            )  # argparse %-formats help


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", help="YAML config file (relative paths in it are read against its folder); flags override it"
    )
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set sketch.internal_rank=128",
    )


def cmd_models(args: argparse.Namespace) -> int:
    from gradientspace.models.loading import alias_status, cache_dir

    print(f"{'alias':<14} {'status':<38} description")
    for row in alias_status():
        print(f"{row['alias']:<14} {row['status']:<38} {row['description']}")
    print(
        f"\nAny Hugging Face model id or local folder works too. Converted models are cached in {cache_dir()} (GRADIENTSPACE_CACHE)."
    )
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
        raise ConfigError(
            f"{flag}: {unknown[0] if unknown else text!r} is not a strategy (choose from {', '.join(STRATEGIES)})"
        )
    return names


def cmd_cluster(args: argparse.Namespace) -> int:
    from gradientspace.commands import run_until

    config = load_config(args.config, _overrides(args, CLUSTER_FLAGS))
    outcome = run_until(config, "cluster", overwrite=args.overwrite)["cluster"]
    if not outcome.labels:  # a non-zero rank of a multi-process run
        return 0
    print(f"\nmethod {outcome.method}   K = {outcome.k}   samples {len(outcome.labels)}   run {outcome.run_dir}")
    print(f"cluster sizes: {outcome.sizes}")
    for cluster, terms in outcome.terms.items():
        print(f"  cluster {cluster:<3} {', '.join(terms) or '(no words to name it by)'}")
    for name, value in outcome.metrics.items():
        print(f"  {name:<24} {value:.4f}" if isinstance(value, float) else f"  {name:<24} {value}")
    if outcome.interference:
        print(
            "interference with the rest of the data (mean-gradient cosine: low = conflict; energy outside the others' span: high = own directions):"
        )
        for cluster, row in outcome.interference.items():
            print(
                f"  cluster {cluster:<3} size {row['size']:<6} cosine {row['mean_cosine']:+.3f}   outside energy {row['outside_energy']:.3f}"
            )
    print(f"assignments: {outcome.run_dir / 'clusters.jsonl'}")
    return 0


def _run_config(args: argparse.Namespace, flags: dict[str, str] | None = None):
    return config_from_run(args.run, _overrides(args, flags or {}))


def _verified(run):
    """A command that only reads a run first checks that every finished stage's outputs are as written."""
    out = run.config.out
    run.directory.verify(f"`gradientspace run` on the run's config (or `gradientspace evaluate {out}`) rebuilds it")
    return run


def _opened(config):
    """The run object of a command that reads a run (its directory opened once, handed to what the command calls)."""
    from gradientspace.runner import Run

    return _verified(Run(config))


def cmd_train_experts(args: argparse.Namespace) -> int:
    from gradientspace.commands import run_until

    _strategies(args.strategies)
    config = _run_config(args, EXPERTS_FLAGS)
    for strategy, summary in run_until(config, "experts", overwrite=args.overwrite).get("experts", {}).items():
        empty = f"  no training records (the generalist serves them): {summary['empty']}" if summary["empty"] else ""
        print(f"{strategy:<20} groups {summary['groups']}  sizes {summary['sizes']}{empty}")
    print(f"experts: {config.out}/experts/<k>/ (peft adapter folders); baselines: {config.out}/strategies/")
    return 0


def cmd_train_router(args: argparse.Namespace) -> int:
    from gradientspace.commands import run_until

    _strategies(args.strategies)
    config = _run_config(args, {"strategies": "experts.strategies"})
    result = run_until(config, "router", overwrite=args.overwrite)
    for strategy, summary in result.get("router", {}).items():
        print(
            f"router for {strategy:<20} held-out accuracy {summary['heldout_accuracy']:.3f}   train accuracy {summary['train_accuracy']:.3f}"
        )
    for strategy, decisions in result.get("kept", {}).items():
        print(_decision_line(strategy, decisions))
    return 0


def _decision_line(strategy: str, decisions: dict[str, dict]) -> str:
    """One line per strategy: each group's served blend weight λ (0: the fall-back adapter serves it) and why."""
    return f"{strategy}: " + "; ".join(f"group {g} λ = {d['lambda']:g} ({d['reason']})" for g, d in decisions.items())


def cmd_generate(args: argparse.Namespace) -> int:
    import json

    from gradientspace.data.loading import load_records
    from gradientspace.data.records import Record
    from gradientspace.routing.model import StrategyModel, serving_names
    from gradientspace.runner import Run

    config = _run_config(args, {"threshold": "router.threshold"})
    if (args.prompt is None) == (args.data is None):
        raise ConfigError("give exactly one of --prompt TEXT or --data FILE")
    if args.prompt is not None and not args.prompt.strip():
        raise ConfigError("--prompt: the prompt is empty; give the text to answer")
    if args.max_new_tokens < 1:  # not a config key, so no `check` covers it
        raise ConfigError(f"--max-new-tokens: {args.max_new_tokens} must be at least 1")
    _strategies(args.strategy, "--strategy")
    run = Run(config)
    run.directory.require("warmup", f"run `gradientspace run` or `gradientspace train-router {config.out}` first")
    _verified(run)
    if args.prompt:
        records = [Record("prompt", [{"role": "user", "content": args.prompt}], "")]
    else:  # the run's column mapping applies, as it does to evaluate.data
        records = load_records(args.data, skip_bad=args.skip_bad, prompts_only=True, columns=config.data.columns)[0]
    engine = StrategyModel(run, [args.strategy])
    public = {adapter: name for name, adapter in serving_names(engine, args.strategy).items()}
    for record, generation in zip(
        records, engine.generate(args.strategy, records, args.max_new_tokens, progress=len(records) > 1)
    ):
        print(
            json.dumps(
                {
                    "id": record.id,
                    "model": public.get(generation.adapter, generation.adapter or "ensemble"),
                    "expert": generation.expert,
                    "probability": round(generation.probability, 4),
                    "fallback": generation.fallback,
                    "text": generation.text,
                }
            )
        )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from gradientspace.commands import run_until
    from gradientspace.evaluation.evaluate import markdown_table

    strategies = _strategies(args.strategies)
    config = _run_config(args, EVALUATE_FLAGS)
    results = run_until(config, "evaluate", strategies, overwrite=args.overwrite).get("eval")
    if results is None:  # a non-zero rank of a multi-process run
        return 0
    print(markdown_table(results, strategies or list(config.experts.strategies)))
    print(f"results: {config.out}/eval.json, {config.out}/eval.md")
    return 0


def cmd_config_keys(args: argparse.Namespace) -> int:
    import textwrap

    if args.markdown:
        sys.stdout.write(configuration_markdown())
        return 0
    for key, _ in config_keys():
        print(f"{key}: {key_default(key)}")
        print(
            textwrap.fill(
                key_help(key),
                width=100,
                initial_indent="    ",
                subsequent_indent="    ",
                break_on_hyphens=False,
                break_long_words=False,
            )
        )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from gradientspace.export import export_run

    config = config_from_run(args.run)
    _strategies(args.strategy, "--strategy")
    out = export_run(_opened(config), args.out, args.format, args.strategy)
    sketch = (
        "sketch/coordinates.npy and sketch/info.json"
        if (out / "sketch").exists()
        else f"no sketch coordinates (the run made no gradient pass: `cluster.method: {config.cluster.method}`)"
    )
    print(f"exported {args.run} to {out}: records ({args.format}), clusters.json, {sketch}")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from gradientspace.selection import select_records

    summary = select_records(_opened(config_from_run(args.run)), args.target, args.top, args.out)
    labels = f"; labels: {', '.join(f'{k} {v}' for k, v in summary['labels'].items())}" if summary["labels"] else ""
    print(
        f"selected {summary['chosen']} of {summary['of']} records for the {summary['targets']} target records (mean cosine "
        f"{summary['best_score']:+.3f} … {summary['last_score']:+.3f}){labels}: {args.out}"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Read-only: draws what the run holds so far, and writes nothing to its manifest (the run may be in progress elsewhere)."""
    from gradientspace.evaluation.report import make_report

    run = _opened(config_from_run(args.run))  # a missing or corrupt run fails here, in one line
    for figure in make_report(run):
        print(figure)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import time

    from gradientspace.commands import run_all
    from gradientspace.evaluation.evaluate import markdown_table
    from gradientspace.runner import Run

    config = load_config(args.config, _overrides(args, {"out": "out"}))
    started, start = time.time(), time.perf_counter()
    run = Run(config)
    result = run_all(run, overwrite=args.overwrite)
    if result.get("eval") is None:  # a non-zero rank of a multi-process run
        return 0
    print("\n" + markdown_table(result["eval"], list(config.experts.strategies)))

    manifest = run.directory.manifest
    for strategy, entry in manifest["stages"].items():
        if entry.get("groups") and strategy.startswith("keep/"):
            print(_decision_line(strategy.split("/", 1)[1], entry["groups"]))
    latency = result["eval"].get("latency", {})
    single_ms = (latency.get(GENERALIST) or {}).get("total_first_token_ms")
    if single_ms:
        print(
            "time to first token vs single: "
            + ", ".join(
                f"{s} {v['total_first_token_ms'] / single_ms:.2f}×"
                for s, v in latency.items()
                if v.get("total_first_token_ms")
            )
        )
    stages = manifest["stages"]
    ran = {name: entry for name, entry in stages.items() if entry.get("finished_at", 0) >= started}
    print(
        "seconds per stage run now: "
        + (", ".join(f"{name} {entry.get('seconds', 0):.0f}" for name, entry in ran.items()) or "none")
    )
    skipped = [name for name in stages if name not in ran]
    if skipped:
        print(f"skipped (done earlier, same inputs): {', '.join(skipped)}")
    print(
        f"total {time.perf_counter() - start:.0f} s.  Run: {config.out}   report: {config.out}/report.html   results: {config.out}/eval.md"
    )
    return 0


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="re-run stages of an existing run whose config differs, instead of refusing",
    )
    parser.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error"
    )


SERVE_FLAGS = {"host": "serve.host", "port": "serve.port", "threshold": "router.threshold"}

GENERATE_OUTPUT = """Prints one JSON line per prompt: {"id", "model", "expert", "probability", "fallback", "text"}. `model`
is the adapter that answered, named as `serve` names it in its responses (`expert-2`, or the fall-back:
`generalist` or `single-continued`); `expert` is the cluster the router chose, and -1 means its top
probability was below router.threshold; `fallback` says why the fall-back answered (`below_threshold`,
`expert_not_served`: the cluster's expert was not kept, or `unknown_label`: `--strategy oracle` and a
`source` no expert was trained on), else null. `probability` is the router's top
probability (1.0 for a strategy without a router)."""


def _require_serve_extra() -> None:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "httpx", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"this command needs {', '.join(missing)}: pip install 'gradientspace[serve]'")


def cmd_serve(args: argparse.Namespace) -> int:
    _require_serve_extra()
    from gradientspace.serving.server import serve

    serve(_opened(_run_config(args, {**SERVE_FLAGS, "max_batch_size": "serve.max_batch_size"})), args.api_key)
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    _require_serve_extra()
    from gradientspace.serving.route_proxy import route

    route(_opened(_run_config(args, SERVE_FLAGS)), args.upstream, args.backend, args.api_key, args.upstream_api_key)
    return 0


def cmd_backend_command(args: argparse.Namespace) -> int:
    from gradientspace.serving.backends import backend_command

    if args.port is not None and not 1 <= args.port <= 65535:  # not a config key, so no `check` covers it
        raise ConfigError(f"--port: {args.port} is not a TCP port (1 to 65535)")
    print(backend_command(_opened(_run_config(args)), args.backend, args.port))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gradientspace",
        description="Cluster instruction data by exact LoRA gradients; one LoRA expert per cluster.",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="list built-in model aliases and whether each is available")
    models.set_defaults(func=cmd_models)

    cluster = sub.add_parser("cluster", help="warm-up, per-sample gradients, online SVD sketch, clusters")
    _add_common(cluster)
    cluster.add_argument("--model")
    cluster.add_argument("--data")
    cluster.add_argument("--k")
    cluster.add_argument("--method")
    cluster.add_argument("--out")
    cluster.add_argument("--tokens")
    cluster.add_argument("--rank", type=int)
    cluster.add_argument("--projection-dim", type=int)
    cluster.add_argument("--max-length", type=int)
    cluster.add_argument("--batch-size", type=int)
    cluster.add_argument("--limit", type=int)
    cluster.add_argument("--seed", type=int)
    cluster.add_argument("--skip-bad", action="store_true")
    _add_run_flags(cluster)
    _help_from_config(cluster, {**CLUSTER_FLAGS, **SKIP_BAD})
    cluster.set_defaults(func=cmd_cluster)

    run = sub.add_parser(
        "run", help="the whole pipeline from one YAML config: cluster, experts, router, evaluate, report"
    )
    run.add_argument("config", help="YAML config file (relative paths in it are read against its folder)")
    run.add_argument("--out", help="overrides the config's `out`")
    run.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any config key (`gradientspace config-keys` lists them)",
    )
    _add_run_flags(run)
    _help_from_config(run, {"out": "out"})
    run.set_defaults(func=cmd_run)

    def run_command(name: str, help_text: str, func) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text)
        command.add_argument("run", help="run directory made by `gradientspace cluster` or `run`")
        command.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key of the run")
        _add_run_flags(command)
        command.set_defaults(func=func)
        return command

    experts = run_command(
        "train-experts", "one LoRA expert per cluster, plus the comparison strategies' adapters", cmd_train_experts
    )
    experts.add_argument("--strategies", help="comma-separated")
    experts.add_argument("--epochs", type=int)
    _help_from_config(experts, EXPERTS_FLAGS)
    router = run_command("train-router", "the MiniLM router: prompt → expert", cmd_train_router)
    router.add_argument(
        "--strategies", help=f"comma-separated; those with a router: {', '.join(routed(list(STRATEGIES), RunConfig()))}"
    )
    _help_from_config(router, {"strategies": "experts.strategies"})
    generate = run_command("generate", "route each prompt to one expert and generate", cmd_generate)
    generate.description = GENERATE_OUTPUT
    generate.add_argument("--prompt", help="one prompt (or give --data)")
    generate.add_argument("--data", help="a data file of prompts (records' outputs are ignored)")
    generate.add_argument(
        "--strategy",
        default=ROUTED,
        help=f"how each prompt picks its adapter, one of {', '.join(STRATEGIES)} (default routed)",
    )
    generate.add_argument("--threshold", type=float, help="for this command only")
    generate.add_argument(
        "--max-new-tokens", type=int, default=128, help="most tokens generated per prompt (greedy; default 128)"
    )
    generate.add_argument(
        "--skip-bad", action="store_true", help="skip malformed records of --data (and count them) instead of stopping"
    )
    _help_from_config(generate, {"threshold": "router.threshold"})
    evaluate = run_command("evaluate", "held-out NLL, accuracy and latency of every strategy", cmd_evaluate)
    evaluate.add_argument("--data")
    evaluate.add_argument(
        "--strategies", help="comma-separated, from the run's experts.strategies (default: all of them)"
    )
    evaluate.add_argument("--limit", type=int)
    _help_from_config(evaluate, EVALUATE_FLAGS)
    serve = run_command(
        "serve", "OpenAI-compatible server: each request routed to one expert, concurrent requests batched", cmd_serve
    )
    route = run_command(
        "route", "only the router, in front of a vLLM / SGLang server that holds the experts", cmd_route
    )
    for command in (serve, route):
        command.add_argument("--host")
        command.add_argument("--port", type=int)
        command.add_argument("--threshold", type=float)
        command.add_argument(
            "--api-key",
            help="require `Authorization: Bearer KEY` on every /v1 route (default: $GRADIENTSPACE_API_KEY; unset: open)",
        )
        _help_from_config(command, SERVE_FLAGS)
    serve.add_argument("--max-batch-size", type=int)
    _help_from_config(serve, {"max_batch_size": "serve.max_batch_size"})
    route.add_argument(
        "--upstream", required=True, help="base URL of the vLLM / SGLang server, e.g. http://127.0.0.1:8001"
    )
    route.add_argument(
        "--backend",
        required=True,
        choices=list(BACKENDS),
        help="which server --upstream is (they name adapters differently)",
    )
    route.add_argument(
        "--upstream-api-key",
        help="the key the upstream requires, sent as `Authorization: Bearer KEY` with the start-up check "
        "and every forwarded request (default: $GRADIENTSPACE_UPSTREAM_API_KEY); clients' keys are never forwarded",
    )
    backend = run_command(
        "backend-command", "print the vLLM / SGLang command that serves the run's adapters", cmd_backend_command
    )
    backend.add_argument("--backend", required=True, choices=list(BACKENDS), help="the server to print the command for")
    backend.add_argument("--port", type=int, help="port the backend listens on (its own default when left out)")

    def reading_command(name: str, help_text: str, func, run_help: str) -> argparse.ArgumentParser:
        """A command that only reads a run (no config flags, nothing rebuilt)."""
        command = sub.add_parser(name, help=help_text)
        command.add_argument("run", help=run_help)
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error"
        )
        command.set_defaults(func=func)
        return command

    reading_command("report", "PNG figures of a run and one self-contained report.html", cmd_report, "run directory")
    export = reading_command(
        "export",
        "the training records with their cluster, sketch coordinates and serving adapter, "
        "as a datasets folder (or Parquet, JSONL) and a .npy memory map",
        cmd_export,
        "run directory (clustered at least)",
    )
    export.add_argument("--out", required=True, help="a new (or empty) folder to write the export into")
    export.add_argument(
        "--format",
        choices=["datasets", "parquet", "jsonl"],
        default="datasets",
        help="how the records are written (default datasets: a folder `datasets.load_from_disk` reads)",
    )
    export.add_argument(
        "--strategy",
        default=ROUTED,
        help=f"whose served adapter the `adapter` column names (default {ROUTED})",
    )

    select = reading_command(
        "select",
        "the training records most like a target task's, by gradient similarity in the sketch (LESS), "
        "written in the data file's own layout",
        cmd_select,
        "run directory (clustered at least)",
    )
    select.add_argument(
        "--target",
        required=True,
        help="a data file of examples of the task you care about (any layout `data.path` reads; "
        "the run's data.columns apply)",
    )
    select.add_argument(
        "--top", required=True, help="how many records to keep: a count (200) or a share of the run's records (5%%)"
    )
    select.add_argument("--out", required=True, help="a new .jsonl, .json or .parquet file for the chosen records")

    keys = sub.add_parser(
        "config-keys", help="every config key with its default and help (YAML sections, `--set KEY=VALUE`)"
    )
    keys.add_argument(
        "--markdown", action="store_true", help="print them as docs/configuration.md (one table per section)"
    )
    keys.set_defaults(func=cmd_config_keys)
    return parser


def _error(message: str) -> None:
    # one line, whatever the message held, in one write: under torchrun every rank may say it at once into the same
    # pipe, and `print` writes the text and its newline apart, so two ranks' lines could run into one
    sys.stderr.write(" ".join(str(message).split()) + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input ends in one line on stderr and exit 2, a run busy with another command in exit 75
    (EX_TEMPFAIL: try again later), any other failure in exit 1 (`--debug`: traceback)."""
    from gradientspace import distributed
    from gradientspace.data.records import DataError
    from gradientspace.models.loading import ModelError
    from gradientspace.runs import RunBusy, RunError
    from gradientspace.serving.backends import BackendError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    # peft 0.21 (the newest) reads transformers 5's deprecated `is_gradient_checkpointing` alias on
    # every model it wraps (PeftModel.__init__), so each command printed a FutureWarning about code
    # that is not ours. Only that message is filtered, and only here: the command line owns its
    # process's warning policy; the library installs no filter for the programs that import it.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    try:
        args = build_parser().parse_args(argv)
        code = args.func(args)
        distributed.close()
        return code
    except UsageError as err:
        _error(str(err))
        return 2
    except SystemExit as exit:  # --help
        return int(exit.code or 0)
    except RunBusy as err:
        if debug:
            raise
        _error(f"gradientspace: error: {err}")
        # every rank raised this together (rank 0's refusal, broadcast by `runs.locked`), so all can meet here: each
        # has said why it stops before any leaves, and torchrun, which stops the others when one exits, cuts no one short
        distributed.barrier()
        distributed.close()
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
