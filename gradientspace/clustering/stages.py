"""The clustering pipeline: data → warm-up → gradient pass (sketch) → clusters.

Each stage requires the one before it and names its own inputs (config sections, the data file's
content); the runner (`runner.Run.build`) adds the parents' keys, skips a stage whose key matches
and whose outputs exist, and re-runs exactly what a changed input reaches. The gradient pass also
checkpoints every `gradients.checkpoint_every` batches (default: about ten times per pass).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from gradientspace import distributed
from gradientspace.clustering.kmeans import (
    ExactStore,
    RademacherProjector,
    choose_k,
    composition,
    interference,
    label_metrics,
    random_labels,
    spherical_kmeans,
    within_cluster_cosine,
)
from gradientspace.clustering.partitioners import PARTITIONERS
from gradientspace.clustering.terms import cluster_terms
from gradientspace.config import ConfigError, RunConfig, internal_rank, keyed, sharding_problem
from gradientspace.data.loading import fingerprint
from gradientspace.data.records import Record, validation_ids
from gradientspace.data.tokens import shuffled_length_batches, tokenize
from gradientspace.experts.strategies import get  # up a layer: the projections the asked strategies will read
from gradientspace.gradients.consumers import GradientConsumer
from gradientspace.gradients.engine import decoder_layers, layout_of, stream_gradients
from gradientspace.gradients.sketch import OnlineSVD, SketchResult
from gradientspace.models.loading import (
    LoadedModel,
    load_base_model,
    load_tokenizer,
    pick_device,
    resolve_dtype,
    wrap_lora,
)
from gradientspace.models.train import TrainPlan, load_adam_state, train_adapter
from gradientspace.runner import Run, as_run
from gradientspace.runs import Placement, Stage, atomic_path, config_hash, note, warn, write_jsonl

PROMPT_CHARS = 300  # of each prompt kept in samples.jsonl, for the report's cluster browser


@dataclass
class ClusterOutcome:
    run_dir: Path
    method: str
    k: int
    labels: list[int]
    ids: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    sizes: list[int] = field(default_factory=list)
    interference: dict[str, dict[str, float]] = field(default_factory=dict)  # per cluster, `cluster.interference`
    terms: dict[str, list[str]] = field(
        default_factory=dict
    )  # per cluster, its most distinctive terms (`terms.cluster_terms`)


# ---------------------------------------------------------------- data


class DataStage(Stage):
    """Records the records a run trains on (`samples.jsonl`, for the report) and how many were cut by `data.max_length`."""

    name = "data"

    def inputs(self, run: Run) -> dict[str, str]:
        """The data file's content (not its path), how it is read, and the tokenizer that truncates it."""
        config = run.config
        settings = {k: v for k, v in asdict(config.data).items() if k != "path"}
        return {
            "data content": fingerprint(config.data.path, config.data.subset, config.data.split),
            "data settings": config_hash(settings, config.seed),
            "tokenizer": config_hash(config.model.name),
        }

    def run(self, run: Run, key: str, record: dict) -> None:
        data = run.config.data
        records, report = run.loaded_records
        # counted on training samples (prompt + response), the way warm-up and experts tokenise them
        truncated = sum(e.truncated for e in tokenize(records, load_tokenizer(run.config.model.name), data.max_length))
        write_jsonl(
            run.path("samples.jsonl"),
            [
                {"index": i, "id": r.id, "source": r.source, "prompt": r.prompt_text[:PROMPT_CHARS]}
                for i, r in enumerate(records)
            ],
        )
        record.update(
            outputs=["samples.jsonl"],
            records=report.records,
            skipped_bad=report.skipped,
            first_errors=report.first_errors,
            truncated=truncated,
        )
        note(
            f"data: {report.records} records"
            + (f", {report.skipped} bad ones skipped" if report.skipped else "")
            + f", {truncated} truncated to data.max_length = {data.max_length} tokens"
            + (
                " (most samples lose tokens: consider a larger data.max_length)"
                if truncated > report.records / 2
                else ""
            )
        )


# ---------------------------------------------------------------- warm-up


def warmup_subset(records: list[Record], config: RunConfig) -> list[Record]:
    """A seeded random fraction of the training part (never the validation split)."""
    held = validation_ids(records, config.data.validation_fraction, config.seed)
    candidates = [r for r in records if r.id not in held]
    count = max(config.warmup.batch_size, round(config.warmup.fraction * len(candidates)))
    return random.Random(f"warmup-{config.seed}").sample(candidates, min(len(candidates), count))


class WarmupStage(Stage):
    """The warm-up adapter (fixed epochs on a random fraction): the point the gradients are taken at, and its Adam moments."""

    name = "warmup"
    placement = Placement.EVERY  # every rank trains it together (data-parallel): the others would only wait for it

    def requires(self, run: Run):
        return [DataStage()]

    def inputs(self, run: Run) -> dict[str, str]:
        config = run.config
        return {
            "model": config_hash(keyed(config.model)),
            "warm-up settings": config_hash(asdict(config.warmup), config.seed),
        }

    def run(self, run: Run, key: str, record: dict) -> None:
        record.update(
            train_warmup(run.path("warmup"), run.config, run.records, run.model(), key),
            outputs=["warmup/adapter_model.safetensors", "warmup/optimizer.safetensors"],
        )


def train_warmup(folder: Path, config: RunConfig, records: list[Record], loaded: LoadedModel, key: str) -> dict:
    """Train the warm-up adapter into `folder` (resuming a checkpoint of the same `key`); returns the training summary."""
    examples = tokenize(warmup_subset(records, config), loaded.tokenizer, config.data.max_length, "response")
    plan = TrainPlan(
        config.warmup.epochs,
        config.warmup.learning_rate,
        config.warmup.batch_size,
        config.seed,
        schedule="constant",
        warmup_ratio=0.0,
        patience=None,
        report_to=tuple(config.train.report_to),
        activation_checkpointing=config.train.activation_checkpointing,
        logs=folder.parent / "logs" / folder.name,
        data_parallel=distributed.world()[1] > 1,
    )
    return train_adapter(
        loaded.model, examples, [], loaded.tokenizer.pad_token_id, loaded.device, plan, folder, key, desc="warm-up"
    )


# ---------------------------------------------------------------- gradient pass


class GradientConsumers:
    """What the gradient pass feeds: the sketch always, plus a projector or an exact store if asked, and each sample's loss.

    Every part is a `GradientConsumer`, so checkpointing, restoring and merging shards treat them
    alike; each is named after the file it ends in (`RUN/<name>.safetensors`).
    """

    def __init__(
        self,
        dim: int,
        n: int,
        config: RunConfig,
        device: torch.device,
        projection_dims: tuple[int, ...] = (),
        exact: bool = False,
    ):
        self.parts: dict[str, GradientConsumer] = {
            "sketch": OnlineSVD(
                dim,
                config.sketch.rank,
                internal_rank(config.sketch),
                config.sketch.block_size,
                dtype=getattr(torch, config.sketch.dtype),
                device=device,
                reorthonormalize_every=config.sketch.reorthonormalize_every,
            )
        }
        self.parts.update({f"projection-{k}": RademacherProjector(dim, k, seed=config.seed) for k in projection_dims})
        if exact:
            self.parts["gradients-exact"] = ExactStore(dim, n, config.cluster.exact_max_bytes)
        self.losses: dict[int, float] = {}

    @property
    def sketch(self) -> OnlineSVD:
        return self.parts["sketch"]

    def add(self, rows: torch.Tensor, indices: list[int], losses: torch.Tensor) -> None:
        for part in self.parts.values():
            part.add(rows, indices)
        self.losses.update(zip(indices, losses.tolist()))

    def state(self) -> dict[str, torch.Tensor]:
        tensors = {
            f"{name}.{k}": v.detach().cpu().contiguous()
            for name, part in self.parts.items()
            for k, v in part.state_dict().items()
        }
        tensors["loss.indices"] = torch.tensor(list(self.losses), dtype=torch.long)
        tensors["loss.values"] = torch.tensor(list(self.losses.values()), dtype=torch.float64)
        return tensors

    def merge(self, other: GradientConsumers) -> GradientConsumers:
        """Fold in the consumers of a disjoint shard (another rank's batches)."""
        for name, part in self.parts.items():
            part.merge(other.parts[name])
        self.losses.update(other.losses)
        return self

    def restore(self, tensors: dict[str, torch.Tensor]) -> GradientConsumers:
        for name, part in self.parts.items():
            part.load_state_dict({k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(f"{name}.")})
        self.losses = dict(zip(tensors["loss.indices"].tolist(), tensors["loss.values"].tolist()))
        return self


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def gradient_batches(records: list[Record], loaded: LoadedModel, config: RunConfig):
    examples = tokenize(records, loaded.tokenizer, config.data.max_length, config.gradients.tokens)
    batches = shuffled_length_batches(
        examples, config.gradients.batch_size, config.gradients.chunk_size, seed=config.seed
    )
    return examples, batches


def warmup_model(run: Run, warmup_dir: Path) -> LoadedModel:
    """The base with the warm-up adapter: the model the gradient pass differentiates.

    Under `gradients.shard_model: fsdp` it is a copy of its own, sharded over the ranks and dropped with the pass:
    FSDP2's `fully_shard` turns a module's parameters into shards and its class into an FSDP one, in place and for
    good; the process's one base (`Run.base_model`) is let go of first and loaded again by the first stage after the pass.
    """
    from peft import set_peft_model_state_dict

    config = run.config
    adapter = load_file(str(warmup_dir / "adapter_model.safetensors"))
    if config.gradients.shard_model == "none":
        loaded = run.model()
        set_peft_model_state_dict(loaded.model, adapter)
        return loaded
    if problem := sharding_problem(config.gradients, run.world_size):
        raise ConfigError(problem)
    device = pick_device(config.model.device)
    run.release_base()  # the warm-up's whole base would sit on the device beside the shards all through the pass
    # read into CPU memory: only this rank's shard of each weight is moved to the device
    base = load_base_model(config.model.name, torch.device("cpu"), resolve_dtype(config.model.dtype, device))
    model = wrap_lora(base, config.model, config.seed)
    set_peft_model_state_dict(model, adapter)  # before sharding: the shards are cut from these weights
    # peft's wrapper is the root unit (embeddings, final norm, output head): its forward is the one the engine calls
    distributed.fully_shard(model, decoder_layers(model), device)
    return LoadedModel(model, load_tokenizer(config.model.name), device)


def run_gradient_pass(
    run: Run,
    records: list[Record],
    loaded: LoadedModel,
    warmup_dir: Path,
    checkpoint_key: str,
    projection_dims: tuple[int, ...] = (),
    exact: bool = False,
    stage_name: str = "gradients",
) -> GradientConsumers:
    """Stream every sample's exact LoRA gradient (`loaded` holds the warm-up adapter: `warmup_model`) into the consumers.

    Under torchrun each rank takes every world-size-th batch into its own consumers, and the shards
    are merged into rank 0's as a tree of collectives (`distributed.tree_merge`). Resumes from
    `RUN/checkpoints/<stage>.rank<r>.safetensors` after an interruption, if it was written for the
    same `checkpoint_key` (the stage's key) and the same number of ranks.
    """
    config = run.config
    layout = layout_of(loaded.model)
    examples, batches = gradient_batches(records, loaded, config)
    rank, world_size = distributed.world()
    adam = (
        load_adam_state(warmup_dir / "optimizer.safetensors", layout, loaded.device)
        if config.gradients.adam_precondition
        else None
    )
    consumers = GradientConsumers(layout.dim, len(records), config, loaded.device, projection_dims, exact)
    checkpoint = run.path("checkpoints", f"{stage_name}.rank{rank}.safetensors")
    # a shard's state is only valid for the same inputs and the same split of batches across ranks
    checkpoint_key = config_hash(checkpoint_key, world_size)
    start = 0
    if checkpoint.exists():
        from safetensors import safe_open

        with safe_open(str(checkpoint), framework="pt") as handle:
            meta = handle.metadata()
        if meta.get("key") == checkpoint_key:
            consumers.restore(load_file(str(checkpoint)))
            start = int(meta["next_batch"])
            note(f"gradients: resuming from the checkpoint after batch {start}")
    mine = [b for i, b in enumerate(batches) if i % world_size == rank]
    sharded = config.gradients.shard_model == "fsdp"
    schedule, first = equal_rounds(mine, start, batches) if sharded else (mine, start)
    progress = tqdm(
        total=sum(len(b) for b in mine),
        initial=sum(len(b) for b in mine[:start]),
        desc=f"gradients ({config.gradients.tokens})",
        unit="sample",
        dynamic_ncols=True,
        # only rank 0 shows it; left unset on rank 0 so that TQDM_DISABLE=1 still hides it
        **({"disable": True} if not distributed.is_main() else {}),
    )
    every = config.gradients.checkpoint_every or default_checkpoint_every(len(mine))
    # a filler round runs the pass's first sample: any real one goes through the same layers, so the same collectives
    for number, indices, grads, losses in stream_gradients(
        loaded.model,
        schedule,
        loaded.tokenizer.pad_token_id,
        loaded.device,
        adam,
        config.gradients.normalize,
        start=first,
        progress=progress,
        checkpointing=config.gradients.activation_checkpointing,
        filler=[batches[0][0]] if sharded else (),
    ):
        consumers.add(grads, indices, losses)
        if (number + 1) % every == 0 and number + 1 < len(mine):
            _save_tensors(checkpoint, consumers.state(), {"next_batch": str(number + 1), "key": checkpoint_key})
    progress.close()
    if world_size > 1:  # rank 0 ends with every shard merged in; the others' consumers are done with
        fresh = lambda: GradientConsumers(layout.dim, len(records), config, loaded.device, projection_dims, exact)
        consumers = (
            distributed.tree_merge(consumers, GradientConsumers.state, lambda t: fresh().restore(t), loaded.device)
            or consumers
        )
    checkpoint.unlink(missing_ok=True)
    return consumers


def equal_rounds(mine: list, start: int, batches: list) -> tuple[list, int]:
    """This rank's batches as rounds every rank runs alike, and the round they start at, for a model sharded over the
    ranks: each forward and backward holds collectives, so a rank that ran fewer would leave the others waiting for
    ever. Every rank starts at the earliest round any rank resumes from and runs as many rounds as the largest shard
    has batches; a round a rank has no batch for (its shard is a batch short, or its own checkpoint already holds it)
    is a filler round (None), whose gradients are dropped."""
    rounds = math.ceil(len(batches) / distributed.world()[1])
    schedule = [mine[i] if start <= i < len(mine) else None for i in range(rounds)]
    return schedule, distributed.smallest(start)


def default_checkpoint_every(batches: int) -> int:
    """About ten checkpoints per pass, and at least one every 50 batches, so small runs resume too."""
    return max(1, min(50, math.ceil(batches / 10)))


def save_gradient_outputs(run: Run, consumers: GradientConsumers, layout_json: dict, stage: dict) -> SketchResult:
    config = run.config
    result = consumers.sketch.result()
    order = torch.argsort(result.indices)  # store in dataset order: row i is sample i
    tensors = {
        "basis": result.basis.float().cpu().contiguous(),
        "singular_values": result.singular_values.cpu(),
        "coordinates": result.coordinates[order].cpu().contiguous(),
        "indices": result.indices[order],
        "energy_curve": torch.tensor(consumers.sketch.energy_curve(), dtype=torch.float64),
    }
    _save_tensors(
        run.path("sketch.safetensors"),
        tensors,
        {"captured_energy": str(result.captured_energy), "rank": str(config.sketch.rank)},
    )
    outputs = ["sketch.safetensors"]
    for name, part in consumers.parts.items():
        if name == "sketch":
            continue
        features, indices = part.result()
        _save_tensors(run.path(f"{name}.safetensors"), {"features": features[np.argsort(indices)].contiguous()}, {})
        outputs.append(f"{name}.safetensors")
    losses = [consumers.losses[i] for i in sorted(consumers.losses)]
    stage.update(
        outputs=outputs,
        samples=len(result.indices),
        dim=layout_json["dim"],
        layout=layout_json,
        captured_energy=result.captured_energy,
        energy_curve=[round(e, 5) for e in consumers.sketch.energy_curve()],
        mean_warmup_loss=float(np.mean(losses)) if losses else None,
    )
    return result


# ---------------------------------------------------------------- clustering


def projection_dims(config: RunConfig) -> tuple[int, ...]:
    """Every random projection the gradient pass must write: the clustering method's and the asked strategies' partitioners'."""
    partitioners = [PARTITIONERS[config.cluster.method]] + [
        get(s).partitioner for s in config.experts.strategies if get(s).partitioner
    ]
    return tuple(sorted({dim for p in partitioners if (dim := p.projection_dim(config))}))


def assign(features: torch.Tensor | None, n: int, config: RunConfig, seed: int) -> tuple[np.ndarray, int, dict]:
    """Labels for one method; returns (labels, K, details such as the silhouette scores of `k: auto`).

    Every cluster must get a sample: K-means on fewer distinct points than K leaves some empty,
    and an empty cluster would make an expert with no data, so that stops the run naming the cause.
    """
    details: dict = {}
    k = config.cluster.k
    if features is None:
        k = k if isinstance(k, int) else min(config.cluster.k_max, n - 1)
        return random_labels(n, k, seed), k, details
    if k == "auto":
        k, scores = choose_k(
            features,
            config.cluster.k_max,
            seed,
            config.cluster.n_init,
            config.cluster.minibatch_above,
            config.cluster.silhouette_sample,
        )
        details["silhouette"] = scores
        say_chosen_k(k, scores, config.cluster.k_max, n)
    if k > n:
        raise ConfigError(f"config key `cluster.k`: {k} clusters for only {n} samples")
    labels = spherical_kmeans(features, k, seed, config.cluster.n_init, config.cluster.minibatch_above)
    sizes = np.bincount(labels, minlength=k)
    if (sizes == 0).any():
        raise ConfigError(
            f"config key `cluster.k`: k-means left {int((sizes == 0).sum())} of {k} clusters empty (sizes {sizes.tolist()}): "
            f"the {n} samples' {config.cluster.method} features form fewer than {k} distinct points; lower K"
        )
    return labels, k, details


def say_chosen_k(k: int, scores: dict[int, float], k_max: int, n: int) -> None:
    """Which K `k: auto` chose, with the score curve; a warning when the best K is at an edge of the range searched."""
    curve = ", ".join(f"{K} {score:.3f}" for K, score in scores.items())
    note(f"k auto: K = {k}, the best cosine silhouette over K = 2..{max(scores)} ({curve})")
    if len(scores) < 2:
        return
    if k == max(scores) and k in (k_max, n - 1):
        why = (
            f"`cluster.k_max` = {k_max}: raise it to look further"
            if k == k_max
            else f"N − 1 for {n} samples: more data would allow a larger K"
        )
        warn(f"k auto: the best K, {k}, is the largest searched, the limit set by {why}")
    elif k == 2:
        warn(
            "k auto: the best K is 2, the smallest searched; the silhouette cannot score K = 1, so the data may form no clusters at all"
        )


class GradientStage(Stage):
    """Every sample's exact LoRA gradient w.r.t. the warm-up adapter, streamed into the sketch (and projections).

    Every rank streams its shard of the batches; the shards meet in rank 0's consumers, which writes the outputs."""

    name = "gradients"
    placement = Placement.EVERY

    def requires(self, run: Run):
        return [WarmupStage()]

    def inputs(self, run: Run) -> dict[str, str]:
        config = run.config
        # when state is saved and whether the base is sharded change how the pass runs, not the gradients it computes
        how = ("checkpoint_every", "shard_model")
        settings = {k: v for k, v in keyed(config.gradients).items() if k not in how}
        return {
            "gradient settings": config_hash(settings),
            "sketch settings": config_hash(asdict(config.sketch)),
            "projections": config_hash(projection_dims(config), PARTITIONERS[config.cluster.method].exact_gradients),
        }

    def run(self, run: Run, key: str, record: dict) -> None:
        loaded = warmup_model(run, run.path("warmup"))
        exact = PARTITIONERS[run.config.cluster.method].exact_gradients
        consumers = run_gradient_pass(
            run, run.records, loaded, run.path("warmup"), key, projection_dims(run.config), exact
        )
        if run.is_main:
            save_gradient_outputs(run, consumers, layout_of(loaded.model).to_json(), record)


class ClusterStage(Stage):
    """K clusters of the samples, by the configured method; `clusters.jsonl`, the label metrics and the interference statistics."""

    name = "cluster"

    def requires(self, run: Run):
        return [GradientStage() if PARTITIONERS[run.config.cluster.method].reads_gradients else DataStage()]

    def inputs(self, run: Run) -> dict[str, str]:
        return {"cluster settings": config_hash(asdict(run.config.cluster), run.config.seed)}

    def run(self, run: Run, key: str, record: dict) -> None:
        config, records, method = run.config, run.records, run.config.cluster.method
        partitioner = PARTITIONERS[method]
        features = partitioner.features(run, records, pick_device(config.model.device))
        labels, k, details = assign(features, len(records), config, config.seed)
        write_jsonl(run.path("clusters.jsonl"), [{"id": r.id, "cluster": int(l)} for r, l in zip(records, labels)])
        metrics: dict[str, float] = {}
        if run.path("sketch.safetensors").exists() and partitioner.reads_gradients:
            coordinates = load_file(str(run.path("sketch.safetensors")))["coordinates"]
            metrics["within_cluster_cosine"] = within_cluster_cosine(coordinates, labels)
            metrics["captured_energy"] = run.stage_entry(GradientStage.name).get("captured_energy")
            record["interference"] = interference(coordinates, labels)
        sources = [r.source for r in records]
        if all(s is not None for s in sources):
            metrics.update(label_metrics(labels, sources))
            record["composition"] = composition(labels, sources)
        record.update(
            outputs=["clusters.jsonl"],
            method=method,
            k=k,
            sizes=np.bincount(labels, minlength=k).tolist(),
            metrics=metrics,
            terms=cluster_terms(records, labels, k, seed=config.seed),
            **details,
        )


def cluster(run: Run | RunConfig) -> ClusterOutcome:
    """`gradientspace cluster`: the Python API. Resumes when `config.out` holds a matching run.

    Under torchrun every rank trains the warm-up together (DDP) and takes its shard of the gradient
    pass, and rank 0 clusters while the others wait (`runner.Run.build`).
    """
    run = as_run(run)
    config = run.config
    run.directory.set_config(config.to_dict())
    (entry,) = run.build(ClusterStage())
    labels = [row["cluster"] for row in map(json.loads, run.path("clusters.jsonl").read_text().splitlines())]
    return ClusterOutcome(
        run.directory.root,
        config.cluster.method,
        entry["k"],
        labels,
        [r.id for r in run.records],
        entry.get("metrics", {}),
        entry["sizes"],
        entry.get("interference", {}),
        entry.get("terms", {}),
    )
