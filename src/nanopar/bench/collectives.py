"""``python -m nanopar bench collectives``: gloo's all-reduce against our ring (chapter 2)."""
from __future__ import annotations

import statistics
from typing import Any, Sequence

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .. import comm
from ..launch import RankContext, run
from .common import KiB, MiB, slowest_rank, timed

SIZES_FULL = [KiB << (2 * i) for i in range(10)]  # 1 KiB … 256 MiB, ×4 apart
SIZES_QUICK = [4 * KiB, 64 * KiB, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB]


def _iterations(nbytes: int, quick: bool) -> int:
    # Enough repeats for a stable median, without spending minutes on large messages.
    n = 40 if nbytes <= MiB else 20 if nbytes <= 16 * MiB else 10
    return n // 2 if quick else n


def bus_bandwidth(algbw: float, world_size: int) -> float:
    """nccl-tests' bus bandwidth of an all-reduce: algbw × 2(n−1)/n, comparable across n."""
    return algbw * 2 * (world_size - 1) / world_size if world_size > 1 else algbw


def all_reduce_timings(ctx: RankContext, sizes: Sequence[int], quick: bool) -> dict[str, dict[int, list[float]]]:
    """Worker: time gloo's ``all_reduce`` and our ring, alternating, for each message size."""
    impls = {"gloo": dist.all_reduce, "ring": comm.ring_all_reduce}
    out: dict[str, dict[int, list[float]]] = {name: {} for name in impls}
    for nbytes in sizes:
        x = torch.ones(nbytes // 4, dtype=torch.float32)
        for op in impls.values():  # warm-up: first calls allocate buffers and connections
            op(x)
        for _ in range(_iterations(nbytes, quick)):
            for name, op in impls.items():
                out[name].setdefault(nbytes, []).append(timed(lambda: op(x), barrier=True))
        ctx.tick()
    return out


def memcpy_timings(ctx: RankContext, sizes: Sequence[int], quick: bool) -> dict[int, list[float]]:
    """Worker: time copying a message from one buffer to another in this process."""
    out: dict[int, list[float]] = {}
    for nbytes in sizes:
        src = torch.ones(nbytes // 4)
        dst = torch.empty_like(src)
        dst.copy_(src)
        out[nbytes] = [timed(lambda: dst.copy_(src), barrier=False) for _ in range(_iterations(nbytes, quick))]
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
        "algbw_gbps": algbw,
        "busbw_gbps": bus_bandwidth(algbw, world_size),
    }


def bench_collectives(
    world_sizes: Sequence[int] = (2, 4), sizes: Sequence[int] | None = None, quick: bool = False,
    timeout: float = 900.0,
) -> list[dict[str, Any]]:
    """All-reduce time per message size: gloo vs our ring, plus a memory-copy baseline.

    Returns records with ``op, impl, world_size, bytes, seconds, algbw_gbps, busbw_gbps``.
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
            for impl in per_rank[0]:
                for nbytes in sizes:
                    # One iteration lasts as long as its slowest rank.
                    slowest = slowest_rank([p[impl][nbytes] for p in per_rank])
                    records.append(_record(impl, n, nbytes, slowest))
    return records


def ring_to_gloo_ratio(records: list[dict[str, Any]], world_size: int = 2, min_bytes: int = 4 * MiB) -> float:
    """Median over sizes ≥ ``min_bytes`` of ring busbw / gloo busbw at ``world_size``."""
    bw = {(r["impl"], r["bytes"]): r["busbw_gbps"] for r in records
          if r["world_size"] == world_size and r["bytes"] >= min_bytes}
    ratios = [bw[("ring", b)] / bw[("gloo", b)] for (impl, b) in bw if impl == "ring"]
    if not ratios:
        raise ValueError(f"no ring and gloo records at world size {world_size} with ≥ {min_bytes} bytes")
    return statistics.median(ratios)
