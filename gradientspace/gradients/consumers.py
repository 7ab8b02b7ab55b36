"""The one interface every consumer of the gradient stream implements (the sketch, the random projector, the exact store).

The gradient pass (`clustering.stages.run_gradient_pass`) hands each batch of per-sample gradient rows to
every consumer, checkpoints them through `state_dict`, and under torchrun merges the ranks'
consumers as a tree (`distributed.tree_merge`): so a consumer must be able to absorb a disjoint
shard, and to round-trip through a flat dict of tensors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from gradientspace.runs import atomic_path


class GradientConsumer(ABC):
    """Sees each sample's gradient row once, with its dataset index; shards merge; state round-trips."""

    @abstractmethod
    def add(self, rows: torch.Tensor, indices: list[int]) -> None:
        """Take a batch: `rows` (b×d) are the per-sample gradients of the samples `indices`."""

    @abstractmethod
    def merge(self, other: GradientConsumer) -> GradientConsumer:
        """Fold in the consumer of a disjoint shard (another rank's batches); returns self."""

    @abstractmethod
    def result(self) -> Any:
        """What the pass produced, over every sample added or merged."""

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed to resume or to merge, as named tensors."""

    @abstractmethod
    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> GradientConsumer:
        """Restore `state_dict`'s output into this consumer (built with the same settings); returns self."""

    def metadata(self) -> dict[str, str]:
        """Settings written beside the state in `save`, to rebuild the consumer from the file alone."""
        return {}

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={**self.metadata(), **(metadata or {})})

    def load(self, path: str | Path) -> GradientConsumer:
        return self.load_state_dict(load_file(str(path)))
