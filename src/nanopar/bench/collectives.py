"""``python -m nanopar bench collectives``: gloo's all-reduce against our ring (chapter 2)."""
from __future__ import annotations

import functools
import statistics
from typing import Any, Sequence

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .. import comm
from ..launch import RankContext, run
from .common import KiB, MiB, PairedRatio, slowest_rank, speed_ratio, timed

SIZES_FULL = [KiB << (2 * i) for i in range(10)]  # 1 KiB … 256 MiB, ×4 apart
SIZES_QUICK = [4 * KiB, 64 * KiB, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB]
WARMUP_CALLS = 3  # the first calls allocate buffers, open connections and fault pages in


def _timings_per_size(quick: bool) -> int:
    # Per implementation. The ring/gloo ratio of one pair of timings varies by ±15–20% (its
    # quartiles) on the book's 2-core machine: its median needs dozens of pairs to settle.
    return 40 if quick else 80


def _calls_per_timing(nbytes: int) -> int:
    # Each timing spans about 32 MiB of all-reduces (8 calls at most): the ranks leave the
    # barrier up to a scheduler tick apart, which would swamp one call of a 4 MiB message.
    return max(1, min(8, 32 * MiB // nbytes))


def bus_bandwidth(algbw: float, world_size: int) -> float:
    """nccl-tests' bus bandwidth of an all-reduce: algbw × 2(n−1)/n, comparable across n."""
    return algbw * 2 * (world_size - 1) / world_size if world_size > 1 else algbw


def all_reduce_timings(ctx: RankContext, sizes: Sequence[int], quick: bool) -> dict[str, dict[int, list[float]]]:
    """Worker: seconds per call of gloo's ``all_reduce`` and of our ring, for each message size,
    in pairs whose order alternates (gloo then ring, ring then gloo, …)."""
    impls = {"gloo": dist.all_reduce, "ring": comm.ring_all_reduce}
    out: dict[str, dict[int, list[float]]] = {name: {} for name in impls}
    for nbytes in sizes:
        x = torch.zeros(nbytes // 4)  # the values do not matter; zeros stay finite however often summed
        for op in impls.values():
            for _ in range(WARMUP_CALLS):
                op(x)
        for i in range(_timings_per_size(quick)):
            # Neither always goes first, so neither always inherits the other's traces
            # (the cache's contents, a rank still catching up).
            for name in list(impls)[:: 1 if i % 2 == 0 else -1]:
                seconds = timed(functools.partial(impls[name], x), barrier=True, repeat=_calls_per_timing(nbytes))
                out[name].setdefault(nbytes, []).append(seconds)
        ctx.tick()
    return out


def memcpy_timings(ctx: RankContext, sizes: Sequence[int], quick: bool) -> dict[int, list[float]]:
    """Worker: seconds per copy of a message from one buffer to another in this process."""
    out: dict[int, list[float]] = {}
    for nbytes in sizes:
        src = torch.ones(nbytes // 4)
        dst = torch.empty_like(src)
        dst.copy_(src)
        out[nbytes] = [timed(functools.partial(dst.copy_, src), barrier=False, repeat=_calls_per_timing(nbytes))
                       for _ in range(_timings_per_size(quick))]
        ctx.tick()
    return out


def _record(impl: str, world_size: int, nbytes: int, times: list[float]) -> dict[str, Any]:
    seconds = statistics.median(times)
    algbw = nbytes / seconds / 1e9
    return {
        "op": "copy" if impl == "memcpy" else "all_reduce",
        "impl": impl,
        "world_size": world_size,
        "bytes": nbytes,
        "seconds": seconds,
        "seconds_min": min(times),
        "seconds_max": max(times),
        "iterations": len(times),
        "calls_per_iteration": _calls_per_timing(nbytes),
        "seconds_each": times,  # in the order measured; the ring's i-th pairs with gloo's i-th
        "algbw_gbps": algbw,
        "busbw_gbps": bus_bandwidth(algbw, world_size),
    }


def bench_collectives(
    world_sizes: Sequence[int] = (2, 4), sizes: Sequence[int] | None = None, quick: bool = False,
    timeout: float = 900.0,
) -> list[dict[str, Any]]:
    """All-reduce time per message size: gloo vs our ring, plus a memory-copy baseline.

    Returns records with ``op, impl, world_size, bytes, seconds`` (the median per call),
    ``algbw_gbps, busbw_gbps`` and ``seconds_each`` (every timing, in order); the ring's
    records add ``busbw_vs_gloo`` (its bus bandwidth over gloo's, pair by pair, as in
    :func:`ring_vs_gloo`) and that ratio's quartiles ``busbw_vs_gloo_q1``, ``busbw_vs_gloo_q3``.
    Book: chapter 2, notebook ``ring_allreduce``.
    """
    sizes = list(sizes or (SIZES_QUICK if quick else SIZES_FULL))
    if any(s < 4 * max(world_sizes) or s % 4 for s in sizes):
        raise ValueError("message sizes must be multiples of 4 bytes, at least 4 bytes per rank")
    records: list[dict[str, Any]] = []
    with tqdm(total=len(sizes) * (1 + len(world_sizes)), desc="bench collectives", unit="size") as bar:
        (copies,) = run(memcpy_timings, 1, sizes, quick, progress=bar, timeout=timeout)
        records += [_record("memcpy", 1, b, t) for b, t in copies.items()]
        for n in world_sizes:
            per_rank = run(all_reduce_timings, n, sizes, quick, backend="gloo", progress=bar, timeout=timeout)
            for nbytes in sizes:
                # One iteration lasts as long as its slowest rank.
                gloo, ring = (_record(impl, n, nbytes, slowest_rank([p[impl][nbytes] for p in per_rank]))
                              for impl in ("gloo", "ring"))
                ratio = speed_ratio(ring["seconds_each"], gloo["seconds_each"])
                ring.update(busbw_vs_gloo=ratio.median, busbw_vs_gloo_q1=ratio.q1, busbw_vs_gloo_q3=ratio.q3)
                records += [gloo, ring]
    return records


def ring_vs_gloo(records: list[dict[str, Any]], world_size: int = 2, min_bytes: int = 4 * MiB) -> PairedRatio:
    """Our ring's bus bandwidth over gloo's at ``world_size``, for messages of ``min_bytes`` or more:
    the median and quartiles of gloo's time over the ring's, pair by pair, every size pooled."""
    each = {(r["impl"], r["bytes"]): r["seconds_each"] for r in records
            if r["op"] == "all_reduce" and r["world_size"] == world_size and r["bytes"] >= min_bytes}
    sizes = sorted(b for impl, b in each if impl == "ring" and ("gloo", b) in each)
    if not sizes:
        raise ValueError(f"no ring and gloo records at world size {world_size} with ≥ {min_bytes} bytes")
    return speed_ratio([t for b in sizes for t in each[("ring", b)]], [t for b in sizes for t in each[("gloo", b)]])


def ring_to_gloo_ratio(records: list[dict[str, Any]], world_size: int = 2, min_bytes: int = 4 * MiB) -> float:
    """The figure chapter 2 quotes: the median of :func:`ring_vs_gloo`."""
    return ring_vs_gloo(records, world_size, min_bytes).median
