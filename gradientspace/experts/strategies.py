"""Every strategy as one object: how it partitions the training data, whose adapters it serves, how it picks one per prompt.

`STRATEGIES` is the registry. The CLI's choices, the config's validation, the preflight checks,
training (`adapters.py`), routers (`routing/router.py`, `commands.py`), inference and evaluation all read
it; adding a strategy is adding one object here.

| strategy | partition | adapter used for a prompt |
| --- | --- | --- |
| routed | gradient clusters (`clusters.jsonl`) | the expert its router picks (the generalist below the threshold, or where the expert fell back) |
| single | everything in one group: the generalist | the generalist |
| single-wide | everything, LoRA rank K·r (as many parameters as K experts) | that adapter |
| single-continued | everything in one group, branched from the generalist with the experts' schedule (the annealed baseline) | that adapter if it beat the generalist on validation, else the generalist |
| gradient-oracle | serves routed's experts | the expert whose centroid is nearest the prompt's own response gradient projected on the sketch basis: no router can see it, so routed vs gradient-oracle separates routing error from expert quality |
| oracle | the true `source` labels | the expert of the prompt's label (the ceiling; needs `source`) |
| random-clusters | balanced random groups, same K (the control) | that partition's expert, by its own router |
| embedding-clusters | k-means on MiniLM prompt embeddings | that partition's expert, by its own router |
| projection-clusters | k-means on random-projected gradients (LESS/ELREA) | that partition's expert, by its own router |
| elrea-ensemble | serves routed's experts | every expert and the generalist, next-token logits mixed by gradient similarity (ELREA) |

Every strategy but the ensemble runs one forward pass per token with one adapter; the ensemble
needs a backward pass per prompt and K + 1 forward passes per token.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gradientspace.clustering.partitioners import PARTITIONERS, Partitioner, RandomProjection, SourceLabels
from gradientspace.config import LIST_CHOICES, RunConfig
from gradientspace.data.records import Record

GENERALIST = "single"  # the adapter every other strategy branches from and falls back to
ROUTER_UNSURE = -1  # a router's answer below its threshold: the generalist serves the prompt


class PromptRouter(Protocol):
    """What a strategy reads of a router (`router.Router`)."""

    def route(self, texts: list[str]) -> tuple[list[int], list[float]]: ...
    def probabilities(self, texts: list[str]): ...  # [prompts, groups], a torch tensor


class ServingModel(Protocol):
    """What a strategy's `choose` reads of the model serving it (`models.inference.StrategyModel`)."""
    generalist: str  # the adapter every strategy falls back to
    groups: dict[str, list[str]]  # each trained strategy's group names
    routers: dict[str, PromptRouter]

    def adapter_for(self, strategy: str, group: int) -> str: ...
    def gradient_oracle_groups(self, records: list[Record]) -> list[int]: ...
    def ensemble_choices(self, records: list[Record]) -> list[Choice]: ...


class RunFiles(Protocol):
    """What a strategy reads of a run: its files and the manifest's stage entries (`runner.Run` or `runs.RunDirectory`)."""

    def path(self, *parts: str) -> Path: ...
    def stage_entry(self, name: str) -> dict: ...


@dataclass
class Choice:
    """How one prompt is served: adapter weights (one adapter with weight 1 unless ensembling)."""
    weights: dict[str, float]
    expert: int | str
    probability: float

    @property
    def single_adapter(self) -> str | None:
        return next(iter(self.weights)) if len(self.weights) == 1 else None


class Strategy(ABC):
    """One way of serving the training data's skills with LoRA adapters."""

    name: str
    help: str
    routed = False  # trains a router on its own partition
    wide = False  # one adapter of rank K·r: as many parameters as K experts
    one_adapter = False  # a single adapter for everything (no branch, no fall-back)
    needs_source = False  # every training record must carry a `source` label
    partitioner: Partitioner | None = None  # how it groups the records, from the registry the cluster stage uses too
    single_adapter_per_prompt = True  # False: several adapters' logits are mixed (not servable by one-adapter engines)
    needs_cluster_centroids = False  # the per-cluster mean gradients (`elrea-centroids` stage)
    reads_clusters = False  # its partition reads the gradient clusters or their K: it is re-made when they change

    @property
    def owner(self) -> str:
        """The strategy whose adapters this one serves (itself, unless it only routes differently)."""
        return self.name

    def folder(self, run: RunFiles) -> Path:
        return run.path("experts") if self.owner == "routed" else run.path("strategies", self.owner)

    def router_folder(self, run: RunFiles) -> Path:
        return run.path("router") if self.owner == "routed" else self.folder(run) / "router"

    def partition(self, run: RunFiles, config: RunConfig, records: list[Record]) -> tuple[list[int], list[str]]:
        """(group of each training record, group names)."""
        labels = [int(l) for l in self.labels(run, config, records)]
        return labels, [str(i) for i in range(max(labels) + 1)]

    def labels(self, run: RunFiles, config: RunConfig, records: list[Record]) -> list[int]:
        raise NotImplementedError(f"strategy `{self.name}` serves the adapters of `{self.owner}` and has no partition of its own")

    @abstractmethod
    def choose(self, model: ServingModel, records: list[Record]) -> list[Choice]:
        """How each prompt is served."""

    def serving_groups(self, model: ServingModel, records: list[Record]) -> list[int]:
        """The group whose adapter would serve each record, before any fall-back: what keep-or-fall-back is decided on."""
        raise NotImplementedError(f"strategy `{self.name}` trains no adapters of its own to keep or drop")


class OneAdapter(Strategy):
    one_adapter = True

    def __init__(self, name: str, help: str, wide: bool = False):
        self.name, self.help, self.wide = name, help, wide
        self.reads_clusters = wide  # rank K·r

    def labels(self, run, config, records):
        return [0] * len(records)

    def choose(self, model, records):
        return [Choice({model.adapter_for(self.name, 0): 1.0}, 0, 1.0) for _ in records]


class ContinuedGeneralist(Strategy):
    """The annealed baseline: the generalist continued on all the training data with exactly the experts' branch
    schedule (learning rate, epochs, decay, early stopping), kept only where it beats the generalist on validation.

    The generalist stops early with its learning rate still high, and every expert then gets a full decayed
    schedule of its own; this arm gives one adapter the same extra annealing at the cost of one more expert, so
    routed experts are compared with a baseline that had the same schedule treatment.
    """
    name, help = "single-continued", "the generalist continued on all the data with the experts' branch schedule (the annealed baseline)"

    def labels(self, run, config, records):
        return [0] * len(records)

    def choose(self, model, records):
        return [Choice({model.adapter_for(self.name, 0): 1.0}, 0, 1.0) for _ in records]

    def serving_groups(self, model, records):
        return [0] * len(records)


class TrueLabels(Strategy):
    name, help = "oracle", "one expert per true `source` label (the ceiling of label routing)"
    needs_source = True
    partitioner = SourceLabels()

    def partition(self, run, config, records):
        return self.partitioner.groups(records, "strategy `oracle`")

    def choose(self, model, records):
        names = model.groups[self.name]
        return [Choice({model.adapter_for(self.name, names.index(r.source)) if r.source in names else model.generalist: 1.0},
                       r.source or ROUTER_UNSURE, 1.0) for r in records]

    def serving_groups(self, model, records):
        names = model.groups[self.name]
        return [names.index(r.source) if r.source in names else ROUTER_UNSURE for r in records]


class RoutedPartition(Strategy):
    """Experts on some partition, each prompt sent by a router trained on that partition."""
    routed = True
    reads_clusters = True  # the clusters themselves, or their K

    def choose(self, model, records):
        experts, probabilities = model.routers[self.name].route([r.prompt_text for r in records])
        return [Choice({model.adapter_for(self.name, e): 1.0}, e, p) for e, p in zip(experts, probabilities)]

    def serving_groups(self, model, records):
        # the router's top choice, before the threshold: the threshold is chosen afterwards, on the adapters kept here
        return model.routers[self.name].probabilities([r.prompt_text for r in records]).argmax(dim=1).tolist()


class GradientClusters(RoutedPartition):
    name, help = "routed", "gradient clusters + MiniLM router (GradientSpace)"

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
    name, help = "gradient-oracle", "routed's experts, each test record sent by its own response gradient (no router can)"

    @property
    def owner(self) -> str:
        return "routed"

    def choose(self, model, records):
        return [Choice({model.adapter_for(self.owner, e): 1.0}, e, 1.0) for e in model.gradient_oracle_groups(records)]


class ElreaEnsemble(Strategy):
    name, help = "elrea-ensemble", "ELREA-style mixture of every expert and the generalist, weighted by gradient similarity"
    single_adapter_per_prompt = False
    needs_cluster_centroids = True

    @property
    def owner(self) -> str:
        return "routed"

    def choose(self, model, records):
        return model.ensemble_choices(records)


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    GradientClusters(),
    OneAdapter("single", "one LoRA (rank r) on everything: the generalist"),
    OneAdapter("single-wide", "one LoRA of rank K·r on everything: as many parameters as K experts", wide=True),
    ContinuedGeneralist(),
    GradientOracle(),
    TrueLabels(),
    RandomClusters(),
    EmbeddingClusters(),
    ProjectionClusters(),
    ElreaEnsemble(),
)}
LIST_CHOICES["experts.strategies"] = STRATEGIES  # config validation accepts exactly the registered names


def get(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy `{name}` (choose from {', '.join(STRATEGIES)})")
    return STRATEGIES[name]


def trained(names: list[str]) -> list[str]:
    """Strategies whose adapters must be trained for `names`, the generalist first (the others branch from it and fall back to it)."""
    return list(dict.fromkeys([GENERALIST] + [get(n).owner for n in names]))


def routed(names: list[str]) -> list[str]:
    """Strategies among `names` (and the ones they serve) that need a router."""
    return [n for n in trained(names) if get(n).routed]


def cluster_count(run: RunFiles) -> int:
    """K of the run's gradient clusters: the controls use the same K."""
    return int(run.stage_entry("cluster")["k"])

