"""Data-parallel SNL under ``torchrun``: the process group, rank-0 decisions and I/O, the batch sampler.

Every helper is a no-op (or returns its input) in a single process, so the training code has
one path. Rank 0 is the authority: its model, its ReLU counts and accuracies, its files.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler

from snl_fx.errors import SnlFxError

T = TypeVar("T")


def world_size() -> int:
    """Processes in the default process group; 1 when there is none."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank: in the process group, else torchrun's ``RANK``, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def is_main() -> bool:
    """Whether this process is rank 0, the one that writes files and logs."""
    return rank() == 0


def local_rank() -> int | None:
    """torchrun's ``LOCAL_RANK`` (the GPU index of this process on its node), None outside torchrun."""
    value = os.environ.get("LOCAL_RANK")
    return int(value) if value is not None else None


def init_from_env(device: torch.device) -> bool:
    """Start the default process group when launched by torchrun (``WORLD_SIZE`` > 1) and none exists.

    Backend: NCCL for a CUDA ``device``, gloo otherwise. A group started by the caller is used as
    it is. Returns whether training is distributed (more than one process).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return world_size() > 1


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if world_size() > 1:
        dist.barrier()


def from_rank0(value: T) -> T:
    """Rank 0's ``value`` on every rank (picklable objects), so decisions never diverge."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank0(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only; the other ranks wait and get its result."""
    return from_rank0(fn() if is_main() else None)


def mean_over_ranks(stats: dict[str, float]) -> dict[str, float]:
    """Per-key mean of a dict of numbers over the ranks (e.g. an epoch's loss)."""
    if world_size() == 1:
        return stats
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, stats)
    return {k: sum(g[k] for g in gathered) / len(gathered) for k in stats}


def broadcast_state(module: nn.Module) -> None:
    """Overwrite every rank's parameters and buffers with rank 0's, in place."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


@contextmanager
def data_parallel(module: nn.Module, device: torch.device, sync_bn: bool = False) -> Iterator[nn.Module]:
    """``module`` in DistributedDataParallel for the block (``module`` itself in one process).

    With ``sync_bn``, its BatchNorm layers run as SyncBatchNorm (sharing their parameters and
    buffers) inside the block and come back afterwards; torch 2.14 syncs them on GPUs only.
    """
    if world_size() == 1:
        yield module
        return
    swapped: dict[str, nn.Module] = {}
    if sync_bn:
        if device.type != "cuda":
            raise SnlFxError("sync_bn=True needs CUDA: torch's SyncBatchNorm does not run on CPU tensors")
        for name, child in list(module.named_modules()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                module.set_submodule(name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
                swapped[name] = child
    try:
        yield DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)
    finally:
        for name, child in swapped.items():
            module.set_submodule(name, child)


class ShardedBatchSampler(Sampler[list[int]]):
    """Seeded shuffled batches of ``batch_size`` (the global batch); rank ``r`` takes items ``r::world``.

    At every step the ranks' batches together are exactly the one-process batch with the same
    seed, so DDP (gradients averaged) with a mean-reduced loss follows one process with the
    global batch, exactly so when ``world`` divides the batch. A last batch with fewer than two
    items per rank is topped up from the start of the epoch, so every rank takes the same steps
    and BatchNorm never sees a batch of one sample.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        for start in range(0, self.n, self.batch_size):
            batch = order[start : start + self.batch_size]
            need = min(self.batch_size, 2 * self.world, self.n) if self.batch_size > 1 else self.world
            while len(batch) < need:
                batch += order[: need - len(batch)]
            yield batch[self.rank :: self.world]


__all__ = [
    "ShardedBatchSampler",
    "barrier",
    "broadcast_state",
    "data_parallel",
    "from_rank0",
    "init_from_env",
    "is_main",
    "local_rank",
    "mean_over_ranks",
    "on_rank0",
    "rank",
    "world_size",
]
