"""The adapters of every strategy: the generalist, one LoRA expert per cluster, and the controls.

A strategy's *partition* assigns every training record to a group; one adapter is trained per
group on that group's training part, with early stopping on that group's share of the validation
split (`data.validation_fraction`, the same records for every strategy, never trained on).

The default protocol (`experts.init: generalist`): the `single` adapter (the generalist: one LoRA
on all the data, what a user would otherwise train) is trained to convergence first; every expert
then branches from it and continues on its own group at a lower learning rate. An expert that
does not beat the generalist on its group's validation split is dropped (*falls back*): that
group is served by the generalist, so routed inference is never worse than the generalist on
validation by construction. The decision and both validation NLLs are recorded in
`partition.json` and the manifest. `experts.equal_budget` instead trains every adapter a fixed
number of epochs with no early stopping and no fall-back (equal tokens: budget curves).

| strategy | partition | folder |
| --- | --- | --- |
| single | everything in one group (the generalist) | `RUN/strategies/single/0/` |
| single-wide | everything, LoRA rank K·r (the same total parameters as K experts) | `RUN/strategies/single-wide/0/` |
| routed, gradient-oracle, elrea-ensemble | gradient clusters (`clusters.jsonl`) | `RUN/experts/<k>/` |
| oracle | the true `source` labels (the ceiling) | `RUN/strategies/oracle/<k>/` |
| random-clusters | balanced random groups, same K (the control) | `RUN/strategies/random-clusters/<k>/` |
| embedding-clusters | k-means on MiniLM prompt embeddings | `RUN/strategies/embedding-clusters/<k>/` |
| projection-clusters | k-means on random-projected gradients | `RUN/strategies/projection-clusters/<k>/` |
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from .cluster import random_labels, spherical_kmeans
from .config import RunConfig
from .data import Record, tokenize, validation_ids
from .models import LoadedModel, load_lora_model
from .pipeline import strategy_projection_dim, warmup_key
from .runs import Run, config_hash, write_json
from .train import TrainPlan, train_adapter

GRADIENT_CLUSTER_STRATEGIES = ("routed", "gradient-oracle", "elrea-ensemble")
GENERALIST = "single"
ONE_GROUP_STRATEGIES = ("single", "single-wide")


def strategy_dir(run: Run, strategy: str) -> Path:
    return run.path("experts") if strategy in GRADIENT_CLUSTER_STRATEGIES else run.path("strategies", strategy)


def partition(run: Run, config: RunConfig, records: list[Record], strategy: str) -> tuple[list[int], list[str]]:
    """(group of each training record, group names) for a strategy."""
    n = len(records)
    if strategy in GRADIENT_CLUSTER_STRATEGIES:
        path = run.path("clusters.jsonl")
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run `gradientspace cluster` first")
        by_id = {row["id"]: row["cluster"] for row in map(json.loads, path.read_text().splitlines())}
        labels = [by_id[r.id] for r in records]
    elif strategy in ONE_GROUP_STRATEGIES:
        labels = [0] * n
    elif strategy == "oracle":
        if any(r.source is None for r in records):
            raise ValueError("strategy `oracle` needs a `source` label on every training record")
        names = sorted({r.source for r in records})
        return [names.index(r.source) for r in records], names
    elif strategy == "random-clusters":
        labels = random_labels(n, cluster_count(run), config.seed).tolist()
    elif strategy == "embedding-clusters":
        from .encoder import embed_texts

        features = embed_texts([r.prompt_text for r in records], torch.device("cpu"))
        labels = spherical_kmeans(features, cluster_count(run), config.seed, config.cluster.n_init).tolist()
    elif strategy == "projection-clusters":
        path = run.path(f"projection-{strategy_projection_dim(config)}.safetensors")
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: the gradient pass makes it when `projection-clusters` is among experts.strategies")
        labels = spherical_kmeans(load_file(str(path))["features"], cluster_count(run), config.seed, config.cluster.n_init).tolist()
    else:
        raise ValueError(f"strategy `{strategy}` trains no experts")
    k = max(labels) + 1
    return [int(l) for l in labels], [str(i) for i in range(k)]


def cluster_count(run: Run) -> int:
    return int(run.stage_entry("cluster")["k"])


def fresh_lora_state(model, seed: int) -> dict[str, torch.Tensor]:
    """A newly initialised LoRA (B = 0), seeded: the starting point of `experts.init: fresh`."""
    from peft import get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapter in module.lora_A:
                module.reset_lora_parameters(adapter, True)
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def generalist_folder(run: Run) -> Path:
    return strategy_dir(run, GENERALIST) / "0"


def wide_model_config(config: RunConfig, k: int):
    """LoRA rank K·r with the same alpha / r scale: as many trainable parameters as K experts."""
    from dataclasses import replace

    return replace(config.model, lora_rank=config.model.lora_rank * k, lora_alpha=config.model.lora_alpha * k)


def _plan(config: RunConfig, branch: bool) -> TrainPlan:
    experts = config.experts
    epochs = experts.branch_epochs if branch and not experts.equal_budget else experts.epochs
    return TrainPlan(epochs, experts.branch_learning_rate if branch else experts.learning_rate, experts.batch_size, config.seed,
                     schedule=experts.schedule, warmup_ratio=experts.warmup_ratio,
                     patience=None if experts.equal_budget else experts.patience, snapshot_epochs=tuple(experts.snapshot_epochs))


def _start(run: Run, config: RunConfig, strategy: str, fresh_state: dict) -> tuple[dict, str | None]:
    """(initial LoRA weights, the stage key of the adapter they come from) for one strategy's adapters."""
    if strategy in ONE_GROUP_STRATEGIES or config.experts.init == "fresh":
        return fresh_state, None
    if config.experts.init == "warmup":
        return load_file(str(run.path("warmup", "adapter_model.safetensors"))), run.stage_entry("warmup").get("key")
    return load_file(str(generalist_folder(run) / "adapter_model.safetensors")), run.stage_entry(f"experts/{GENERALIST}/0").get("key")


def train_strategy(run: Run, config: RunConfig, records: list[Record], strategy: str, loaded: LoadedModel, fresh_state: dict) -> dict:
    """Train (or resume, or skip) every adapter of one strategy, deciding keep-or-fall-back; returns its summary."""
    from peft import set_peft_model_state_dict

    labels, names = partition(run, config, records, strategy)
    folder = strategy_dir(run, strategy)
    held = validation_ids(records, config.data.validation_fraction, config.seed)
    branch = config.experts.init == "generalist" and strategy not in ONE_GROUP_STRATEGIES
    init, init_key = _start(run, config, strategy, fresh_state)
    plan = _plan(config, branch)
    # what the adapters of this strategy depend on: the generalist ignores how experts branch from it
    ignored = ("strategies", "init", "branch_epochs", "branch_learning_rate") if strategy in ONE_GROUP_STRATEGIES else ("strategies",)
    experts_section = {k: v for k, v in asdict(config.experts).items() if k not in ignored}
    summary = {"groups": names, "sizes": np.bincount(labels, minlength=len(names)).tolist(), "experts": {}, "fallback": []}
    for group, name in enumerate(names):
        members = [r for r, l in zip(records, labels) if l == group]
        train = [r for r in members if r.id not in held]
        validation = [r for r in members if r.id in held]
        stage = f"experts/{strategy}/{name}"
        key = config_hash(warmup_key(config), asdict(config.model), experts_section, init_key, sorted(r.id for r in train),
                          sorted(r.id for r in validation))
        if not train:
            summary["experts"][name] = {"samples": 0, "kept": False}
            summary["fallback"].append(name)
            continue
        if not run.is_done(stage, key):
            set_peft_model_state_dict(loaded.model, init)
            to_examples = lambda rs: tokenize(rs, loaded.tokenizer, config.data.max_length, "response")
            with run.stage(stage, key) as record:
                result = train_adapter(loaded.model, to_examples(train), to_examples(validation), loaded.tokenizer.pad_token_id,
                                       loaded.device, plan, folder / name, key, desc=f"{strategy} adapter {name}")
                record.update(result, outputs=[str((folder / name / "adapter_model.safetensors").relative_to(run.root))])
        entry = run.stage_entry(stage)
        before, after = entry.get("initial_eval_loss"), entry.get("best_eval_loss")
        # Only a branch can lose to where it started; the generalist and fixed-budget adapters are always kept.
        kept = not branch or config.experts.equal_budget or before is None or after is None or after < before
        summary["experts"][name] = {k: entry.get(k) for k in ("samples", "validation_samples", "steps", "epochs_run", "best_epoch", "tokens",
                                                               "train_seconds", "initial_eval_loss", "best_eval_loss")}
        summary["experts"][name]["kept"] = kept
        if not kept:
            summary["fallback"].append(name)
    write_json(folder / "partition.json", {"strategy": strategy, "groups": names, "fallback": summary["fallback"],
                                           "assignment": {r.id: l for r, l in zip(records, labels)}})
    return summary


def trained_strategies(strategies: list[str]) -> list[str]:
    """Strategies that need adapters of their own, the generalist first (the others branch from it and fall back to it)."""
    wanted = ["routed" if s in GRADIENT_CLUSTER_STRATEGIES else s for s in strategies]
    return list(dict.fromkeys([GENERALIST] + wanted))


def train_experts(config: RunConfig, strategies: list[str] | None = None, loaded: LoadedModel | None = None) -> dict:
    """`gradientspace train-experts RUN`: the Python API."""
    from .pipeline import load_data

    run = Run(config.out)
    records = load_data(run, config)
    summaries = {}
    for strategy in trained_strategies(strategies or config.experts.strategies):
        wide = strategy == "single-wide"
        model_config = wide_model_config(config, cluster_count(run)) if wide else config.model
        model = load_lora_model(model_config, seed=config.seed) if wide or loaded is None else loaded
        if not wide:
            loaded = model
        summaries[strategy] = train_strategy(run, config, records, strategy, model, fresh_lora_state(model.model, config.seed))
    run.manifest.setdefault("experts", {}).update(summaries)
    run.save()
    return summaries
