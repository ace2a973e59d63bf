"""Giving each data-parallel rank its shard of the data (chapter 4.1).

Two granularities:

* :func:`split_batch` cuts one global batch of B samples into N equal per-rank batches
  of B/N (what the gradient-averaging formula of chapter 3.1 assumes).
* :class:`ShardSampler` gives each rank its share of a whole dataset, epoch by epoch,
  with the same indices as PyTorch's ``DistributedSampler`` for the same seed.

The last, uneven part of a dataset is handled as ``DistributedSampler`` does, and said
so: by default the index list is padded by repeating its first indices until it splits
evenly (every sample is seen, a few twice); with ``drop_last=True`` the tail is dropped
(every sample at most once, a few not at all). Either way every rank gets the same
number of samples, so no rank waits for a step that the others never take.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Sampler


def split_batch(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s slice of a global batch; the batch must split evenly."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0 … {world_size - 1}")
    size = batch.shape[0]
    if size % world_size:
        lower, upper = size // world_size * world_size, -(-size // world_size) * world_size
        raise ValueError(
            f"a global batch of {size} does not split over {world_size} ranks: use a multiple of "
            f"{world_size} (e.g. {lower or world_size} or {upper}); for datasets, ShardSampler pads or drops")
    per_rank = size // world_size
    return batch[rank * per_rank: (rank + 1) * per_rank]


class ShardSampler(Sampler[int]):
    """Rank ``rank``'s indices of a dataset of ``length`` samples (chapter 4.1)."""

    def __init__(self, length: int, rank: int, world_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if length < 1:
            raise ValueError(f"the dataset is empty (length {length})")
        self.length, self.rank, self.world_size = length, rank, world_size
        self.shuffle, self.seed, self.drop_last, self.epoch = shuffle, seed, drop_last, 0
        self.per_rank = length // world_size if drop_last else math.ceil(length / world_size)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle differently each epoch (every rank must call it with the same epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:  # the same permutation on every rank: same seed, same epoch
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        total = self.per_rank * self.world_size
        if total > len(order):  # pad by repeating the first indices
            order += (order * math.ceil(total / len(order)))[: total - len(order)]
        return iter(order[:total][self.rank::self.world_size])
