"""Gradient buckets for bucketed data parallelism (chapter 4.1).

A bucket is one flat buffer holding the gradients of a few parameters of one dtype on one
device, all-reduced with a single call. This module holds the bookkeeping:

* :func:`bucket_cap_bytes` turns DDP's ``bucket_cap_mb`` into bytes, with clear errors;
* :func:`assign_buckets` decides which tensors share a bucket (pure, tested without
  processes), as DDP's ``compute_bucket_assignment_by_size`` does;
* :class:`Bucket` knows which of its parameters are ready in this step, packs their
  gradients, starts the all-reduce and hands the averages back as ``p.grad``.

When the buckets are launched, and in which order, is the data-parallel wrapper's
business (``nanopar.data_parallel.BucketedDataParallel``).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Hashable, Sequence

import torch
import torch.distributed as dist
from torch import nn

MB = 2**20  # DDP's bucket_cap_mb counts mebibytes


def bucket_cap_bytes(bucket_cap_mb: float) -> int:
    """``bucket_cap_mb`` megabytes in bytes, or an error that says what to pass (chapter 4.1)."""
    if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, numbers.Real):
        raise TypeError(f"bucket_cap_mb must be a number of megabytes (DDP uses 25), "
                        f"got {type(bucket_cap_mb).__name__} {bucket_cap_mb!r}")
    if not (bucket_cap_mb > 0 and math.isfinite(bucket_cap_mb)):
        raise ValueError(f"bucket_cap_mb must be a positive, finite number of megabytes (DDP uses 25), "
                         f"got {bucket_cap_mb}")
    cap = int(bucket_cap_mb * MB)
    if cap == 0:
        raise ValueError(f"bucket_cap_mb={bucket_cap_mb:g} is 0 bytes; use at least {1 / MB:.2g} "
                         "(one byte; DDP uses 25)")
    return cap


def assign_buckets(sizes_bytes: Sequence[int], cap_bytes: int,
                   keys: Sequence[Hashable] | None = None) -> list[list[int]]:
    """Group tensors, in the given order, into buckets of at most ``cap_bytes`` each.

    Only tensors with the same key (e.g. their dtype and device) share a bucket: each key
    fills its own open bucket. A tensor larger than the cap gets a bucket of its own.
    Buckets are listed in the order of their first tensor.
    """
    if cap_bytes <= 0:
        raise ValueError(f"cap_bytes must be positive, got {cap_bytes}")
    keys = [None] * len(sizes_bytes) if keys is None else keys
    if len(keys) != len(sizes_bytes):
        raise ValueError(f"{len(keys)} keys for {len(sizes_bytes)} tensors")
    buckets: list[list[int]] = []
    open_bucket: dict[Hashable, tuple[list[int], int]] = {}  # key -> (its bucket, bytes in it)
    for i, (size, key) in enumerate(zip(sizes_bytes, keys)):
        bucket, filled = open_bucket.get(key, (None, 0))
        if bucket is None or (filled + size > cap_bytes and filled > 0):
            bucket, filled = [], 0
            buckets.append(bucket)
        bucket.append(i)
        open_bucket[key] = (bucket, filled + size)
    return buckets


class Bucket:
    """The gradients of some parameters (one dtype, one device), all-reduced together."""

    def __init__(self, params: Sequence[tuple[str, nn.Parameter]], flag: bool = False):
        self.names = [name for name, _ in params]
        self.params = [p for _, p in params]
        first = self.params[0]
        # With ``flag``, one more element travels after the gradients: a number each rank
        # adds to the all-reduce (how many of its parameters got no gradient), so that
        # every rank learns the sum without a collective of its own.
        self.flat = torch.empty(sum(p.numel() for p in self.params) + flag, dtype=first.dtype,
                                device=first.device)
        self._flag = self.flat[-1:] if flag else None
        self._views, offset = [], 0
        for p in self.params:
            # Each slice has the parameter's own strides (channels_last, say): autograd lays
            # gradients out like their parameter, so p.grad can then be this very slice.
            strides = torch.empty_like(p, device="meta").stride()
            self._views.append(self.flat.as_strided(p.shape, strides, offset))
            offset += p.numel()
        self.ready: set[int] = set()  # ids of the parameters whose gradient is ready this step
        self.work = None  # the all-reduce in flight

    @property
    def full(self) -> bool:
        """Every parameter of the bucket has its gradient for this step."""
        return len(self.ready) == len(self.params)

    @property
    def launched(self) -> bool:
        """The bucket's all-reduce has been started in this step."""
        return self.work is not None

    def mark_ready(self, p: torch.Tensor) -> None:
        self.ready.add(id(p))

    def launch(self, world_size: int, group=None, flag: float = 0.0) -> None:
        """Pack the gradients, divided by N (as DDP does), and start their all-reduce.

        A parameter without a gradient contributes zeros: the caller has decided that
        this is allowed (``find_unused_parameters``) or will raise on every rank.
        ``flag`` is this rank's term of the flag's sum (buckets built with ``flag=True``).
        """
        for p, view in zip(self.params, self._views):
            if p.grad is None:
                view.zero_()
            else:
                torch.div(p.grad, world_size, out=view)
        if self._flag is not None:
            self._flag.fill_(flag)
        self.work = dist.all_reduce(self.flat, group=group, async_op=True)

    def flag_sum(self) -> float:
        """After :meth:`finish`: the sum over ranks of the ``flag`` they launched with."""
        return self._flag.item()

    def finish(self) -> None:
        """Wait for the all-reduce; each ``p.grad`` becomes its averaged slice of the bucket,
        without a copy (DDP's ``gradient_as_bucket_view``). Ready for the next step."""
        self.work.wait()
        for p, view in zip(self.params, self._views):
            p.grad = view
        self.ready.clear()
        self.work = None
