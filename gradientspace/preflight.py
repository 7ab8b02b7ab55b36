"""Checks that run before any expensive work, so a bad run fails in seconds with one line.

`config.validate` (run by `load_config`) checks what the config alone can tell. These checks
need more, and all of it is cheap: the model name against the aliases, local folders and the
Hugging Face cache; the package `model.quantization` needs; `data.max_length` against the
tokenizer's chat template; the data's records and K against their number and their distinct
contents; the test data; the output directory being new, empty or a run (never a folder of the
user's), writable, and holding none of the input files; and an existing run in that directory.
Nothing here writes, so a command that fails its checks leaves the run directory (and its
manifest) as it was; the run's lock is taken only after them (`commands.run_until`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from gradientspace.clustering.partitioners import GRADIENT_METHODS
from gradientspace.config import ConfigError, RunConfig, sharding_problem
from gradientspace.data.loading import data_path_problem, fingerprint, is_hub_id, load_records
from gradientspace.data.recipes import RECIPES
from gradientspace.data.records import BadRecord, DataError, Record, check_columns
from gradientspace.data.tokens import template_overhead
from gradientspace.experts.strategies import get
from gradientspace.models.loading import check_model_name, load_tokenizer, quantization_problem
from gradientspace.runner import Run
from gradientspace.runs import LOCK_NAME, is_run_manifest, read_manifest

# The sections that decide the clustering stages (data, warm-up, gradients, cluster): a run made
# with other values there is another run. Later sections (experts, router, evaluate) may change
# on an existing run; their stages re-run.
RUN_IDENTITY = ("seed", "model", "data", "warmup", "gradients", "sketch", "cluster")
NOT_IDENTITY = {
    "gradients.checkpoint_every",
    "gradients.shard_model",
    "data.path",
}  # when state is saved, whether the base is sharded (the same gradients); the data's content is compared instead


def check_output_dir(out: str) -> None:
    """`out` must be a new or empty folder, or a run (its manifest says so), and writable; creates nothing.

    As Hugging Face Trainer refuses a non-empty `output_dir` that holds no checkpoint to resume,
    a folder with anything else in it is refused: the run would write its `samples.jsonl`,
    `clusters.jsonl`, `manifest.json`, `eval.*`, `report.html` and `report/` over the user's files.
    `--overwrite` does not change this (it re-runs a run's stages; it never adopts a folder).
    """
    path = Path(out).expanduser().absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"config key `out`: {out} cannot be a run directory: {existing} is a file")
    if existing == path:
        entries = sorted(
            p.name for p in path.iterdir() if p.name != LOCK_NAME
        )  # a lock alone: a run that stopped before its manifest
        manifest = path / "manifest.json"
        if entries and not manifest.exists():
            shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
            raise ConfigError(
                f"config key `out`: {out} is not empty ({shown}) and is not a gradientspace run (no manifest.json); "
                "give a new or empty folder, so that no file of yours is overwritten"
            )
        if entries and not is_run_manifest(
            read_manifest(manifest)
        ):  # a manifest that is not JSON fails here, naming it
            raise ConfigError(
                f"config key `out`: {manifest} was not written by gradientspace (it has no `config` and `stages`); "
                "give a new or empty folder, so that no file of yours is overwritten"
            )
    try:
        handle, probe = tempfile.mkstemp(prefix=".gradientspace-write-test-", dir=existing)
    except OSError as err:
        raise ConfigError(f"config key `out`: cannot write in {existing}: {err.strerror}") from None
    os.close(handle)
    os.unlink(probe)


def check_inputs_outside_run(config: RunConfig, evaluate: bool) -> None:
    """A file the user gives is never in the run directory, where the run's own files would replace it,
    and the run is never inside a data folder, whose content (and so the run's key) its files would change."""
    out = Path(config.out).expanduser().resolve()
    inputs = [("data.path", config.data.path)] + ([("evaluate.data", config.evaluate.data)] if evaluate else [])
    for key, path in inputs:
        problem = data_path_problem(path)  # before resolving it: a loop of links would end in a bare RuntimeError
        if problem:
            raise ConfigError(f"config key `{key}`: {problem}")
        given = Path(path).expanduser().resolve()
        if path not in RECIPES and out in given.parents:
            raise ConfigError(
                f"config key `{key}`: {path} lies inside the run directory {config.out}, which holds only what the run writes; "
                "move the file out of it"
            )
        if path not in RECIPES and given.is_dir() and (given == out or given in out.parents):
            raise ConfigError(
                f"config key `out`: {config.out} lies inside the data folder {path} (`{key}`); choose a run directory outside it"
            )


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        flat.update(_flat(value, f"{key}.") if isinstance(value, dict) else {key: value})
    return flat


def check_existing_run(command: Run, overwrite: bool) -> None:
    """Refuse an output directory that holds a run made with another config for its clustering stages."""
    config, run = command.config, command.directory  # a corrupt manifest.json fails here, naming the file
    done = [s for s in ("data", "warmup", "gradients", "cluster") if run.stage_entry(s).get("done")]
    if overwrite or not done or not isinstance(run.manifest.get("config"), dict):
        return
    before, now = _flat(run.manifest["config"]), _flat(config.to_dict())
    at_default = _flat(RunConfig().to_dict())
    differing = [
        f"{key} {before.get(key)!r} → {now.get(key)!r}"
        for key in sorted(set(before) | set(now))
        if key.split(".")[0] in RUN_IDENTITY
        and key not in NOT_IDENTITY
        and before.get(key) != now.get(key)
        and not (key not in before and now.get(key) == at_default.get(key))  # a key added since, left at its default
    ]
    recorded = run.stage_entry("data").get("inputs", {}).get("data content")
    if before.get("data.path") != config.data.path and recorded not in (
        None,
        fingerprint(config.data.path, config.data.subset, config.data.split),
    ):
        differing.insert(0, f"data.path {before.get('data.path')!r} → {config.data.path!r} (other content)")
    if differing:
        raise ConfigError(
            f"{config.out} holds a run whose {', '.join(done)} stages used another config: {'; '.join(differing)}. "
            "Pass --overwrite to re-run them with this config, or choose another output directory"
        )


def check_max_length(config: RunConfig, tokenizer) -> None:
    """A sample must keep the chat template's fixed part plus at least one prompt and one response token."""
    needed = template_overhead(tokenizer) + 2
    if config.data.max_length < needed:
        raise ConfigError(
            f"config key `data.max_length`: {config.data.max_length} tokens cannot hold the chat template of `{config.model.name}` "
            f"({needed - 2} tokens) plus a prompt and a response; use at least {needed}"
        )


def _path_exists(path: str, key: str) -> None:
    if path not in RECIPES and not is_hub_id(path) and not Path(path).exists():
        raise ConfigError(
            f"config key `{key}`: {path} does not exist (give a .jsonl/.json/.parquet file, "
            f"a saved datasets folder, or one of {', '.join(RECIPES)})"
        )


def check_records(config: RunConfig, run) -> Sequence[Record]:
    """Load and validate every training record (through the run, which keeps them); check K and the strategies against them."""
    _path_exists(config.data.path, "data.path")
    data = config.data
    records = run.records
    check_k(config, records)
    problem = next(filter(None, (get(s).check_records(records, data.path) for s in config.experts.strategies)), None)
    if problem:
        raise ConfigError(problem)
    return records


def distinct_records(records: Sequence[Record], config: RunConfig, enough: int) -> int:
    """How many records differ in what the clustering reads (the prompt, and the response when its tokens carry the loss), counting up to `enough`."""
    reads_response = config.cluster.method in GRADIENT_METHODS and config.gradients.tokens == "response"
    seen: set[str] = set()
    for record in records:
        seen.add(json.dumps([record.messages, record.response if reads_response else None]))
        if len(seen) >= enough:
            break
    return len(seen)


def check_k(config: RunConfig, records: Sequence[Record]) -> None:
    """K clusters need K distinct points, and `k: auto` at least 3 (its silhouette scores 2 ≤ K < N): else clusters come out empty.

    `k: auto` searches 2..min(`cluster.k_max`, N − 1), so a `k_max` above the data is no error.
    """
    k, n, path = config.cluster.k, len(records), config.data.path
    if isinstance(k, int) and k > n:
        raise ConfigError(f"config key `cluster.k`: {k} clusters for only {n} records in {path}")
    if config.cluster.method == "random":  # a balanced random assignment fills every cluster whatever the records hold
        return
    needed = 3 if k == "auto" else k
    distinct = distinct_records(records, config, needed)
    if distinct < needed:
        what = (
            "`auto` needs at least 3 distinct records (its silhouette scores 2 ≤ K < N)"
            if k == "auto"
            else f"{k} clusters need {k} distinct records"
        )
        have = (
            f"{path} has only {n}"
            if distinct == n
            else f"the {n} records of {path} hold only {distinct} (the others repeat them)"
        )
        raise ConfigError(f"config key `cluster.k`: {what}, and {have}; some clusters would be empty")


def check_eval_data(config: RunConfig) -> None:
    _path_exists(config.evaluate.data, "evaluate.data")
    if config.evaluate.data not in RECIPES:  # built-in recipes are generated, not read
        try:
            load_records(
                config.evaluate.data,
                limit=config.evaluate.limit,
                columns=config.data.columns,
                subset=config.data.subset,
                split=config.evaluate.split,
            )
        except BadRecord as err:  # evaluation never skips: a score over part of the test data would not say so
            raise DataError(f"{err.where_what} (the test data is scored whole: mend or remove the record)") from None


def check_trackers(report_to: list[str]) -> None:
    """Each tracker of `train.report_to` is one transformers knows and can import here: a missing package would
    otherwise stop the first adapter's training, after the gradient pass."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    for tracker in report_to:
        if tracker not in INTEGRATION_TO_CALLBACK:
            raise ConfigError(
                f"config key `train.report_to`: `{tracker}` is not a tracker transformers knows "
                f"(choose from {', '.join(sorted(INTEGRATION_TO_CALLBACK))})"
            )
        if tracker not in get_available_reporting_integrations():
            extra = " (pip install 'gradientspace[tensorboard]')" if tracker == "tensorboard" else ""
            raise ConfigError(f"config key `train.report_to`: `{tracker}` is not installed{extra}")


def check_quantization(config: RunConfig) -> None:
    """`model.quantization: nf4` needs bitsandbytes (the `quantization` extra): without it the base model's first load,
    after the data stage, would stop on transformers' ImportError."""
    problem = quantization_problem(config.model.quantization)
    if problem:
        raise ConfigError(problem)


def preflight(run, *, evaluate: bool = False, overwrite: bool = False) -> None:
    """Every check that can fail before the expensive work, cheapest first; raises on the first failure.

    `run` is the command's `runner.Run`: the records are read through it, so the stages reuse them."""
    config = run.config
    check_model_name(config.model.name)
    check_quantization(config)
    if problem := sharding_problem(config.gradients, run.world_size):
        raise ConfigError(problem)
    check_columns(config.data.columns)
    check_trackers(config.train.report_to)
    check_output_dir(config.out)
    check_inputs_outside_run(config, evaluate)
    check_existing_run(run, overwrite)
    if evaluate:
        check_eval_data(config)
    check_records(config, run)
    check_max_length(config, load_tokenizer(config.model.name))
