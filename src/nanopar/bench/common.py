"""What every benchmark shares: how an iteration is timed across ranks, and how two
implementations are compared (chapters 2 and 4).

Measuring on a small shared machine (see the book's appendix on measuring): every rank uses
one thread; the implementations being compared alternate within one run (A B, then B A, …)
so that a slow minute hurts both alike; each iteration is timed as the slowest rank's time,
as nccl-tests does. Two implementations are compared by the ratio of their times *pair by
pair* (an iteration of A against the adjacent iteration of B), then the median of those
ratios, with their quartiles as the spread the run saw: a slow minute slows both members of
a pair and cancels out of their ratio, where it would move a ratio of two medians.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, NamedTuple, Sequence

import torch
import torch.distributed as dist

from .. import models, text

KiB, MiB = 1 << 10, 1 << 20

# glibc gives freed blocks back to the OS, so the next step page-faults them in again: a
# whole-batch step took 25 000–40 000 faults per rank (10–20% of its time), micro-batched ones
# almost none. That would credit pipelining with an allocator effect, so the ranks keep their
# freed memory (as PyTorch's caching allocator does on GPUs). Children read these at start.
KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


class PairedRatio(NamedTuple):
    """How many times faster A ran than B: the median of ``t_B / t_A`` over adjacent pairs,
    its quartiles ``q1``, ``q3`` (the spread the run saw) and the number of ``pairs``."""

    median: float
    q1: float
    q3: float
    pairs: int


def speed_ratio(times_a: Sequence[float], times_b: Sequence[float]) -> PairedRatio:
    """A's speed relative to B's from paired timings: ``times_b[i] / times_a[i]`` for each i.

    ``times_a[i]`` and ``times_b[i]`` must have been measured side by side (alternating).
    Book: chapter 2 (ring against gloo) and chapter 4.1 (ours against DDP).
    """
    if len(times_a) != len(times_b) or not times_a:
        raise ValueError(f"need the same number (> 0) of paired timings, got {len(times_a)} and {len(times_b)}")
    ratios = [b / a for a, b in zip(times_a, times_b)]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return PairedRatio(statistics.median(ratios), q1, q3, len(ratios))


def slowest_rank(per_rank: Sequence[Sequence[float]]) -> list[float]:
    """Iteration by iteration, the slowest rank's time: an iteration lasts that long (nccl-tests' rule)."""
    return [max(ts) for ts in zip(*per_rank)]


def timed(op: Callable[[], object], barrier: bool, repeat: int = 1) -> float:
    """Seconds per call of ``op()`` on this rank, over ``repeat`` calls back to back, after a
    barrier when ``barrier`` (a call then lasts as long as its slowest rank). Repeating short
    calls spreads the ranks' uneven exits from the barrier over many of them, as nccl-tests does."""
    if barrier:
        dist.barrier()
    t0 = time.perf_counter()
    for _ in range(repeat):
        op()
    return (time.perf_counter() - t0) / repeat


def gpt_on_text(sizes: dict[str, int], sequences: int,
                seed: int = 0) -> tuple[models.GPTConfig, torch.Tensor, torch.Tensor]:
    """A GPT of ``sizes`` over the shipped corpus's characters, and ``sequences`` random windows
    of the text with their next-token targets: the data of ``bench hybrid`` and ``bench zero``."""
    corpus = text.load_corpus()
    tok = text.CharTokenizer(corpus)
    config = models.GPTConfig(vocab_size=tok.vocab_size, **sizes)
    x, y = text.get_batch(tok.encode(corpus), sequences, config.block_size, torch.Generator().manual_seed(seed))
    return config, x, y
