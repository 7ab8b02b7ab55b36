"""Multi-process support under `torchrun` / `accelerate launch`: rank, world size, barrier.

The gradient pass is data-parallel: each rank streams its shard of batches into its own
consumers (sketch, projections…), then `tree_merge` folds them together in ⌈log₂ P⌉ rounds of
point-to-point sends (NCCL on GPUs, gloo on CPUs): in round s, rank r with r mod 2s = s sends its
state to rank r − s, which merges it. Each round moves one shard state (d×r' + N_shard×r' floats)
per pair, all pairs at once, and rank 0 ends with everything. Evaluation is sharded too (each
rank scores every world-size-th test record, `gather_to_main` brings them to rank 0), and so
are the adapters after the generalist (every strategy's in one deal, the largest first to the
least-loaded rank; one-process Trainer jobs, `experts.adapters.AdapterStage`); the warm-up and
the generalist train on every rank together (DDP, `models.train.TrainPlan.data_parallel`);
the strategies' routers, keep decisions and thresholds are dealt over the ranks like the experts.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from typing import Any

import torch


def world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment; (0, 1) when launched plainly."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init() -> None:
    rank, size = world()
    if size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        # a rank waits at a collective while another works alone (rank 0's stages, the longest expert of a deal), which
        # on a large run takes longer than the default 30-minute collective timeout
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(hours=24))
        if backend == "nccl":  # object collectives (gather_to_main) stage their bytes on the current device
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())


def close() -> None:
    """Leave the process group, on a rank that has finished its command in step with the others.

    A rank that exits with the group still open lets the interpreter tear down around gloo's worker threads, which may
    still hold tensors of finished work: freeing them then takes a GIL that is gone, and the rank dies of SIGABRT while
    its peers are still working (seen once in CI, on the rank that finished first). Not called on a failure: a rank
    whose peers wait in a collective would wait with them here, where exiting lets torchrun stop them all."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def is_main() -> bool:
    return world()[0] == 0


def from_main(item: Any) -> Any:
    """Rank 0's `item` on every rank (`item` itself in a one-process run)."""
    if world()[1] == 1 or not torch.distributed.is_initialized():
        return item
    box = [item]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def smallest(value: int) -> int:
    """The smallest of every rank's `value` (`value` itself in a one-process run)."""
    size = world()[1]
    if size == 1:
        return value
    values = [None] * size
    torch.distributed.all_gather_object(values, value)
    return min(values)


def fully_shard(model: torch.nn.Module, layers: list[torch.nn.Module], device: torch.device) -> None:
    """Shard `model` over every rank with FSDP2, in place, onto `device`: each of `layers` a unit of its own (its weights
    gathered only while it runs forward or backward), then the rest of `model` as the root unit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard as shard

    mesh = init_device_mesh(device.type, (world()[1],))
    for layer in layers:
        shard(layer, mesh=mesh)
    shard(model, mesh=mesh)


def gather_to_main(item: Any) -> list[Any] | None:
    """Every rank's `item`, in rank order, on rank 0 (None elsewhere); `[item]` in a one-process run."""
    rank, size = world()
    if size == 1:
        return [item]
    gathered = [None] * size if rank == 0 else None
    torch.distributed.gather_object(item, gathered, dst=0)
    return gathered


def strided_share(count: int) -> list[int]:
    """The positions of `count` items this rank takes: every world-size-th from its rank (all of them in one process)."""
    rank, size = world()
    return list(range(rank, count, size))


def gathered_in_order(count: int, positions: list[int], columns: dict) -> tuple[dict, list[int]] | None:
    """On rank 0, every rank's `columns` (name → one value per position it took, `strided_share`) back in the order of
    the `count` items, and how many items each rank took; None on the other ranks."""
    gathered = gather_to_main((positions, columns))
    if gathered is None:
        return None
    whole = {name: [None] * count for name in columns}
    for taken, part in gathered:
        for name, values in part.items():
            for position, value in zip(taken, values):
                whole[name][position] = value
    return whole, [len(taken) for taken, _ in gathered]


def send_tensors(tensors: dict[str, torch.Tensor], dst: int, device: torch.device | str = "cpu") -> None:
    """Send a dict of tensors: names, shapes and dtypes first (as one object), then each tensor from `device` (NCCL: a GPU)."""
    header = [[(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in tensors.items()]]
    torch.distributed.send_object_list(header, dst=dst)
    for tensor in tensors.values():
        torch.distributed.send(tensor.to(device).contiguous(), dst=dst)


def recv_tensors(src: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    header = [None]
    torch.distributed.recv_object_list(header, src=src)
    tensors = {}
    for name, shape, dtype in header[0]:
        tensors[name] = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        torch.distributed.recv(tensors[name], src=src)
    return tensors


def tree_merge(
    local: Any,
    state: Callable[[Any], dict[str, torch.Tensor]],
    restore: Callable[[dict[str, torch.Tensor]], Any],
    device: torch.device | str = "cpu",
) -> Any | None:
    """Merge every rank's `local` into rank 0's, pairwise in a binary tree; rank 0 gets the result, others None.

    `state` turns a consumer into tensors to send, `restore` builds a consumer from received ones,
    and `merge(other)` folds a disjoint shard in.
    """
    rank, size = world()
    step = 1
    while step < size:
        if rank % (2 * step) == step:
            send_tensors(state(local), rank - step, device)
            return None
        if rank + step < size:
            local.merge(restore(recv_tensors(rank + step, device)))
        step *= 2
    return local
