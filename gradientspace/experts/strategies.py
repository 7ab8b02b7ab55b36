"""Every strategy as one object: how it partitions the training data, whose adapters it serves, how it picks one per prompt.

`STRATEGIES` is the registry. The CLI's choices, the config's validation, the preflight checks,
training (`adapters.py`), routers (`routing/router.py`, `commands.py`), inference and evaluation all read
it; adding a strategy is adding one object here.

| strategy | partition | adapter used for a prompt |
| --- | --- | --- |
| routed | the clusters of `cluster.method` (`clusters.jsonl`): prompt embeddings by default, gradients with `gradientspace` | the expert its router picks (the fall-back below the threshold, or where the expert is not kept) |
| single | everything in one group: the generalist | the generalist |
| single-wide | everything, LoRA rank K·r (as many parameters as K experts) | that adapter |
| single-continued | everything in one group, branched from the generalist with the experts' schedule (the annealed baseline) | that adapter if it beat the generalist on validation, else the generalist |
| gradient-oracle | serves routed's experts | the expert whose centroid is nearest the prompt's own response gradient projected on the sketch basis (the gradient pass runs for it whatever `cluster.method` is): no router can see it, so routed vs gradient-oracle separates routing error from expert quality |
| oracle | the true `source` labels | the expert of the prompt's label (the ceiling; needs `source`) |
| random-clusters | balanced random groups, same K (the control) | that partition's expert, by its own router |
| embedding-clusters | k-means on MiniLM prompt embeddings | that partition's expert, by its own router |
| projection-clusters | k-means on random-projected gradients (LESS/ELREA) | that partition's expert, by its own router |
| elrea-ensemble | serves routed's experts | every expert and the generalist, next-token logits mixed by gradient similarity (ELREA) |

Every strategy but the ensemble runs one forward pass per token with one adapter; the ensemble
needs a backward pass per prompt and K + 1 forward passes per token. A new strategy is one subclass
here and one line in `STRATEGIES`: what it does differently is its methods, never a flag read elsewhere.

The fall-back. A prompt that a strategy sends to none of its own adapters (its router is below the
threshold, its group's expert was not kept, its group had no training records) is answered by the
single adapter of record (`experts.fallback: best-single`): `single-continued` as its keep rule
served it — kept or blended where it beat the generalist on validation beyond the margin, else the
generalist itself — so the fall-back is whichever single adapter validation preferred. Each expert's
keep / blend decision and the router threshold are then made against that adapter, and a blend
mixes the expert with it. `experts.fallback: generalist` falls back to the generalist, as runs
before this setting did.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from gradientspace.clustering.partitioners import PARTITIONERS, Partitioner, RandomProjection, SourceLabels
from gradientspace.config import DEFAULT_STRATEGIES, LIST_CHOICES, RunConfig
from gradientspace.data.records import Record

GENERALIST = "single"  # the adapter every other strategy branches from
ROUTED = "routed"  # the product's own strategy: the clusters of `cluster.method`, routed (`export` and `generate` default to it)
ROUTER_UNSURE = -1  # a router's answer below its threshold: the fall-back serves the prompt
# why the fall-back answered a prompt instead of the group's own adapter (`Choice.fallback`, the serving metrics)
BELOW_THRESHOLD, NOT_SERVED, UNKNOWN_LABEL = "below_threshold", "expert_not_served", "unknown_label"


class PromptRouter(Protocol):
    """What a strategy reads of a router (`router.Router`)."""

    def route(self, texts: list[str]) -> tuple[list[int], list[float]]: ...
    def probabilities(self, texts: list[str]): ...  # [prompts, groups], a torch tensor


class ServingModel(Protocol):
    """What a strategy reads of, and asks of, the model serving it (`routing.model.StrategyModel`)."""

    config: RunConfig
    generalist: str  # the adapter every strategy branches from
    groups: dict[str, list[str]]  # each trained strategy's group names
    routers: dict[str, PromptRouter]
    centroids: object  # the ensemble's per-cluster mean gradients [K + 1, d], once `load_centroids` ran

    def adapter_for(self, strategy: str, group: int) -> str: ...
    def serve_group(self, strategy: str, group: int, probability: float = 1.0, pick: int | None = None) -> Choice: ...
    def load_router(self, strategy: str) -> None: ...
    def load_gradient_oracle(self) -> None: ...
    def load_centroids(self) -> None: ...
    def gradient_oracle_groups(self, records: list[Record]) -> list[int]: ...
    def prompt_gradients(
        self, records: list[Record]
    ): ...  # unit instruction-token gradients w.r.t. the generalist [prompts, d]


class RunFiles(Protocol):
    """What a strategy reads of a run: its files and the manifest's stage entries (`runner.Run` or `runs.RunDirectory`)."""

    def path(self, *parts: str) -> Path: ...
    def stage_entry(self, name: str) -> dict: ...


class PipelineStages(Protocol):
    """The pipeline's stages by what they give (`routing.pipeline.PipelineStages`), so that a strategy can say which it needs
    without importing the modules that import it."""

    run: object  # the `runner.Run` they belong to

    def clusters(self): ...  # the clusters of `cluster.method` (and whatever they come from)
    def gradients(self): ...  # the sketch: every training record's gradient on its basis (and the warm-up)
    def served(self, strategy: str): ...  # a strategy's adapters, as kept, blended or dropped
    def router(self, strategy: str) -> list: ...  # its router, and its threshold where it is chosen on validation
    def centroids(self): ...  # the ensemble's per-cluster mean gradients


@dataclass
class Choice:
    """How one prompt is served: adapter weights (one adapter with weight 1 unless ensembling)."""

    weights: dict[str, float]
    expert: int | str  # the group served (ROUTER_UNSURE below the threshold)
    probability: float
    pick: int | None = None  # the router's top group before its threshold (None: no router chose)
    fallback: str | None = (
        None  # why the fall-back adapter answers rather than the group's own (BELOW_THRESHOLD, NOT_SERVED, UNKNOWN_LABEL)
    )

    @property
    def single_adapter(self) -> str | None:
        return next(iter(self.weights)) if len(self.weights) == 1 else None


class Strategy(ABC):
    """One way of serving the training data's skills with LoRA adapters.

    Everything the pipeline does differently for a strategy is a method here: how it partitions the
    records and what that reads, where its adapters start and on which model, what serving it
    requires and loads, and how it picks an adapter per prompt. No other module tests a strategy's
    name or kind."""

    name: str
    help: str
    partitioner: Partitioner | None = None  # how it groups the records, from the registry the cluster stage uses too
    # one adapter on every training record: under torchrun all ranks train it together (DDP); dealt to one rank, it
    # would keep that rank busy as long as the experts together while the others wait
    one_adapter_on_every_record = False

    @property
    def owner(self) -> str:
        """The strategy whose adapters this one serves (itself, unless it only routes differently)."""
        return self.name

    # ---------------------------------------------------------------- files

    def folder(self, run: RunFiles) -> Path:
        return run.path("strategies", self.owner) if self.owner == self.name else get(self.owner).folder(run)

    def router_folder(self, run: RunFiles) -> Path | None:
        """Where its router lives; None when no router sends prompts to its adapters."""
        return None

    # ---------------------------------------------------------------- the configuration and the records

    def check_config(self, config: RunConfig) -> str | None:
        """What is wrong with the configuration for this strategy (one line naming the key), or None."""
        return None

    def check_records(self, records: list[Record], path: str) -> str | None:
        """What is wrong with the training records for this strategy (one line naming a record), or None."""
        return None

    # ---------------------------------------------------------------- training

    def partition_reads(self, clusters, data):
        """The stage its partition is made from, of the two given: the gradient clusters, or only the data."""
        return data

    def partition(self, run: RunFiles, config: RunConfig, records: list[Record]) -> tuple[list[int], list[str]]:
        """(group of each training record, group names)."""
        labels = [int(l) for l in self.labels(run, config, records)]
        return labels, [str(i) for i in range(max(labels) + 1)]

    def labels(self, run: RunFiles, config: RunConfig, records: list[Record]) -> list[int]:
        raise NotImplementedError(
            f"strategy `{self.name}` serves the adapters of `{self.owner}` and has no partition of its own"
        )

    def start(self, config: RunConfig) -> str:
        """Where its adapters start: `fresh`, `warmup` or `generalist` (then they branch from it and are kept or dropped)."""
        return config.experts.init

    def falls_back_to(self, config: RunConfig) -> str:
        """The strategy whose adapter, as served, answers the prompts this one sends to none of its own: the single adapter
        of record (`experts.fallback: best-single`: `single-continued` as kept, which is the generalist where it lost on
        validation), or the generalist (`experts.fallback: generalist`)."""
        return ContinuedGeneralist.name if best_single_fallback(config) else GENERALIST

    def ignored_settings(self) -> tuple[str, ...]:
        """`experts.*` settings that cannot change its adapters (left out of their keys)."""
        return ()

    def model_config(self, config: RunConfig, run: RunFiles):
        """The model its adapters train on (a changed one retrains them)."""
        return config.model

    # ---------------------------------------------------------------- serving

    def routing_stages(self, stages: PipelineStages) -> list:
        """The stages that send a prompt to one of its groups (a router), beyond its adapters."""
        return []

    def serving_stages(self, stages: PipelineStages) -> list:
        """Every stage whose output serving it reads: its adapters and the generalist's (as kept or blended), and what routes."""
        return [stages.served(owner) for owner in trained([self.name], stages.run.config)] + get(
            self.owner
        ).routing_stages(stages)

    def prepare(self, model: ServingModel) -> None:
        """Load into the serving model what `choose` reads beyond the adapters (a router, a gradient space)."""

    @abstractmethod
    def choose(self, model: ServingModel, records: list[Record]) -> list[Choice]:
        """How each prompt is served."""

    def serving_groups(self, model: ServingModel, records: list[Record]) -> list[int]:
        """The group whose adapter would serve each record, before any fall-back: what keep-or-fall-back is decided on."""
        raise NotImplementedError(f"strategy `{self.name}` trains no adapters of its own to keep or drop")


class OneAdapter(Strategy):
    """One adapter on everything, trained from scratch: nothing to branch from, fall back to or route."""

    one_adapter_on_every_record = True

    def __init__(self, name: str, help: str, wide: bool = False):
        self.name, self.help, self.wide = name, help, wide

    def partition_reads(self, clusters, data):
        return clusters if self.wide else data  # rank K·r: K is the clusters'

    def labels(self, run, config, records):
        return [0] * len(records)

    def start(self, config):
        return "fresh"

    def falls_back_to(self, config):
        return GENERALIST  # its one adapter serves every prompt: nothing falls back, so nothing extra is trained

    def ignored_settings(self):
        return ("init", "branch_epochs", "branch_learning_rate")

    def model_config(self, config, run):
        if not self.wide:
            return config.model
        # LoRA rank K·r with the same alpha / r scale: as many trainable parameters as K experts
        k = cluster_count(run)
        return replace(config.model, lora_rank=config.model.lora_rank * k, lora_alpha=config.model.lora_alpha * k)

    def choose(self, model, records):
        return [model.serve_group(self.name, 0) for _ in records]


class ContinuedGeneralist(Strategy):
    """The annealed baseline: the generalist continued on all the training data with exactly the experts' branch
    schedule (learning rate, epochs, decay, early stopping), kept only where it beats the generalist on validation.

    The generalist stops early with its learning rate still high, and every expert then gets a full decayed
    schedule of its own; this arm gives one adapter the same extra annealing at the cost of one more expert, so
    routed experts are compared with a baseline that had the same schedule treatment.
    """

    name, help = (
        "single-continued",
        "the generalist continued on all the data with the experts' branch schedule (the annealed baseline)",
    )
    one_adapter_on_every_record = True

    def check_config(self, config):
        if config.experts.init != "generalist":
            return f"config key `experts.init`: `{self.name}` continues the generalist, so it needs `init: generalist` (not {config.experts.init!r})"
        return None

    def falls_back_to(self, config):
        return GENERALIST  # it is decided against the generalist, and is the others' fall-back

    def labels(self, run, config, records):
        return [0] * len(records)

    def choose(self, model, records):
        return [model.serve_group(self.name, 0) for _ in records]

    def serving_groups(self, model, records):
        return [0] * len(records)


class TrueLabels(Strategy):
    name, help = "oracle", "one expert per true `source` label (the ceiling of label routing)"
    partitioner = SourceLabels()

    def check_records(self, records, path):
        unlabelled = next((r for r in records if r.source is None), None)
        if unlabelled is None:
            return None
        return f"config key `experts.strategies`: `{self.name}` needs a `source` on every record; record `{unlabelled.id}` of {path} has none"

    def partition(self, run, config, records):
        return self.partitioner.groups(records, "strategy `oracle`")

    def choose(self, model, records):
        choices = [model.serve_group(self.name, group) for group in self.serving_groups(model, records)]
        # a label no expert was trained on has no group: the fall-back answers it, and says that this is why
        return [replace(c, fallback=UNKNOWN_LABEL) if c.expert == ROUTER_UNSURE else c for c in choices]

    def serving_groups(self, model, records):
        names = model.groups[self.name]
        return [names.index(r.source) if r.source in names else ROUTER_UNSURE for r in records]


class RoutedPartition(Strategy):
    """Experts on some partition, each prompt sent by a router trained on that partition."""

    def partition_reads(self, clusters, data):
        return clusters  # the clusters themselves, or their K

    def router_folder(self, run):
        return self.folder(run) / "router"

    def routing_stages(self, stages):
        return stages.router(self.name)

    def prepare(self, model):
        model.load_router(self.name)

    def choose(self, model, records):
        experts, probabilities, picks = model.routers[self.name].route([r.prompt_text for r in records])
        return [model.serve_group(self.name, e, p, pick) for e, p, pick in zip(experts, probabilities, picks)]

    def serving_groups(self, model, records):
        # the router's top choice, before the threshold: the threshold is chosen afterwards, on the adapters kept here
        return model.routers[self.name].probabilities([r.prompt_text for r in records]).argmax(dim=1).tolist()


class RoutedClusters(RoutedPartition):
    name, help = "routed", "the clusters of `cluster.method` (embedding by default, or gradientspace) + MiniLM router"

    def folder(self, run):
        return run.path("experts")  # the product's own experts sit at the top of the run

    def router_folder(self, run):
        return run.path("router")

    def labels(self, run, config, records):
        path = run.path("clusters.jsonl")
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run `gradientspace cluster` first")
        by_id = {row["id"]: row["cluster"] for row in map(json.loads, path.read_text().splitlines())}
        return [by_id[r.id] for r in records]


class RandomClusters(RoutedPartition):
    name, help = "random-clusters", "balanced random groups of the same K (separates clustering from extra training)"

    partitioner = PARTITIONERS["random"]

    def labels(self, run, config, records):
        from gradientspace.clustering.kmeans import random_labels

        return random_labels(len(records), cluster_count(run), config.seed).tolist()


class EmbeddingClusters(RoutedPartition):
    name, help = "embedding-clusters", "k-means on MiniLM prompt embeddings"

    partitioner = PARTITIONERS["embedding"]

    def labels(self, run, config, records):
        import torch

        from gradientspace.clustering.kmeans import spherical_kmeans

        features = self.partitioner.features(run, records, torch.device("cpu"))
        return spherical_kmeans(features, cluster_count(run), config.seed, config.cluster.n_init).tolist()


class ProjectionClusters(RoutedPartition):
    name, help = "projection-clusters", "k-means on random-projected gradients (LESS / ELREA style)"
    # LESS / ELREA's 8192 dimensions unless `cluster.projection_dim` says otherwise
    partitioner = RandomProjection("projection-clusters", lambda config: config.cluster.projection_dim or 8192)

    def labels(self, run, config, records):
        import torch

        from gradientspace.clustering.kmeans import spherical_kmeans

        features = self.partitioner.features(run, records, torch.device("cpu"))
        return spherical_kmeans(features, cluster_count(run), config.seed, config.cluster.n_init).tolist()


class GradientOracle(Strategy):
    name, help = (
        "gradient-oracle",
        "routed's experts, each test record sent by its own response gradient (no router can)",
    )

    @property
    def owner(self) -> str:
        return RoutedClusters.name

    def serving_stages(self, stages):
        # it routes by the warm-up's gradients projected on the sketch, onto the clusters: the sketch is made for it where
        # the clusters did not need one (`cluster.method: embedding`)
        return super().serving_stages(stages) + [stages.clusters(), stages.gradients()]

    def prepare(self, model):
        model.load_gradient_oracle()

    def choose(self, model, records):
        return [model.serve_group(self.owner, e) for e in model.gradient_oracle_groups(records)]


class ElreaEnsemble(Strategy):
    """Every expert and the generalist, next-token logits mixed per prompt by how its instruction gradient (w.r.t. the
    generalist, ELREA's base) resembles each cluster's mean gradient: softmax over z-scored cosine similarities."""

    name, help = (
        "elrea-ensemble",
        "ELREA-style mixture of every expert and the generalist, weighted by gradient similarity",
    )

    @property
    def owner(self) -> str:
        return RoutedClusters.name

    def serving_stages(self, stages):
        return super().serving_stages(stages) + [stages.centroids()]

    def prepare(self, model):
        model.load_centroids()

    def choose(self, model, records):
        import torch

        grads = model.prompt_gradients(records)
        centroids = torch.nn.functional.normalize(model.centroids, dim=1)
        similarity = grads @ centroids.T  # [prompts, K + 1]; the last centroid is the warm-up's (all data)
        z = (similarity - similarity.mean(dim=1, keepdim=True)) / similarity.std(dim=1, keepdim=True).clamp(min=1e-8)
        weights = torch.softmax(z / model.config.evaluate.elrea_temperature, dim=1).cpu()
        names = [model.adapter_for(self.owner, g) for g in range(len(model.groups[self.owner]))] + [model.generalist]
        choices = []
        for row in weights:
            mix: dict[str, float] = {}
            for name, weight in zip(names, row.tolist()):
                mix[name] = mix.get(name, 0.0) + weight
            top = int(row.argmax())
            choices.append(Choice(mix, top if top < len(names) - 1 else ROUTER_UNSURE, float(row.max())))
        return choices


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        RoutedClusters(),
        OneAdapter("single", "one LoRA (rank r) on everything: the generalist"),
        OneAdapter("single-wide", "one LoRA of rank K·r on everything: as many parameters as K experts", wide=True),
        ContinuedGeneralist(),
        GradientOracle(),
        TrueLabels(),
        RandomClusters(),
        EmbeddingClusters(),
        ProjectionClusters(),
        ElreaEnsemble(),
    )
}
LIST_CHOICES["experts.strategies"] = STRATEGIES  # config validation accepts exactly the registered names
DEFAULT_STRATEGIES[:] = [ROUTED, GENERALIST, RandomClusters.name]  # ours, the one adapter, and the control


def get(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy `{name}` (choose from {', '.join(STRATEGIES)})")
    return STRATEGIES[name]


def trained(names: list[str], config: RunConfig) -> list[str]:
    """Strategies whose adapters must be trained for `names`: the generalist first (the others branch from it), then the
    adapters they fall back to, then their own."""
    owners = [get(n).owner for n in names]
    return list(dict.fromkeys([GENERALIST] + [get(o).falls_back_to(config) for o in owners] + owners))


def routed(names: list[str], config: RunConfig) -> list[str]:
    """Strategies among `names` (and the ones they serve) that train a router."""
    return [n for n in trained(names, config) if isinstance(get(n), RoutedPartition)]


def decides_on_validation(config: RunConfig) -> bool:
    """Whether adapters branched from the generalist are kept, blended or dropped on the validation split (`keep.py`)."""
    experts = config.experts
    return (
        experts.init == "generalist"
        and not experts.equal_budget
        and experts.keep == "validation"
        and config.data.validation_fraction > 0
    )


def best_single_fallback(config: RunConfig) -> bool:
    """Whether strategies fall back to the single adapter of record (`single-continued` as kept) rather than the generalist:
    `experts.fallback: best-single`, where `single-continued` can be trained and decided on validation."""
    return config.experts.fallback == "best-single" and decides_on_validation(config)


def cluster_count(run: RunFiles) -> int:
    """K of the run's gradient clusters: the controls use the same K."""
    return int(run.stage_entry("cluster")["k"])
