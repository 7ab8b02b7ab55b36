"""The clustering pipeline: data → warm-up → gradient pass (sketch) → clusters.

Each stage records itself in `RUN/manifest.json` with its named inputs (`*_inputs` below: config
sections, the data file's content hash, the upstream stage's key) and a key hashed from them; a
stage whose key matches and whose outputs exist is skipped, so re-running the same command
resumes, and a changed input re-runs exactly the stages downstream of it. The gradient pass also
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

from . import distributed
from .cluster import (GRADIENT_METHODS, ExactStore, RademacherProjector, choose_k, composition, label_metrics,
                      random_labels, spherical_kmeans, within_cluster_cosine)
from .config import RunConfig, internal_rank
from .data import Record, fingerprint, load_records, shuffled_length_batches, tokenize, validation_ids
from .gradients import layout_of, stream_gradients
from .models import LoadedModel, load_lora_model, pick_device
from .runs import Run, atomic_path, config_hash, note, write_jsonl
from .sketch import OnlineSVD, SketchResult
from .train import TrainPlan, load_adam_state, train_adapter


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


# ---------------------------------------------------------------- data

# Each stage's inputs, by name: the hashes its key is made of. Naming them lets the runner say
# which one changed (`re-run gradients: warm-up changed`).

def data_inputs(config: RunConfig) -> dict[str, str]:
    """The data file's content (not its path), how it is read, and the tokenizer that truncates it."""
    settings = {k: v for k, v in asdict(config.data).items() if k != "path"}
    return {"data content": fingerprint(config.data.path), "data settings": config_hash(settings, config.seed),
            "tokenizer": config_hash(config.model.name)}


def warmup_inputs(config: RunConfig) -> dict[str, str]:
    return {"data": config_hash(data_inputs(config)), "model": config_hash(asdict(config.model)),
            "warm-up settings": config_hash(asdict(config.warmup), config.seed)}


def warmup_key(config: RunConfig) -> str:
    return config_hash(warmup_inputs(config))


def gradients_inputs(config: RunConfig) -> dict[str, str]:
    # checkpoint_every changes when state is saved, not what is computed
    settings = {k: v for k, v in asdict(config.gradients).items() if k != "checkpoint_every"}
    return {"warm-up": warmup_key(config), "gradient settings": config_hash(settings), "sketch settings": config_hash(asdict(config.sketch)),
            "projections": config_hash(projection_dims(config), config.cluster.method == "exact")}


def cluster_inputs(config: RunConfig) -> dict[str, str]:
    inputs = {"data": config_hash(data_inputs(config)), "cluster settings": config_hash(asdict(config.cluster), config.seed)}
    if config.cluster.method in GRADIENT_METHODS:
        inputs["gradients"] = config_hash(gradients_inputs(config))
    return inputs


def load_data(run: Run, config: RunConfig) -> list[Record]:
    data = config.data
    records, report = load_records(data.path, skip_bad=data.skip_bad, limit=data.limit, per_source=data.per_source, seed=config.seed,
                                   num_proc=data.num_proc)
    inputs = data_inputs(config)
    key = config_hash(inputs)
    if not run.is_done("data", key, inputs):
        from .models import load_tokenizer

        # counted on training samples (prompt + response), the way warm-up and experts tokenise them
        truncated = sum(e.truncated for e in tokenize(records, load_tokenizer(config.model.name), data.max_length))
        with run.stage("data", key, inputs) as stage:
            write_jsonl(run.path("samples.jsonl"), [{"index": i, "id": r.id, "source": r.source, "prompt": r.prompt_text[:PROMPT_CHARS]}
                                                    for i, r in enumerate(records)])
            stage["outputs"] = ["samples.jsonl"]
            stage.update({"records": report.records, "skipped_bad": report.skipped, "first_errors": report.first_errors, "truncated": truncated})
        note(f"data: {report.records} records" + (f", {report.skipped} bad ones skipped" if report.skipped else "")
             + f", {truncated} truncated to data.max_length = {data.max_length} tokens"
             + (" (most samples lose tokens: consider a larger data.max_length)" if truncated > report.records / 2 else ""))
    return records


# ---------------------------------------------------------------- warm-up


def warmup_subset(records: list[Record], config: RunConfig) -> list[Record]:
    """A seeded random fraction of the training part (never the validation split)."""
    held = validation_ids(records, config.data.validation_fraction, config.seed)
    candidates = [r for r in records if r.id not in held]
    count = max(config.warmup.batch_size, round(config.warmup.fraction * len(candidates)))
    return random.Random(f"warmup-{config.seed}").sample(candidates, min(len(candidates), count))


def run_warmup(run: Run, config: RunConfig, records: list[Record], loaded: LoadedModel) -> Path:
    """Train the warm-up adapter (fixed epochs) on a random fraction; returns its folder."""
    if not run.is_done("warmup", warmup_key(config), warmup_inputs(config)):
        train_warmup(run, config, records, loaded)
    return run.path("warmup")


def train_warmup(run: Run, config: RunConfig, records: list[Record], loaded: LoadedModel) -> None:
    inputs = warmup_inputs(config)
    key = config_hash(inputs)
    folder = run.path("warmup")
    examples = tokenize(warmup_subset(records, config), loaded.tokenizer, config.data.max_length, "response")
    plan = TrainPlan(config.warmup.epochs, config.warmup.learning_rate, config.warmup.batch_size, config.seed,
                     schedule="constant", warmup_ratio=0.0, patience=None)
    with run.stage("warmup", key, inputs) as stage:
        summary = train_adapter(loaded.model, examples, [], loaded.tokenizer.pad_token_id, loaded.device, plan, folder, key, desc="warm-up")
        stage.update(summary, outputs=["warmup/adapter_model.safetensors", "warmup/optimizer.safetensors"])


# ---------------------------------------------------------------- gradient pass

class GradientConsumers:
    """What the gradient pass feeds: the sketch always, plus a projector or an exact store if asked."""

    def __init__(self, dim: int, n: int, config: RunConfig, device: torch.device, projection_dims: tuple[int, ...] = (), exact: bool = False):
        self.sketch = OnlineSVD(dim, config.sketch.rank, internal_rank(config.sketch), config.sketch.block_size,
                                dtype=getattr(torch, config.sketch.dtype), device=device,
                                reorthonormalize_every=config.sketch.reorthonormalize_every)
        self.projectors = {k: RademacherProjector(dim, k, seed=config.seed) for k in projection_dims}
        self.exact = ExactStore(dim, n, config.cluster.exact_max_bytes) if exact else None
        self.losses: dict[int, float] = {}

    def add(self, rows: torch.Tensor, indices: list[int], losses: torch.Tensor) -> None:
        self.sketch.add(rows, indices)
        for projector in self.projectors.values():
            projector.add(rows, indices)
        if self.exact is not None:
            self.exact.add(rows, indices)
        self.losses.update(zip(indices, losses.tolist()))

    def state(self) -> dict[str, torch.Tensor]:
        tensors = {f"sketch.{k}": v.detach().cpu().contiguous() for k, v in self.sketch.state_dict().items()}
        for k, projector in self.projectors.items():
            features, indices = projector.result()
            tensors[f"projection{k}.features"], tensors[f"projection{k}.indices"] = features.contiguous(), torch.tensor(indices, dtype=torch.long)
        if self.exact is not None and self.exact.rows:
            features, indices = self.exact.result()
            tensors["exact.features"], tensors["exact.indices"] = features.contiguous(), torch.tensor(indices, dtype=torch.long)
        tensors["loss.indices"] = torch.tensor(list(self.losses), dtype=torch.long)
        tensors["loss.values"] = torch.tensor(list(self.losses.values()), dtype=torch.float64)
        return tensors

    def merge(self, other: "GradientConsumers") -> "GradientConsumers":
        """Fold in the consumers of a disjoint shard (another rank's batches)."""
        self.sketch.merge(other.sketch)
        for k, projector in self.projectors.items():
            projector.merge(other.projectors[k])
        if self.exact is not None:
            self.exact.merge(other.exact)
        self.losses.update(other.losses)
        return self

    def restore(self, tensors: dict[str, torch.Tensor]) -> "GradientConsumers":
        self.sketch.load_state_dict({k[len("sketch."):]: v for k, v in tensors.items() if k.startswith("sketch.")})
        for k, projector in self.projectors.items():
            if f"projection{k}.features" in tensors:
                projector.features = [tensors[f"projection{k}.features"]]
                projector.indices = tensors[f"projection{k}.indices"].tolist()
        if self.exact is not None and "exact.features" in tensors:
            self.exact.rows, self.exact.indices = [tensors["exact.features"]], tensors["exact.indices"].tolist()
        self.losses = dict(zip(tensors["loss.indices"].tolist(), tensors["loss.values"].tolist()))
        return self


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def gradient_batches(records: list[Record], loaded: LoadedModel, config: RunConfig):
    examples = tokenize(records, loaded.tokenizer, config.data.max_length, config.gradients.tokens)
    batches = shuffled_length_batches(examples, config.gradients.batch_size, config.gradients.chunk_size, seed=config.seed)
    return examples, batches


def run_gradient_pass(run: Run, config: RunConfig, records: list[Record], loaded: LoadedModel, warmup_dir: Path,
                      projection_dims: tuple[int, ...] = (), exact: bool = False, stage_name: str = "gradients") -> GradientConsumers:
    """Stream every sample's exact LoRA gradient (w.r.t. the warm-up adapter) into the consumers.

    Under torchrun each rank takes every world-size-th batch into its own consumers, and the shards
    are merged into rank 0's as a tree of collectives (`distributed.tree_merge`). Resumes from
    `RUN/checkpoints/<stage>.safetensors` after an interruption.
    """
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(loaded.model, load_file(str(warmup_dir / "adapter_model.safetensors")))
    layout = layout_of(loaded.model)
    examples, batches = gradient_batches(records, loaded, config)
    rank, world_size = distributed.world()
    adam = load_adam_state(warmup_dir / "optimizer.safetensors", layout, loaded.device) if config.gradients.adam_precondition else None
    consumers = GradientConsumers(layout.dim, len(records), config, loaded.device, projection_dims, exact)
    checkpoint = run.path("checkpoints", f"{stage_name}.rank{rank}.safetensors")
    # a shard's state is only valid for the same inputs and the same split of batches across ranks
    checkpoint_key = config_hash(gradients_inputs(config), projection_dims, exact, world_size)
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
    progress = tqdm(total=sum(len(b) for b in mine), initial=sum(len(b) for b in mine[:start]), desc=f"gradients ({config.gradients.tokens})",
                    unit="sample", dynamic_ncols=True, disable=not distributed.is_main() and world_size > 1)
    every = config.gradients.checkpoint_every or default_checkpoint_every(len(mine))
    for number, indices, grads, losses in stream_gradients(loaded.model, mine, loaded.tokenizer.pad_token_id, loaded.device,
                                                           adam, config.gradients.normalize, start=start, progress=progress,
                                                           checkpointing=config.gradients.activation_checkpointing):
        consumers.add(grads, indices, losses)
        if (number + 1) % every == 0 and number + 1 < len(mine):
            _save_tensors(checkpoint, consumers.state(), {"next_batch": str(number + 1), "key": checkpoint_key})
    progress.close()
    if world_size > 1:  # rank 0 ends with every shard merged in; the others' consumers are done with
        fresh = lambda: GradientConsumers(layout.dim, len(records), config, loaded.device, projection_dims, exact)
        consumers = distributed.tree_merge(consumers, GradientConsumers.state, lambda t: fresh().restore(t), loaded.device) or consumers
    checkpoint.unlink(missing_ok=True)
    return consumers


def default_checkpoint_every(batches: int) -> int:
    """About ten checkpoints per pass, and at least one every 50 batches, so small runs resume too."""
    return max(1, min(50, math.ceil(batches / 10)))


def save_gradient_outputs(run: Run, config: RunConfig, consumers: GradientConsumers, layout_json: dict, stage: dict) -> SketchResult:
    result = consumers.sketch.result()
    order = torch.argsort(result.indices)  # store in dataset order: row i is sample i
    tensors = {"basis": result.basis.float().cpu().contiguous(), "singular_values": result.singular_values.cpu(),
               "coordinates": result.coordinates[order].cpu().contiguous(), "indices": result.indices[order],
               "energy_curve": torch.tensor(consumers.sketch.energy_curve(), dtype=torch.float64)}
    _save_tensors(run.path("sketch.safetensors"), tensors, {"captured_energy": str(result.captured_energy), "rank": str(config.sketch.rank)})
    outputs = ["sketch.safetensors"]
    for k, projector in consumers.projectors.items():
        features, indices = projector.result()
        order = np.argsort(indices)
        _save_tensors(run.path(f"projection-{k}.safetensors"), {"features": features[order].contiguous()}, {})
        outputs.append(f"projection-{k}.safetensors")
    if consumers.exact is not None:
        features, indices = consumers.exact.result()
        _save_tensors(run.path("gradients-exact.safetensors"), {"features": features[np.argsort(indices)].contiguous()}, {})
        outputs.append("gradients-exact.safetensors")
    losses = [consumers.losses[i] for i in sorted(consumers.losses)]
    stage.update(outputs=outputs, samples=len(result.indices), dim=layout_json["dim"], layout=layout_json,
                 captured_energy=result.captured_energy, energy_curve=[round(e, 5) for e in consumers.sketch.energy_curve()],
                 mean_warmup_loss=float(np.mean(losses)) if losses else None)
    return result


# ---------------------------------------------------------------- clustering

def clustering_projection_dim(config: RunConfig) -> int:
    """`--method random-projection` projects to the sketch rank unless told otherwise (a like-for-like comparison)."""
    return config.cluster.projection_dim or config.sketch.rank


def strategy_projection_dim(config: RunConfig) -> int:
    """The `projection-clusters` experts use LESS/ELREA's 8192 dimensions unless told otherwise."""
    return config.cluster.projection_dim or 8192


def projection_dims(config: RunConfig) -> tuple[int, ...]:
    """Every projection the gradient pass must produce for the configured method and strategies."""
    dims = []
    if config.cluster.method == "random-projection":
        dims.append(clustering_projection_dim(config))
    if "projection-clusters" in config.experts.strategies:
        dims.append(strategy_projection_dim(config))
    return tuple(sorted(set(dims)))


def features_for(run: Run, config: RunConfig, records: list[Record], device: torch.device) -> torch.Tensor | None:
    method = config.cluster.method
    if method == "gradientspace":
        return load_file(str(run.path("sketch.safetensors")))["coordinates"]
    if method == "random-projection":
        return load_file(str(run.path(f"projection-{clustering_projection_dim(config)}.safetensors")))["features"]
    if method == "exact":
        return load_file(str(run.path("gradients-exact.safetensors")))["features"]
    if method == "embedding":
        from .encoder import embed_texts

        return embed_texts([r.prompt_text for r in records], device)
    return None  # random


def assign(features: torch.Tensor | None, n: int, config: RunConfig, seed: int) -> tuple[np.ndarray, int, dict]:
    """Labels for one method; returns (labels, K, details such as the silhouette scores of `k: auto`)."""
    details: dict = {}
    k = config.cluster.k
    if features is None:
        k = k if isinstance(k, int) else config.cluster.k_max
        return random_labels(n, k, seed), k, details
    if k == "auto":
        k, scores = choose_k(features, config.cluster.k_max, seed, config.cluster.n_init, config.cluster.minibatch_above, config.cluster.silhouette_sample)
        details["silhouette"] = scores
    if k > n:
        raise ValueError(f"config key `cluster.k`: {k} clusters for only {n} samples")
    return spherical_kmeans(features, k, seed, config.cluster.n_init, config.cluster.minibatch_above), k, details


def cluster(config: RunConfig) -> ClusterOutcome:
    """`gradientspace cluster`: the Python API. Resumes when `config.out` holds a matching run."""
    distributed.init()
    run = Run(config.out)
    run.set_config(config.to_dict())
    records = load_data(run, config)
    method = config.cluster.method
    device = pick_device(config.model.device)
    if method in GRADIENT_METHODS:
        loaded = None  # loading the model costs seconds; a run whose warm-up and gradients are done does not need it
        if distributed.is_main() and not run.is_done("warmup", warmup_key(config), warmup_inputs(config)):
            loaded = load_lora_model(config.model, seed=config.seed)
            train_warmup(run, config, records, loaded)
        distributed.barrier()
        run = Run(config.out)  # other ranks re-read the manifest rank 0 wrote
        inputs = gradients_inputs(config)
        key = config_hash(inputs)
        if not run.is_done("gradients", key, inputs):
            loaded = loaded or load_lora_model(config.model, seed=config.seed)
            with run.stage("gradients", key, inputs) as stage:
                consumers = run_gradient_pass(run, config, records, loaded, run.path("warmup"), projection_dims(config), method == "exact")
                if distributed.is_main():
                    save_gradient_outputs(run, config, consumers, layout_of(loaded.model).to_json(), stage)
        if not distributed.is_main():
            return ClusterOutcome(run.root, method, 0, [], [])
    inputs = cluster_inputs(config)
    key = config_hash(inputs)
    if run.is_done("cluster", key, inputs):
        entry = run.stage_entry("cluster")
        labels = [row["cluster"] for row in map(json.loads, run.path("clusters.jsonl").read_text().splitlines())]
        return ClusterOutcome(run.root, method, entry["k"], labels, [r.id for r in records], run.manifest["metrics"], entry["sizes"])
    with run.stage("cluster", key, inputs) as stage:
        features = features_for(run, config, records, device)
        labels, k, details = assign(features, len(records), config, config.seed)
        write_jsonl(run.path("clusters.jsonl"), [{"id": r.id, "cluster": int(l)} for r, l in zip(records, labels)])
        sizes = np.bincount(labels, minlength=k).tolist()
        metrics: dict[str, float] = {}
        if run.path("sketch.safetensors").exists() and method in GRADIENT_METHODS:
            coordinates = load_file(str(run.path("sketch.safetensors")))["coordinates"]
            metrics["within_cluster_cosine"] = within_cluster_cosine(coordinates, labels)
            metrics["captured_energy"] = run.stage_entry("gradients").get("captured_energy")
        sources = [r.source for r in records]
        if all(s is not None for s in sources):
            metrics.update(label_metrics(labels, sources))
            stage["composition"] = composition(labels, sources)
        stage.update(outputs=["clusters.jsonl"], method=method, k=k, sizes=sizes, **details)
    run.manifest["metrics"] = metrics
    run.save()
    return ClusterOutcome(run.root, method, k, [int(l) for l in labels], [r.id for r in records], metrics, sizes)
