"""Every setting of every stage, as typed dataclasses loaded from YAML.

A run's whole configuration is one `RunConfig`; each stage reads its own section. Unknown keys
are rejected with their dotted path so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from gradientspace.data.loading import shaped_like_hub_id
from gradientspace.data.recipes import RECIPES
from gradientspace.data.records import EncodingFault, decode_utf8


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names the key."""


@dataclass
class ModelConfig:
    name: str = field(
        default="smollm2-135m",
        metadata={
            "help": "Hugging Face id, local folder, or a built-in alias (`gradientspace models`).",
            "path": "folder",
        },
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r.", "check": ">=1"})
    lora_alpha: float = field(
        default=16.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / r.", "check": ">0"}
    )
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={
            "help": "Module names LoRA wraps, or `all-linear` (peft's spelling: every Linear layer but the output head)."
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Base-model precision: `auto` (bfloat16 on a GPU that supports it, else float32), `float32`, `bfloat16`, `float16`. LoRA weights and per-sample gradients stay float32."
        },
    )
    device: str = field(
        default="auto", metadata={"help": "`auto` (CUDA when available, else CPU), `cpu`, `cuda`, `cuda:1`…"}
    )
    quantization: str = field(
        default="none",
        metadata={
            "added_later": True,
            "help": "`none`, or `nf4`: the base model's Linear layers held in 4 bits (bitsandbytes NF4, as QLoRA; transformers' `BitsAndBytesConfig`) for the gradient pass, every adapter's training, scoring and `serve`, computing in `model.dtype`'s precision; LoRA weights and per-sample gradients stay float32. Needs the `quantization` extra: pip install 'gradientspace[quantization]'.",
        },
    )


@dataclass
class DataConfig:
    path: str = field(
        default="mix4-packaged",
        metadata={
            "help": "JSONL/JSON/Parquet file, a saved `datasets` folder, a dataset id in the local Hugging Face cache (`owner/name`, with `data.subset` and `data.split`), or a built-in recipe (`mix4-packaged`).",
            "path": "data",
        },
    )
    subset: str | None = field(
        default=None,
        metadata={
            "help": "A dataset id's subset (configuration), as `datasets.load_dataset(id, subset)` names it; needed when the cache holds several."
        },
    )
    split: str = field(
        default="train",
        metadata={"help": "The split of a dataset id that the run trains on (`evaluate.split` names the test split)."},
    )
    max_length: int = field(
        default=256,
        metadata={
            "help": "Tokens per sample after the chat template; longer samples are truncated (and counted).",
            "check": ">=1",
        },
    )
    skip_bad: bool = field(
        default=False, metadata={"help": "Skip malformed records (and report how many) instead of stopping."}
    )
    limit: int | None = field(
        default=None, metadata={"help": "Use only the first N records (after loading), for quick runs.", "check": ">=1"}
    )
    per_source: int = field(default=60, metadata={"help": "Records per domain for built-in recipes.", "check": ">=1"})
    validation_fraction: float = field(
        default=0.15,
        metadata={
            "help": "Share of the training records held out (seeded, stratified by `source` when every record has one) for early stopping, keep-or-fall-back and the router threshold. No adapter trains on it; the test data is never used for a choice.",
            "check": "[0,0.9)",
        },
    )
    columns: dict[str, str] = field(
        default_factory=dict,
        metadata={
            "help": "Your columns for the record fields a layout reads, field → column: `{instruction: question, output: answer}` reads `question` as the instruction (on the command line: --set 'data.columns={instruction: question, output: answer}'). Fields: instruction, input, output, messages, prompt, completion, conversations, id, source. Applies to `evaluate.data` too."
        },
    )
    num_proc: int | None = field(
        default=None,
        metadata={
            "help": "Processes for validating and tokenising a data file (`datasets.map`); both are cached next to the Arrow copy.",
            "check": ">=1",
        },
    )


@dataclass
class WarmupConfig:
    fraction: float = field(
        default=0.1,
        metadata={
            "help": "Random fraction of the data the warm-up adapter trains on (B = 0 makes A's gradient zero without it).",
            "check": "(0,1]",
        },
    )
    epochs: int = field(default=1, metadata={"help": "Warm-up epochs.", "check": ">=1"})
    learning_rate: float = field(default=2e-4, metadata={"help": "AdamW learning rate.", "check": ">0"})
    batch_size: int = field(default=4, metadata={"help": "Warm-up batch size.", "check": ">=1"})


@dataclass
class GradientConfig:
    tokens: str = field(
        default="response",
        metadata={
            "help": "`response`: loss on response tokens (the training signal); `instruction`: loss on prompt tokens (ELREA style)."
        },
    )
    adam_precondition: bool = field(
        default=False,
        metadata={
            "help": "Turn each gradient into the Adam update it would cause, using the warm-up optimizer state (as LESS does)."
        },
    )
    normalize: bool = field(
        default=True,
        metadata={
            "help": "L2-normalise each per-sample gradient (otherwise a few large-norm samples dominate the SVD)."
        },
    )
    batch_size: int = field(default=8, metadata={"help": "Samples per batched backward pass.", "check": ">=1"})
    chunk_size: int = field(
        default=256,
        metadata={
            "help": "Samples are shuffled, then sorted by length inside chunks of this size to form batches.",
            "check": ">=1",
        },
    )
    checkpoint_every: int | None = field(
        default=None,
        metadata={
            "help": "Save the streaming state every N batches so an interrupted pass resumes (default: about every tenth of the pass, at most every 50 batches).",
            "check": ">=1",
        },
    )
    activation_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Recompute each decoder layer in backward instead of keeping its activations (less memory, ~1/3 more compute): for large models and batches."
        },
    )
    shard_model: str = field(
        default="none",
        metadata={
            "added_later": True,
            "help": "`none`: every rank holds the whole base for its shard of the gradient pass; `fsdp`: the pass runs over a copy of the base sharded across the ranks by FSDP2 (`fully_shard`, each decoder layer's weights gathered only while it runs): the same gradients, so the same clusters. Under torchrun with 2 or more processes only, and not with `model.quantization: nf4`.",
        },
    )


@dataclass
class SketchConfig:
    rank: int = field(default=16, metadata={"help": "Reported rank r of the online SVD.", "check": ">=1"})
    internal_rank: int | None = field(
        default=None,
        metadata={
            "help": "Rank r' kept during updates (default 4·r); larger keeps the lower components accurate.",
            "check": ">=1",
        },
    )
    block_size: int = field(
        default=64, metadata={"help": "Gradient columns buffered per incremental SVD update.", "check": ">=1"}
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "Precision of the sketch's basis: `float32` (d×r' of it must fit one device at d ≈ 2·10⁷) or `float64`."
        },
    )
    reorthonormalize_every: int = field(
        default=32,
        metadata={
            "help": "Make the basis orthonormal again every N updates, undoing float32 drift (0 = never).",
            "check": ">=0",
        },
    )


@dataclass
class ClusterConfig:
    # `embedding` since the pre-registered test (bench/protocol.md, H2): routed experts on embedding clusters beat those
    # on gradient clusters on fresh seeds and records (bench/results/confirmatory.md), and the protocol fixed in advance
    # that the default would then follow
    method: str = field(
        default="embedding",
        metadata={
            "help": "How the records are grouped for `routed`: `embedding` (MiniLM prompt embeddings; no gradient pass), `gradientspace` (exact LoRA gradients in the online SVD's sketch), `random-projection` (LESS-style), `random`, or `exact` (every full gradient held; small N×d only)."
        },
    )
    k: int | str = field(default=4, metadata={"help": "Number of clusters, or `auto` (silhouette over 2..k_max)."})
    k_max: int = field(default=8, metadata={"help": "Largest K tried by `k: auto`.", "check": ">=2"})
    projection_dim: int | None = field(
        default=None,
        metadata={
            "help": "random-projection: target dimension (default: the sketch rank; LESS/ELREA use 8192).",
            "check": ">=1",
        },
    )
    n_init: int = field(default=10, metadata={"help": "k-means restarts.", "check": ">=1"})
    minibatch_above: int = field(
        default=50_000,
        metadata={
            "help": "Above this many samples k-means runs on mini-batches (scikit-learn's MiniBatchKMeans).",
            "check": ">=1",
        },
    )
    silhouette_sample: int = field(
        default=10_000,
        metadata={
            "help": "`k: auto` estimates each silhouette on this many sampled rows (the exact one is O(N²)).",
            "check": ">=2",
        },
    )
    exact_max_bytes: int = field(
        default=8 * 1024**3,
        metadata={"help": "`exact` refuses to hold more than this many bytes of full gradients.", "check": ">=1"},
    )


@dataclass
class ExpertsConfig:
    strategies: list[str] = field(
        default_factory=lambda: list(DEFAULT_STRATEGIES),
        metadata={
            "help": "Strategies to build and evaluate. `single` (the generalist) is always trained: the others branch from it; the adapter they fall back to is `experts.fallback`."
        },
    )
    init: str = field(
        default="generalist",
        metadata={
            "help": "Where experts start: `generalist` (the converged single adapter; experts specialise from it), `warmup` (the warm-up adapter) or `fresh` (a new LoRA, B = 0)."
        },
    )
    epochs: int = field(
        default=6,
        metadata={
            "help": "Maximum epochs of the generalist (single) adapter; it stops earlier when validation NLL stops improving.",
            "check": ">=1",
        },
    )
    learning_rate: float = field(
        default=1e-3,
        metadata={
            "help": "Peak AdamW learning rate of the generalist (and of experts unless `init: generalist`).",
            "check": ">0",
        },
    )
    branch_epochs: int = field(
        default=2,
        metadata={"help": "Maximum epochs of each expert over its own cluster (`init: generalist`).", "check": ">=1"},
    )
    branch_learning_rate: float = field(
        default=2.5e-4,
        metadata={
            "help": "Peak learning rate of experts branched from the generalist: lower than the generalist's, since they start converged.",
            "check": ">0",
        },
    )
    schedule: str = field(
        default="cosine",
        metadata={
            "help": "Learning-rate decay after warm-up: `cosine`, `linear` or `constant_with_warmup` (transformers' names)."
        },
    )
    warmup_ratio: float = field(
        default=0.1,
        metadata={"help": "Share of each adapter's steps spent ramping the learning rate up.", "check": "[0,1)"},
    )
    patience: int = field(
        default=1,
        metadata={
            "help": "Epochs without validation improvement before an adapter stops (its best epoch is kept).",
            "check": ">=1",
        },
    )
    equal_budget: bool = field(
        default=False,
        metadata={
            "help": "Train every adapter exactly `epochs` epochs with no early stopping and no fall-back (equal tokens for every strategy: budget curves)."
        },
    )
    snapshot_epochs: list[int] = field(
        default_factory=list,
        metadata={"help": "Also keep each adapter as it was after these epochs (`epoch-<e>/`), for budget curves."},
    )
    batch_size: int = field(default=8, metadata={"help": "Training batch size.", "check": ">=1"})
    blend_weights: list[float] = field(
        default_factory=lambda: [0.25, 0.5, 0.75, 1.0],
        metadata={
            "help": "Interpolation weights λ tried per expert between the fall-back adapter's LoRA update (λ = 0, `experts.fallback`) and the expert's (λ = 1), chosen on the validation records the router sends that expert; `[1.0]` keeps or drops whole experts only.",
            "check": "(0,1]",
        },
    )
    keep: str = field(
        default="validation",
        metadata={
            "help": "How branched experts are kept: `validation` (each kept, blended or dropped on the validation records its router sends it, with the margin below) or `all` (every trained expert served whole, unchecked: for debugging, or when the validation split is too small to decide anything)."
        },
    )
    keep_confidence: float = field(
        default=0.95,
        metadata={
            "help": "An expert (or blend) is kept only if the one-sided upper confidence bound, at this level, of its paired-bootstrap NLL gain over the fall-back adapter (`experts.fallback`) on the validation records it would serve is below 0.",
            "check": "(0,1)",
        },
    )
    fallback: str = field(
        default="best-single",
        metadata={
            "help": "What answers the prompts a strategy sends to none of its experts (router below its threshold, expert not kept, group without training records): `best-single`, the single adapter of record (`single-continued` as kept on validation — trained whenever an expert can fall back — else the generalist), or `generalist` (the generalist always, as runs before this setting). Keep, blend and threshold are decided against it."
        },
    )
    keep_min_records: int = field(
        default=5,
        metadata={
            "help": "Fewest validation records an expert must serve to be kept: fewer cannot show a gain.",
            "check": ">=1",
        },
    )


@dataclass
class TrainConfig:
    activation_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Recompute each decoder layer's activations in backward while the warm-up and every adapter train (Trainer's gradient checkpointing): the same adapters, about half as much compute again over a frozen base (one more forward pass), and only each layer's input kept instead of all its activations (with `model.quantization: nf4`, what the 70 B plan of `bench/results/scale.md` needs to train on 80 GB)."
        },
    )
    report_to: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Trackers every adapter's training reports to, as transformers' Trainer names them (`tensorboard`, `wandb`, `mlflow`…; none by default). TensorBoard writes each adapter's curves under `RUN/logs/<adapter>/` (`warmup`, `<strategy>/<group>`); the others log where their own settings say, one run per adapter."
        },
    )


@dataclass
class RouterConfig:
    finetune_encoder: bool = field(
        default=False,
        metadata={
            "help": "Also fine-tune MiniLM (slower); by default only the linear head trains on frozen embeddings."
        },
    )
    epochs: int = field(
        default=100,
        metadata={"help": "Head epochs on cached embeddings (3 when the encoder is fine-tuned).", "check": ">=1"},
    )
    learning_rate: float = field(
        default=1e-2, metadata={"help": "Head learning rate (the encoder uses 2e-5 when fine-tuned).", "check": ">0"}
    )
    validation_fraction: float = field(
        default=0.2, metadata={"help": "Held-out share of the training prompts for router accuracy.", "check": "[0,1)"}
    )
    threshold: float | str = field(
        default="auto",
        metadata={
            "help": "Below this top router probability a prompt goes to the fall-back adapter (`experts.fallback`; above 1: always); `auto` picks it on the validation split (lowest NLL).",
            "check": ">=0",
        },
    )


@dataclass
class EvalConfig:
    data: str = field(
        default="mix4-packaged:test",
        metadata={
            "help": "Test data: a file, a dataset id in the local Hugging Face cache (read with `data.subset` and `evaluate.split`) or a recipe. Its `source` labels give the per-domain breakdown.",
            "path": "data",
        },
    )
    split: str = field(default="test", metadata={"help": "The split of `evaluate.data` when it is a dataset id."})
    limit: int | None = field(
        default=None, metadata={"help": "Evaluate only the first N test records.", "check": ">=1"}
    )
    generate_per_domain: int = field(
        default=8,
        metadata={
            "help": "Test prompts per domain that are decoded for answer accuracy / ROUGE-L (decoding is the slow part).",
            "check": ">=0",
        },
    )
    decode_all_domains: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Domains (`source` labels) whose every test prompt is decoded, e.g. short-answer classification."
        },
    )
    max_new_tokens: int = field(default=96, metadata={"help": "Decoding budget per prompt.", "check": ">=1"})
    metrics: list[str] = field(
        default_factory=lambda: ["exact_match", "rouge_l"],
        metadata={"help": "Answer metrics on the decoded prompts (`evaluation.metrics.METRICS`)."},
    )
    numeric_domains: list[str] = field(
        default_factory=lambda: ["math"],
        metadata={
            "help": "Domains whose answers are compared by their final number (GSM8K's `####`), and get no ROUGE-L."
        },
    )
    humaneval_problems: int = field(
        default=0,
        metadata={
            "help": "HumanEval problems to generate and execute when `evaluate.code_domain` is in the test data (0 = off).",
            "check": ">=0",
        },
    )
    code_domain: str = field(
        default="code", metadata={"help": "The domain (`source` label) HumanEval pass@1 is reported under."}
    )
    latency_prompts: int = field(
        default=4,
        metadata={
            "help": "Prompts timed per strategy for routing time, time to first token and tokens/s.",
            "check": ">=0",
        },
    )
    elrea_temperature: float = field(
        default=1.0,
        metadata={"help": "Softmax temperature over standardised cosine similarities (elrea-ensemble).", "check": ">0"},
    )


@dataclass
class ServeConfig:
    host: str = field(
        default="127.0.0.1",
        metadata={
            "help": "Address `gradientspace serve` and `route` listen on (0.0.0.0 for every interface); checked by binding it before the model loads."
        },
    )
    port: int = field(
        default=8000,
        metadata={
            "help": "Port `gradientspace serve` and `route` listen on; one already in use is refused before the model loads.",
            "check": "[1,65535]",
        },
    )
    max_batch_size: int = field(
        default=16,
        metadata={
            "help": "Most requests decoded together in one batch (mixed adapters included).",
            "check": "[1,1024]",
        },
    )
    batch_window_ms: float = field(
        default=10.0,
        metadata={
            "help": "How long the engine waits after a request arrives for others to join its batch.",
            "check": "[0,10000]",
        },
    )
    default_max_tokens: int = field(
        default=256,
        metadata={
            "help": "Completion tokens when a request names no `max_tokens` (capped by the model's context).",
            "check": "[1,1000000]",
        },
    )
    max_queued: int = field(
        default=256,
        metadata={
            "help": "Requests waiting for a batch; beyond this the server answers 503 with Retry-After.",
            "check": "[1,1000000]",
        },
    )
    max_body_bytes: int = field(
        default=1024 * 1024,
        metadata={
            "help": "Largest request body accepted; a larger one is a 413 before it is read.",
            "check": "[1024,1073741824]",
        },
    )
    max_prompt_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Longest prompt in tokens (default: the model's context less one token); a longer one is a 400.",
            "check": ">=1",
        },
    )
    upstream_timeout_s: float = field(
        default=300.0,
        metadata={
            "help": "`route`: seconds to wait for the upstream's answer to begin (a slower one is a 504) and, once streaming, for each next chunk.",
            "check": ">0",
        },
    )
    docs: bool = field(
        default=False, metadata={"help": "Serve the interactive API docs at /docs and the schema at /openapi.json."}
    )


@dataclass
class RunConfig:
    out: str = field(
        default="runs/default",
        metadata={
            "help": "Run directory; re-running with the same config resumes it, and every later command takes it.",
            "path": "file",
        },
    )
    seed: int = field(
        default=0, metadata={"help": "Seed for shuffling, warm-up, projections and k-means.", "check": ">=0"}
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    gradients: GradientConfig = field(default_factory=GradientConfig)
    sketch: SketchConfig = field(default_factory=SketchConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES = {
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "model.quantization": ("none", "nf4"),
    "gradients.tokens": ("response", "instruction"),
    "gradients.shard_model": ("none", "fsdp"),
    "sketch.dtype": ("float64", "float32"),
    "experts.init": ("generalist", "warmup", "fresh"),
    "experts.fallback": ("best-single", "generalist"),
}
# `cluster.method` is registered by `clustering/partitioners.py`, the registry of every way of grouping the records.
# The names a list key may hold, registered by the module that defines them (`experts/strategies.py` registers its registry
# under `experts.strategies`), so that a strategy added there is accepted here and this module imports no stage.
LIST_CHOICES: dict[str, Mapping[str, object]] = {}
# the strategies a run builds unless told otherwise, named by the strategy registry when it is imported (as LIST_CHOICES)
DEFAULT_STRATEGIES: list[str] = []


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check a YAML/CLI value against a dataclass field type; CLI strings are parsed as YAML scalars."""
    if isinstance(value, str) and hint is not str:
        parsed = yaml.safe_load(value) if value != "" else value
        if hint in (int, float, bool) or get_origin(hint) in (Union, types.UnionType, list, dict):
            value = parsed
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(
            f"config key `{key}`: {value!r} is not one of {[getattr(o, '__name__', str(o)) for o in options]}"
        )
    if origin is dict:
        if value is None or value == "":
            return {}
        if not isinstance(value, dict):
            raise ConfigError(
                f"config key `{key}`: expected a mapping such as {{instruction: question, output: answer}}, got {value!r}"
            )
        key_hint, value_hint = get_args(hint)
        return {_coerce(k, key_hint, key): _coerce(v, value_hint, key) for k, v in value.items()}
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"config key `{key}`: expected a list, got {value!r}")
        (item,) = get_args(hint)
        return [_coerce(v, item, key) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(f"config key `{key}`: expected {hint.__name__}, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section `{prefix or 'top level'}` must be a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key `{where}{unknown[0]}` (known in this section: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, key)
        else:
            value = _coerce(value, hint, key)
            if key in CHOICES and value not in CHOICES[key]:
                raise ConfigError(f"config key `{key}`: {value!r} is not one of {', '.join(CHOICES[key])}")
            for item in value if key in LIST_CHOICES else []:
                if item not in LIST_CHOICES[key]:
                    raise ConfigError(f"config key `{key}`: {item!r} is not one of {', '.join(LIST_CHOICES[key])}")
            kwargs[name] = value
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key `{dotted}`: `{part}` is not a section")
    node[parts[-1]] = value


# A key with `path` metadata names a file or folder. In a YAML file its relative value is read against
# the file's folder (as docker compose and mkdocs do), so a config means the same from any working
# directory; flags and `--set` values are typed by the user where they stand and stay as given.
# `folder` (model.name): only when that folder exists, since the value may be an alias or a hub id.
PATH_NOTE = "A relative path in a YAML file is read against the YAML file's folder; on the command line, against the working directory."


def _resolve_paths(tree: dict[str, Any], cls: type, base: Path) -> None:
    """Rewrite the relative `path` values of a YAML tree (in place) to be relative to `base`, the YAML's folder."""
    hints = get_type_hints(cls)
    for item in dataclasses.fields(cls):
        value = tree.get(item.name)
        if dataclasses.is_dataclass(hints[item.name]):
            if isinstance(value, dict):
                _resolve_paths(value, hints[item.name], base)
            continue
        kind = item.metadata.get("path")
        if (
            not kind
            or not isinstance(value, str)
            or not value
            or value in RECIPES
            or Path(value).expanduser().is_absolute()
        ):
            continue
        resolved = os.path.normpath(base / value)
        if kind == "data" and shaped_like_hub_id(value) and not os.path.lexists(resolved):
            continue  # a dataset id (`owner/name`), read from the Hugging Face cache
        if kind in ("file", "data") or Path(resolved).is_dir():
            tree[item.name] = resolved


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None, tree: dict[str, Any] | None = None
) -> RunConfig:
    """Read a YAML file (or take a ready `tree`), apply dotted-key overrides (`{"sketch.rank": 32}`), validate.

    Relative paths in the YAML file (`out`, `data.path`, `evaluate.data`, a local `model.name`
    folder) are read against the file's folder; overrides stay as given.
    """
    tree = dict(tree or {})
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tree = yaml.safe_load(decode_utf8(path.read_bytes())) or {}
        except EncodingFault as err:
            raise ConfigError(f"config file {path}:{err.line}: {err.what}") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {path} is a folder, not a YAML file") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        _resolve_paths(tree, RunConfig, path.parent)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(tree, dotted, value)
    config = _build(RunConfig, tree, "")
    validate(config)
    return config


def _violates(value: Any, check: str) -> bool:
    """True when `value` breaks a field's `check`: `>0`, `>=1`, or an interval such as `(0,1]`."""
    if check.startswith((">=", ">")):
        bound = float(check.lstrip(">="))
        return value < bound if check.startswith(">=") else value <= bound
    low, high = (float(x) for x in check[1:-1].split(","))
    too_low = value < low if check[0] == "[" else value <= low
    too_high = value > high if check[-1] == "]" else value >= high
    return too_low or too_high


def _describe(check: str) -> str:
    if check.startswith(">="):
        return f"at least {check[2:]}"
    if check.startswith(">"):
        return f"greater than {check[1:]}"
    return f"in {check[0]}{check[1:-1].replace(',', ', ')}{check[-1]}"


def _field_errors(section: Any, prefix: str) -> Iterator[str]:
    """Each field's `check` metadata (bounds), applied to its value (every item of a list); no number may be NaN or infinite.

    Finiteness comes first and for every field: NaN compares false with every bound, so it
    would pass each `check` and fail (or silently change the result) only once the work had begun.
    """
    for item in dataclasses.fields(section):
        value = getattr(section, item.name)
        key = f"{prefix}.{item.name}" if prefix else item.name
        if dataclasses.is_dataclass(value):
            yield from _field_errors(value, key)
            continue
        check = item.metadata.get("check")
        numbers = value if isinstance(value, list) else [value]
        for number in numbers:
            if isinstance(number, float) and not math.isfinite(number):
                yield f"config key `{key}`: {number} is not a finite number"
            elif (
                check and isinstance(number, (int, float)) and not isinstance(number, bool) and _violates(number, check)
            ):
                yield f"config key `{key}`: {number} must be {_describe(check)}"


def validate(config: RunConfig) -> None:
    """Every check that needs only the config; raises ConfigError naming the first bad dotted key.

    Checks that need the data or the tokenizer (K against the data size, `data.max_length`
    against the chat template) live in `preflight.py`.
    """
    errors = list(_field_errors(config, ""))
    k = config.cluster.k
    if isinstance(k, str) and k != "auto":
        errors.append(f"config key `cluster.k`: {k!r} must be an integer ≥ 2 or `auto`")
    if isinstance(k, int) and k < 2:
        errors.append(f"config key `cluster.k`: {k} must be at least 2")
    threshold = config.router.threshold
    if isinstance(threshold, str) and threshold != "auto":
        errors.append(f"config key `router.threshold`: {threshold!r} must be a probability or `auto`")
    if config.sketch.internal_rank is not None and config.sketch.internal_rank < config.sketch.rank:
        errors.append(
            f"config key `sketch.internal_rank`: {config.sketch.internal_rank} must be at least `sketch.rank` ({config.sketch.rank})"
        )
    if config.gradients.shard_model == "fsdp" and config.model.quantization != "none":
        errors.append(
            f"config key `gradients.shard_model`: `fsdp` cannot shard a 4-bit base (`model.quantization: {config.model.quantization}`); "
            "set one of them to `none`"
        )
    if not config.model.target_modules:
        errors.append("config key `model.target_modules`: must name at least one module")
    if not config.experts.strategies:
        errors.append(
            f"config key `experts.strategies`: must name at least one of {', '.join(LIST_CHOICES.get('experts.strategies', {}))}"
        )
    if config.experts.keep not in ("validation", "all"):
        errors.append(f"config key `experts.keep`: {config.experts.keep!r} must be `validation` or `all`")
    if not config.experts.blend_weights:
        errors.append(
            "config key `experts.blend_weights`: must name at least one weight in (0, 1] (`[1.0]`: whole experts only)"
        )
    registered = LIST_CHOICES.get("experts.strategies", {})
    errors += [
        problem
        for name in config.experts.strategies
        if name in registered
        for problem in [registered[name].check_config(config)]
        if problem
    ]  # each strategy checks what it needs
    late = [e for e in config.experts.snapshot_epochs if e > config.experts.epochs]
    if late:
        errors.append(
            f"config key `experts.snapshot_epochs`: epoch {late[0]} is after the last epoch (`experts.epochs` = {config.experts.epochs})"
        )
    if config.model.device != "auto":
        import torch

        try:
            device = torch.device(config.model.device)
        except RuntimeError:
            errors.append(
                f"config key `model.device`: {config.model.device!r} is not a device (use auto, cpu, cuda or cuda:N)"
            )
        else:
            if device.type == "cuda" and not torch.cuda.is_available():
                errors.append(
                    f"config key `model.device`: {config.model.device!r} but CUDA is not available here (use auto or cpu)"
                )
            elif device.type == "cuda" and device.index is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
                errors.append(
                    f"config key `model.device`: {config.model.device!r} would put every rank of this torchrun job on one GPU; "
                    "use auto (each rank on its LOCAL_RANK's GPU)"
                )
    if errors:
        raise ConfigError(errors[0])


def sharding_problem(gradients: GradientConfig, world_size: int) -> str | None:
    """Why `gradients.shard_model` cannot run in a job of `world_size` processes, in one line naming the key; None when it
    can. Asked before the first stage (`preflight`) and by the gradient pass, not by `validate`: a one-process command
    that only reads a run made under torchrun (`export`, `select`, `serve`) loads the same config."""
    if gradients.shard_model == "fsdp" and world_size < 2:
        return (
            "config key `gradients.shard_model`: `fsdp` shards the base over the processes of a torchrun job, and this is "
            "one process: launch with `torchrun --nproc_per_node N` (N ≥ 2), or set it to `none`"
        )
    return None


def config_from_run(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The config a run was made with (from its manifest), with overrides; `out` stays the run."""
    import json

    manifest = Path(run_dir) / "manifest.json"
    if not Path(run_dir).is_dir():
        raise ConfigError(
            f"run directory {run_dir} does not exist: make it with `gradientspace cluster --out {run_dir}` or `gradientspace run`"
        )
    if not manifest.exists():
        raise ConfigError(
            f"{run_dir} is not a run directory (no manifest.json): run `gradientspace cluster --out {run_dir}` first"
        )
    try:
        tree = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{manifest} is not valid JSON ({err}); move it away to start the run over") from None
    from gradientspace.runs import RUN_MANIFEST_FIELDS

    missing = [
        name for name in RUN_MANIFEST_FIELDS if not isinstance(tree.get(name) if isinstance(tree, dict) else None, dict)
    ]
    if missing:
        raise ConfigError(
            f"{manifest}: field `{missing[0]}` is missing or not a mapping, so {run_dir} is not a run gradientspace made "
            "(or its manifest is damaged: move it away to start the run over)"
        )
    tree = tree["config"]
    tree["out"] = str(run_dir)
    return load_config(None, overrides, tree=tree)


def internal_rank(sketch: SketchConfig) -> int:
    return sketch.internal_rank or 4 * sketch.rank


def config_keys(cls: type = RunConfig, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field]]:
    """Every settable key, dotted (`data.max_length`), with its dataclass field, in declaration order."""
    hints = get_type_hints(cls)
    for item in dataclasses.fields(cls):
        key = f"{prefix}.{item.name}" if prefix else item.name
        if dataclasses.is_dataclass(hints[item.name]):
            yield from config_keys(hints[item.name], key)
        else:
            yield key, item


def keyed(section: Any) -> dict[str, Any]:
    """A config section as stage keys hash it: a key added after runs were made (`added_later`) is left out while at its
    default, so upgrading the package does not re-run the stages of an existing run that never set it."""
    values = dataclasses.asdict(section)
    for item in dataclasses.fields(section):
        if item.metadata.get("added_later") and values[item.name] == item.default:
            del values[item.name]
    return values


def key_default(key: str) -> str:
    """A key's default as one would type it in YAML or `--set` (`null`, `true`, `[q_proj, v_proj]`)."""
    item = dict(config_keys())[key]
    value = item.default_factory() if item.default_factory is not dataclasses.MISSING else item.default
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 16).removesuffix("\n...\n").strip()


def key_help(key: str) -> str:
    """A key's help text as every place shows it (CLI flags, `gradientspace config-keys`): the field's
    own help (which names its choices), its range, and how a relative path is read."""
    item = dict(config_keys())[key]
    parts = [item.metadata["help"]]
    if key in LIST_CHOICES:
        parts.append(f"Choices: {', '.join(LIST_CHOICES[key])}.")
    if "check" in item.metadata:
        parts.append(f"Must be {_describe(item.metadata['check'])}.")
    if "path" in item.metadata:
        parts.append(PATH_NOTE)
    return " ".join(parts)


CONFIGURATION_INTRO = """One YAML file maps onto typed dataclasses (`gradientspace/config.py`, each field with its help);
unknown keys are refused with their dotted name. Flags override the file, and `--set KEY=VALUE`
overrides any key (`--set 'data.columns={instruction: question}'`). Relative paths in a YAML file
(`out`, `data.path`, `evaluate.data`, a local `model.name` folder) are read against the YAML file's
folder, so a config means the same from any working directory (`configs/demo.yaml` says
`out: ../runs/demo`); paths given as flags or `--set` are read against the working directory.

```yaml
model:    {name: smollm2-135m, lora_rank: 8, target_modules: [q_proj, k_proj, v_proj, o_proj]}
data:     {path: my_data.jsonl, max_length: 256}
sketch:   {rank: 16}          # internal_rank defaults to 4 × rank
cluster:  {method: gradientspace, k: 4}
experts:  {strategies: [routed, single]}
```"""


def configuration_markdown() -> str:
    """docs/configuration.md: every key with its default and help, written from the fields themselves so it cannot drift."""
    lines = [
        "# Configuration",
        "",
        "<!-- written by `gradientspace config-keys --markdown`: edit a key's help in gradientspace/config.py, not here -->",
        "",
        CONFIGURATION_INTRO,
    ]
    section = None
    for key, _ in config_keys():
        group = key.split(".")[0] if "." in key else "run"
        if group != section:
            lines += [
                "",
                f"## `{group}`" if group != "run" else "## The run",
                "",
                "| key | default | what it does |",
                "| --- | --- | --- |",
            ]
            section = group
        cell = key_help(key).replace("|", "\\|")
        lines.append(f"| `{key}` | `{key_default(key)}` | {cell} |")
    return "\n".join(lines) + "\n"
