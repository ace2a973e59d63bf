"""What every benchmark shares: how an iteration is timed across ranks (chapters 2 and 4).

Measuring on a small shared machine (see the book's appendix on measuring): every rank uses
one thread; the implementations being compared alternate within one run (A B A B …) so that
a slow minute hurts both alike; we report medians over iterations, each iteration timed as
the slowest rank's time, as nccl-tests does.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import torch.distributed as dist

KiB, MiB = 1 << 10, 1 << 20

# glibc gives freed blocks back to the OS, so the next step page-faults them in again: a
# whole-batch step took 25 000–40 000 faults per rank (10–20% of its time), micro-batched ones
# almost none. That would credit pipelining with an allocator effect, so the ranks keep their
# freed memory (as PyTorch's caching allocator does on GPUs). Children read these at start.
KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def slowest_rank(per_rank: Sequence[Sequence[float]]) -> list[float]:
    """Iteration by iteration, the slowest rank's time: an iteration lasts that long (nccl-tests' rule)."""
    return [max(ts) for ts in zip(*per_rank)]


def timed(op: Callable[[], object], barrier: bool) -> float:
    """Seconds that ``op()`` took on this rank, after a barrier when ``barrier`` (a step then lasts as long as its slowest rank)."""
    if barrier:
        dist.barrier()
    t0 = time.perf_counter()
    op()
    return time.perf_counter() - t0
