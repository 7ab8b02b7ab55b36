"""Every setting of every stage, as typed dataclasses loaded from YAML.

A run's whole configuration is one `RunConfig`; each stage reads its own section. Unknown keys
are rejected with their dotted path so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names the key."""


@dataclass
class ModelConfig:
    name: str = field(default="smollm2-135m", metadata={"help": "Hugging Face id, local folder, or a built-in alias (`gradientspace models`)."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / r."})
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], metadata={"help": "Module names LoRA wraps."})
    device: str = field(default="auto", metadata={"help": "`auto` (CUDA when available, else CPU), `cpu`, `cuda`, `cuda:1`…"})


@dataclass
class DataConfig:
    path: str = field(default="mix4-packaged", metadata={"help": "JSONL/JSON/Parquet file, a saved `datasets` folder, or a built-in recipe (`mix4-packaged`)."})
    max_length: int = field(default=256, metadata={"help": "Tokens per sample after the chat template; longer samples are truncated (and counted)."})
    skip_bad: bool = field(default=False, metadata={"help": "Skip malformed records (and report how many) instead of stopping."})
    limit: int | None = field(default=None, metadata={"help": "Use only the first N records (after loading), for quick runs."})
    per_source: int = field(default=60, metadata={"help": "Records per domain for built-in recipes."})


@dataclass
class WarmupConfig:
    fraction: float = field(default=0.1, metadata={"help": "Random fraction of the data the warm-up adapter trains on (B = 0 makes A's gradient zero without it)."})
    epochs: int = field(default=1, metadata={"help": "Warm-up epochs."})
    learning_rate: float = field(default=2e-4, metadata={"help": "AdamW learning rate."})
    batch_size: int = field(default=4, metadata={"help": "Warm-up batch size."})


@dataclass
class GradientConfig:
    tokens: str = field(default="response", metadata={"help": "`response`: loss on response tokens (the training signal); `instruction`: loss on prompt tokens (ELREA style)."})
    adam_precondition: bool = field(default=False, metadata={"help": "Turn each gradient into the Adam update it would cause, using the warm-up optimizer state (as LESS does)."})
    normalize: bool = field(default=True, metadata={"help": "L2-normalise each per-sample gradient (otherwise a few large-norm samples dominate the SVD)."})
    batch_size: int = field(default=8, metadata={"help": "Samples per batched backward pass."})
    chunk_size: int = field(default=256, metadata={"help": "Samples are shuffled, then sorted by length inside chunks of this size to form batches."})
    checkpoint_every: int = field(default=50, metadata={"help": "Save the streaming state every N batches so an interrupted pass resumes."})


@dataclass
class SketchConfig:
    rank: int = field(default=16, metadata={"help": "Reported rank r of the online SVD."})
    internal_rank: int | None = field(default=None, metadata={"help": "Rank r' kept during updates (default 4·r); larger keeps the lower components accurate."})
    block_size: int = field(default=64, metadata={"help": "Gradient columns buffered per incremental SVD update."})
    dtype: str = field(default="float64", metadata={"help": "Precision of the sketch's basis (`float64` or `float32`, which halves its memory for very large d)."})


@dataclass
class ClusterConfig:
    method: str = field(default="gradientspace", metadata={"help": "gradientspace | random-projection | embedding | random | exact"})
    k: Union[int, str] = field(default=4, metadata={"help": "Number of clusters, or `auto` (silhouette over 2..k_max)."})
    k_max: int = field(default=8, metadata={"help": "Largest K tried by `k: auto`."})
    projection_dim: int | None = field(default=None, metadata={"help": "random-projection: target dimension (default: the sketch rank; LESS/ELREA use 8192)."})
    n_init: int = field(default=10, metadata={"help": "k-means restarts."})
    exact_max_bytes: int = field(default=8 * 1024**3, metadata={"help": "`exact` refuses to hold more than this many bytes of full gradients."})


STRATEGIES = ("routed", "single", "oracle", "random-clusters", "embedding-clusters", "projection-clusters", "elrea-ensemble")


@dataclass
class ExpertsConfig:
    strategies: list[str] = field(default_factory=lambda: ["routed", "single", "oracle", "random-clusters", "elrea-ensemble"], metadata={"help": f"Strategies to build and evaluate: {', '.join(STRATEGIES)}. `routed` and `elrea-ensemble` share the gradient-cluster experts."})
    init: str = field(default="warmup", metadata={"help": "`warmup`: experts start from the warm-up adapter; `fresh`: from a new LoRA (B = 0)."})
    epochs: int = field(default=2, metadata={"help": "Epochs over each expert's own cluster. Equal epochs = equal tokens and steps as the single adapter."})
    snapshot_epochs: list[int] = field(default_factory=list, metadata={"help": "Also keep each adapter as it was after these epochs (`epoch-<e>/`), for budget curves."})
    learning_rate: float = field(default=2e-4, metadata={"help": "AdamW learning rate (experts and the single adapter alike)."})
    batch_size: int = field(default=4, metadata={"help": "Training batch size."})
    checkpoint_every: int = field(default=50, metadata={"help": "Checkpoint every N optimizer steps."})


@dataclass
class RouterConfig:
    finetune_encoder: bool = field(default=False, metadata={"help": "Also fine-tune MiniLM (slower); by default only the linear head trains on frozen embeddings."})
    epochs: int = field(default=100, metadata={"help": "Head epochs on cached embeddings (3 when the encoder is fine-tuned)."})
    learning_rate: float = field(default=1e-2, metadata={"help": "Head learning rate (the encoder uses 2e-5 when fine-tuned)."})
    validation_fraction: float = field(default=0.2, metadata={"help": "Held-out share of the training prompts for router accuracy."})
    threshold: float = field(default=0.0, metadata={"help": "Below this top probability a prompt goes to the warm-up (generalist) adapter."})


@dataclass
class EvalConfig:
    data: str = field(default="mix4-packaged:test", metadata={"help": "Test data: a file or a recipe. Its `source` labels give the per-domain breakdown."})
    limit: int | None = field(default=None, metadata={"help": "Evaluate only the first N test records."})
    generate_per_domain: int = field(default=8, metadata={"help": "Test prompts per domain that are decoded for answer accuracy / ROUGE-L (decoding is the slow part)."})
    max_new_tokens: int = field(default=96, metadata={"help": "Decoding budget per prompt."})
    humaneval_problems: int = field(default=0, metadata={"help": "HumanEval problems to generate and execute when code is in the mix (0 = off)."})
    latency_prompts: int = field(default=4, metadata={"help": "Prompts timed per strategy for routing time, time to first token and tokens/s."})
    elrea_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature over standardised cosine similarities (elrea-ensemble)."})


@dataclass
class ServeConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "Address `gradientspace serve` and `route` listen on (0.0.0.0 for every interface)."})
    port: int = field(default=8000, metadata={"help": "Port `gradientspace serve` and `route` listen on."})
    max_batch_size: int = field(default=16, metadata={"help": "Most requests decoded together in one batch (mixed adapters included)."})
    batch_window_ms: float = field(default=10.0, metadata={"help": "How long the engine waits after a request arrives for others to join its batch."})
    default_max_tokens: int = field(default=256, metadata={"help": "Completion tokens when a request names no `max_tokens` (capped by the model's context)."})


@dataclass
class RunConfig:
    out: str = field(default="runs/default", metadata={"help": "Run directory."})
    seed: int = field(default=0, metadata={"help": "Seed for shuffling, warm-up, projections and k-means."})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    gradients: GradientConfig = field(default_factory=GradientConfig)
    sketch: SketchConfig = field(default_factory=SketchConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES = {
    "gradients.tokens": ("response", "instruction"),
    "sketch.dtype": ("float64", "float32"),
    "cluster.method": ("gradientspace", "random-projection", "embedding", "random", "exact"),
    "experts.init": ("warmup", "fresh"),
}
LIST_CHOICES = {"experts.strategies": STRATEGIES}


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check a YAML/CLI value against a dataclass field type; CLI strings are parsed as YAML scalars."""
    if isinstance(value, str) and hint is not str:
        parsed = yaml.safe_load(value) if value != "" else value
        if hint in (int, float, bool) or get_origin(hint) in (Union, types.UnionType, list):
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
        raise ConfigError(f"config key `{key}`: {value!r} is not one of {[getattr(o, '__name__', str(o)) for o in options]}")
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"config key `{key}`: expected a list, got {value!r}")
        (item,) = get_args(hint)
        return [_coerce(v, item, key) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
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
        raise ConfigError(f"unknown config key `{where}{unknown[0]}` (known in this section: {', '.join(sorted(names))})")
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


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None, tree: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML file (or take a ready `tree`), apply dotted-key overrides (`{"sketch.rank": 32}`), validate."""
    tree = dict(tree or {})
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(tree, dotted, value)
    config = _build(RunConfig, tree, "")
    k = config.cluster.k
    if isinstance(k, str) and k != "auto":
        raise ConfigError(f"config key `cluster.k`: {k!r} must be an integer ≥ 2 or `auto`")
    if isinstance(k, int) and k < 2:
        raise ConfigError(f"config key `cluster.k`: {k} must be at least 2")
    if not 0 < config.warmup.fraction <= 1:
        raise ConfigError(f"config key `warmup.fraction`: {config.warmup.fraction} must be in (0, 1]")
    return config


def config_from_run(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The config a run was made with (from its manifest), with overrides; `out` stays the run."""
    import json

    manifest = Path(run_dir) / "manifest.json"
    if not manifest.exists():
        raise ConfigError(f"{run_dir} is not a run directory (no manifest.json): run `gradientspace cluster --out {run_dir}` first")
    tree = json.loads(manifest.read_text()).get("config", {})
    tree["out"] = str(run_dir)
    return load_config(None, overrides, tree=tree)


def internal_rank(sketch: SketchConfig) -> int:
    return sketch.internal_rank or 4 * sketch.rank
