"""Data parallelism from scratch: the teaching ladder of chapter 4.1 (the math: chapter 3.1).

Every rank holds the whole model and a shard of each batch. After backward, the
gradients are averaged over ranks, θ ← θ − η·(1/N)·Σᵢ gᵢ, so every replica takes the
same step. The rungs differ only in *when* and *how* that average is communicated:

1. :class:`NaiveDataParallel`: after backward, one all-reduce per parameter tensor.
2. :class:`BucketedDataParallel`: gradients are packed into buckets (25 MB by default, as
   DDP) and each bucket is all-reduced asynchronously as soon as its last gradient is
   ready, while backward is still computing the rest (autograd hooks).
3. Gradient accumulation: ``with model.no_sync(): loss.backward()`` for k−1 micro-steps,
   then a normal step: one communication for k micro-batches (DDP's ``no_sync``).

Usage, on every rank (inside a worker started by ``nanopar.launch.run``):

    model = BucketedDataParallel(net)        # broadcasts rank 0's weights to all ranks
    loss_fn(model(x_shard), y_shard).backward()
    model.sync_gradients()                   # p.grad is now the average over ranks
    optimizer.step(); optimizer.zero_grad()
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn


def broadcast_parameters(module: nn.Module, src: int = 0, group=None) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (chapter 4.1)."""
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=src, group=group)


def check_same_parameters(module: nn.Module, group=None) -> None:
    """Raise on every rank if any rank's parameters or buffers differ from rank 0's.

    Compares a fingerprint (float64 sum and sum of squares of every tensor), so it costs
    one small all-gather, not a copy of the model.
    """
    names, tensors = zip(*[*module.named_parameters(), *module.named_buffers()])
    mine = torch.stack([torch.stack([t.detach().double().sum(), t.detach().double().square().sum()])
                        for t in tensors]).flatten().cpu()
    n = dist.get_world_size(group)
    every = [torch.empty_like(mine) for _ in range(n)]
    dist.all_gather(every, mine, group=group)
    for rank in range(1, n):
        differs = (every[rank] != every[0]).view(-1, 2).any(dim=1)
        if differs.any():
            first = names[int(differs.nonzero()[0])]
            raise ValueError(
                f"rank {rank} starts from different parameters than rank 0 (first: {first!r}, "
                f"{int(differs.sum())} tensors differ). Data parallelism needs identical replicas: "
                "keep broadcast=True, or seed every rank the same before building the model.")


class _DataParallel(nn.Module):
    """What every rung shares: the replica, its process group, the start-up checks."""

    def __init__(self, module: nn.Module, group=None, broadcast: bool = True,
                 find_unused_parameters: bool = False):
        super().__init__()
        self.module, self.group = module, group
        self.world_size = dist.get_world_size(group)
        self.find_unused_parameters = find_unused_parameters
        self.comm_seconds = 0.0  # time the caller spent blocked on communication
        self._sync_enabled = True
        self._params = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        if broadcast:
            broadcast_parameters(module, group=group)
        check_same_parameters(module, group)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (no communication) inside this block."""
        self._sync_enabled = False
        try:
            yield
        finally:
            self._sync_enabled = True

    def _zero_fill(self, missing: list[tuple[str, torch.Tensor]]) -> None:
        """Parameters that got no gradient this step: an error, or zeros when allowed."""
        if missing and not self.find_unused_parameters:
            names = [name for name, _ in missing]
            raise RuntimeError(
                f"{len(names)} parameter(s) got no gradient this step: {names[:5]}. If the model "
                "really skips them (e.g. a branch not taken), pass find_unused_parameters=True to "
                "average zeros for them, as DDP does; otherwise, check that the loss uses them.")
        for _, p in missing:
            p.grad = torch.zeros_like(p)

    def _check_not_in_no_sync(self) -> None:
        if not self._sync_enabled:
            raise RuntimeError("sync_gradients() inside no_sync(): call it after the last micro-step")


class NaiveDataParallel(_DataParallel):
    """Rung 1: after backward, all-reduce every gradient tensor and divide by N (chapter 4.1)."""

    def sync_gradients(self) -> None:
        """Average ``p.grad`` over ranks, one blocking all-reduce per parameter."""
        self._check_not_in_no_sync()
        self._zero_fill([(n, p) for n, p in self._params if p.grad is None])
        t0 = time.perf_counter()
        for _, p in self._params:
            dist.all_reduce(p.grad, group=self.group)
            p.grad.div_(self.world_size)
        self.comm_seconds += time.perf_counter() - t0


def assign_buckets(sizes_bytes: list[int], cap_bytes: int) -> list[list[int]]:
    """Group tensors, in the given order, into buckets of at most ``cap_bytes`` each.

    A tensor larger than the cap gets a bucket of its own. Pure, so it is tested
    without processes; DDP's ``bucket_cap_mb`` plays the same role.
    """
    if cap_bytes <= 0:
        raise ValueError(f"the bucket size must be positive, got {cap_bytes} bytes")
    buckets: list[list[int]] = []
    filled = cap_bytes  # forces a new bucket for the first tensor
    for i, size in enumerate(sizes_bytes):
        if filled + size > cap_bytes and filled > 0:
            buckets.append([])
            filled = 0
        buckets[-1].append(i)
        filled += size
    return buckets


class BucketedDataParallel(_DataParallel):
    """Rung 2: bucketed, overlapped gradient all-reduce, as DDP does it (chapter 4.1).

    Parameters are bucketed in reverse registration order, roughly the order in which
    backward produces their gradients. When a bucket's last gradient arrives, its
    gradients are copied (pre-divided by N) into one flat buffer and all-reduced
    asynchronously; buckets are launched strictly in order so that every rank issues
    the same sequence of collectives. ``sync_gradients`` waits, then points each ``.grad``
    at its averaged slice of the bucket, without copying.
    """

    def __init__(self, module: nn.Module, bucket_mb: float = 25.0, group=None, broadcast: bool = True,
                 find_unused_parameters: bool = False):
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be a positive number of megabytes (DDP uses 25), got {bucket_mb}")
        super().__init__(module, group, broadcast, find_unused_parameters)
        order = self._params[::-1]
        groups = assign_buckets([p.numel() * p.element_size() for _, p in order], int(bucket_mb * 2**20))
        self.buckets = [[order[i] for i in g] for g in groups]
        self._bucket_of = {id(p): b for b, bucket in enumerate(self.buckets) for _, p in bucket}
        self._buffers = [torch.empty(sum(p.numel() for _, p in bucket), dtype=bucket[0][1].dtype,
                                     device=bucket[0][1].device) for bucket in self.buckets]
        for _, p in self._params:
            p.register_post_accumulate_grad_hook(self._on_grad_ready)
        self._reset()

    def _reset(self) -> None:
        self._arrived: set[int] = set()  # ids of the parameters whose gradient is ready this step
        self._ready = [0] * len(self.buckets)
        self._works: list = []

    def _on_grad_ready(self, p: torch.Tensor) -> None:
        if not self._sync_enabled:
            return
        self._arrived.add(id(p))
        self._ready[self._bucket_of[id(p)]] += 1
        self._launch_ready_buckets()

    def _launch_ready_buckets(self) -> None:
        # In order only: bucket b goes after buckets 0 … b−1, on every rank alike.
        while len(self._works) < len(self.buckets):
            b = len(self._works)
            if self._ready[b] < len(self.buckets[b]):
                return
            flat, offset = self._buffers[b], 0
            for _, p in self.buckets[b]:  # pack and pre-divide by N in one pass, as DDP does
                torch.div(p.grad.view(-1), self.world_size, out=flat[offset: offset + p.numel()])
                offset += p.numel()
            self._works.append(dist.all_reduce(flat, group=self.group, async_op=True))

    def sync_gradients(self) -> None:
        """Wait for every bucket's all-reduce and write the averaged gradients to ``p.grad``."""
        self._check_not_in_no_sync()
        if len(self._works) < len(self.buckets):  # some gradients never arrived
            self._zero_fill([(n, p) for bucket in self.buckets[len(self._works):] for n, p in bucket
                             if id(p) not in self._arrived])
            self._ready = [len(bucket) for bucket in self.buckets]
            self._launch_ready_buckets()
        t0 = time.perf_counter()
        for work in self._works:
            work.wait()
        self.comm_seconds += time.perf_counter() - t0
        for bucket, flat in zip(self.buckets, self._buffers):
            offset = 0
            for _, p in bucket:  # the averages stay where they are: .grad becomes a view of the
                p.grad = flat[offset: offset + p.numel()].view_as(p)  # bucket (DDP's gradient_as_bucket_view)
                offset += p.numel()
        self._reset()
