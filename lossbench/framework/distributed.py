"""Data-parallel plumbing: process-group set-up from ``torchrun``'s environment, and a sampler that
gives every rank its slice of the *same* global batches a single process would draw.

With ``--batch-size B`` (the global batch) and ``W`` ranks, global batch ``k`` of epoch ``e`` is
``perm[k*B:(k+1)*B]`` of one permutation seeded by ``(seed, e)``; rank ``r`` takes the contiguous
``B/W`` samples ``r*B/W .. (r+1)*B/W`` of it. DDP averages the ranks' gradients, so each step equals
the single-process step on the same global batch (up to float summation order, and except for
per-rank BatchNorm statistics, which ``--sync-bn`` removes on GPUs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, List

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group ``torchrun`` describes (NCCL on CUDA, gloo on CPU); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local)


def all_reduce_sum(values: List[float], device: torch.device, info: DistInfo) -> List[float]:
    """Sum a few numbers over all ranks (identity in a single process)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


class GlobalBatchSampler(Sampler[List[int]]):
    """Batches of indices for one rank: its slice of each global batch (see module docstring).

    Incomplete last global batches are dropped when ``drop_last`` (and the data holds more than one).
    """

    def __init__(self, n: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, drop_last: bool = True):
        if global_batch % world_size:
            raise ValueError(f"batch_size (global) {global_batch} must be divisible by the world size {world_size}")
        self.n, self.B, self.seed, self.rank, self.W = n, global_batch, seed, rank, world_size
        self.shuffle = shuffle
        self.drop_last = drop_last and n > global_batch

    def __len__(self) -> int:
        return self.n // self.B if self.drop_last else -(-self.n // self.B)

    def __iter__(self) -> Iterator[List[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed)
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        per = self.B // self.W
        for k in range(len(self)):
            batch = perm[k * self.B:(k + 1) * self.B]
            if len(batch) < self.B:  # last, partial batch: split as evenly as possible
                per_last = -(-len(batch) // self.W)
                part = batch[self.rank * per_last:(self.rank + 1) * per_last]
            else:
                part = batch[self.rank * per:(self.rank + 1) * per]
            if part:
                yield part
