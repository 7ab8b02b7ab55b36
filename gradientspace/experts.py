"""One LoRA expert per cluster, and the expert sets of the comparison strategies.

A strategy's *partition* assigns every training record to a group; one adapter is trained per
group, on that group only, for `experts.epochs` epochs. Every strategy therefore spends the
same number of epochs — the same tokens and, up to rounding per group, the same optimizer
steps — as the single adapter trained on everything, each expert in proportion to its size.

| strategy | partition | folder |
| --- | --- | --- |
| routed, elrea-ensemble | gradient clusters (`clusters.jsonl`) | `RUN/experts/<k>/` |
| single | everything in one group | `RUN/strategies/single/0/` |
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
from .data import Record, tokenize
from .models import LoadedModel, load_lora_model
from .pipeline import strategy_projection_dim, warmup_key
from .runs import Run, config_hash, write_json
from .train import TrainPlan, train_adapter

GRADIENT_CLUSTER_STRATEGIES = ("routed", "elrea-ensemble")


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
    elif strategy == "single":
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


def train_strategy(run: Run, config: RunConfig, records: list[Record], strategy: str, loaded: LoadedModel, fresh_state: dict) -> dict:
    """Train (or resume, or skip) every expert of one strategy; returns its summary."""
    from peft import set_peft_model_state_dict

    labels, names = partition(run, config, records, strategy)
    folder = strategy_dir(run, strategy)
    write_json(folder / "partition.json", {"strategy": strategy, "groups": names, "assignment": {r.id: l for r, l in zip(records, labels)}})
    experts_section = {k: v for k, v in asdict(config.experts).items() if k != "strategies"}
    summary = {"groups": names, "sizes": np.bincount(labels, minlength=len(names)).tolist(), "experts": {}}
    init = fresh_state if config.experts.init == "fresh" else load_file(str(run.path("warmup", "adapter_model.safetensors")))
    for group, name in enumerate(names):
        members = [r for r, l in zip(records, labels) if l == group]
        stage = f"experts/{strategy}/{name}"
        key = config_hash(warmup_key(config), experts_section, sorted(r.id for r in members))
        if not members:
            summary["experts"][name] = {"samples": 0}
            continue
        if not run.is_done(stage, key):
            set_peft_model_state_dict(loaded.model, init)
            examples = tokenize(members, loaded.tokenizer, config.data.max_length, "response")
            plan = TrainPlan(config.experts.epochs, config.experts.learning_rate, config.experts.batch_size, config.seed,
                             checkpoint_every=config.experts.checkpoint_every, snapshot_epochs=tuple(config.experts.snapshot_epochs))
            with run.stage(stage, key) as record:
                result = train_adapter(loaded.model, examples, loaded.tokenizer.pad_token_id, loaded.device, plan, folder / name,
                                       desc=f"{strategy} expert {name} ({len(members)} samples)")
                record.update(result, samples=len(members), outputs=[str((folder / name / "adapter_model.safetensors").relative_to(run.root))])
        summary["experts"][name] = {"samples": len(members), "steps": run.stage_entry(stage).get("steps")}
    return summary


def trained_strategies(config: RunConfig) -> list[str]:
    """Strategies that need adapters of their own (elrea-ensemble reuses the routed experts)."""
    wanted = [s if s != "elrea-ensemble" else "routed" for s in config.experts.strategies]
    return list(dict.fromkeys(wanted))


def train_experts(config: RunConfig, strategies: list[str] | None = None, loaded: LoadedModel | None = None) -> dict:
    """`gradientspace train-experts RUN`: the Python API."""
    from .pipeline import load_data

    run = Run(config.out)
    records = load_data(run, config)
    loaded = loaded or load_lora_model(config.model, seed=config.seed)
    fresh_state = fresh_lora_state(loaded.model, config.seed) if config.experts.init == "fresh" else {}
    summaries = {}
    for strategy in strategies or trained_strategies(config):
        summaries[strategy] = train_strategy(run, config, records, strategy, loaded, fresh_state)
    run.manifest.setdefault("experts", {}).update(summaries)
    run.save()
    return summaries
