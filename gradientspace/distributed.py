"""Multi-process support under `torchrun` / `accelerate launch`: rank, world size, barrier.

The gradient pass is data-parallel: each rank streams its shard of batches into its own sketch,
and rank 0 merges the shard sketches (see `OnlineSVD.merge`). Everything else runs on rank 0.
"""

from __future__ import annotations

import os

import torch


def world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment; (0, 1) when launched plainly."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init() -> None:
    rank, size = world()
    if size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def is_main() -> bool:
    return world()[0] == 0
