"""Every way of grouping the training records, in one registry.

The cluster stage groups by `cluster.method` (`PARTITIONERS[config.cluster.method]`), and the
control strategies group by the same classes (`random-clusters`, `embedding-clusters`,
`projection-clusters`, `oracle`), so a method and its control cannot drift apart. A partitioner
says what the gradient pass must write for it (nothing, a random projection of some width, every
full gradient) and reads the features it groups by; k-means, `k: auto` and the checks on empty
clusters are the cluster stage's (`stages.assign`).

A new method is one class here and one line in `PARTITIONERS`: `cluster.method` accepts it at once
(the registry registers its names in `config.CHOICES`).

| name | features | the gradient pass writes |
| --- | --- | --- |
| gradientspace | each sample's coordinates in the sketch's top-r basis of the exact gradients | the sketch (always) |
| random-projection | a Rademacher projection of each exact gradient (LESS / ELREA style) | that projection |
| exact | every full gradient (small N·d only) | every gradient |
| embedding | MiniLM embeddings of the prompts | nothing (no gradient pass) |
| random | none: balanced random groups | nothing |
| label | none: the records' own `source` labels (the oracle) | nothing |
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from safetensors.torch import load_file

from gradientspace.config import CHOICES, RunConfig
from gradientspace.data.records import Record


class Partitioner:
    """Features to group by (None: the grouping needs none) and what the gradient pass must write for them."""

    name: str
    reads_gradients = False  # its features come out of the gradient pass
    exact_gradients = False  # the gradient pass must keep every full gradient

    def projection_dim(self, config: RunConfig) -> int | None:
        """The width of the random projection the gradient pass must write for this partitioner, if any."""
        return None

    def features(self, run, records: Sequence[Record], device: torch.device) -> torch.Tensor | None:
        return None


class SketchCoordinates(Partitioner):
    name, reads_gradients = "gradientspace", True

    def features(self, run, records, device):
        return load_file(str(run.path("sketch.safetensors")))["coordinates"]


class RandomProjection(Partitioner):
    reads_gradients = True

    def __init__(self, name: str, width: Callable[[RunConfig], int]):
        self.name, self.width = name, width

    def projection_dim(self, config):
        return self.width(config)

    def features(self, run, records, device):
        path = run.path(f"projection-{self.width(run.config)}.safetensors")
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: the gradient pass writes it when `{self.name}` is asked for")
        return load_file(str(path))["features"]


class ExactGradients(Partitioner):
    name, reads_gradients, exact_gradients = "exact", True, True

    def features(self, run, records, device):
        return load_file(str(run.path("gradients-exact.safetensors")))["features"]


class PromptEmbeddings(Partitioner):
    name = "embedding"

    def features(self, run, records, device):
        from gradientspace.models.encoder import shared_embeddings

        return shared_embeddings([r.prompt_text for r in records], device)  # the routers embed the same prompts


class RandomGroups(Partitioner):
    name = "random"


class SourceLabels(Partitioner):
    """The records' own labels: the oracle's partition, never a clustering method (its K is the number of labels)."""

    name = "label"

    @staticmethod
    def groups(records: Sequence[Record], who: str) -> tuple[list[int], list[str]]:
        if any(r.source is None for r in records):
            raise ValueError(f"{who} needs a `source` label on every training record")
        names = sorted({r.source for r in records})
        return [names.index(r.source) for r in records], names


PARTITIONERS: dict[str, Partitioner] = {
    p.name: p
    for p in (
        SketchCoordinates(),
        # like for like with the sketch: as many dimensions as its rank unless `cluster.projection_dim` says otherwise
        RandomProjection("random-projection", lambda config: config.cluster.projection_dim or config.sketch.rank),
        PromptEmbeddings(),
        RandomGroups(),
        ExactGradients(),
    )
}
CHOICES["cluster.method"] = tuple(PARTITIONERS)  # config validation accepts exactly the registered methods
GRADIENT_METHODS = tuple(name for name, p in PARTITIONERS.items() if p.reads_gradients)
