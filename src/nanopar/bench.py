"""Benchmarks behind ``python -m nanopar bench …``: JSON records, compared as ratios.

Book: chapter 2 (collectives), chapter 4.1 (data parallelism), chapter 4.2 (pipelines).

Measuring on a small shared machine (DESIGN.md): every rank uses one thread; the
implementations being compared alternate within one run (A B A B …) so that a slow
minute hurts both alike; we report medians over iterations, each iteration timed as the
slowest rank's time, as nccl-tests does.
"""
from __future__ import annotations

import functools
import statistics
import time
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import comm, devices, models, schedules
from .launch import RankContext, run
from .model_split import even_split_points, split
from .pipeline import check_microbatches, execute, measured_idle_fraction, time_budget
from .training import IMPLS, make_classification_data, seeded, timed_steps

KiB, MiB = 1 << 10, 1 << 20
SIZES_FULL = [KiB << (2 * i) for i in range(10)]  # 1 KiB … 256 MiB, ×4 apart
SIZES_QUICK = [4 * KiB, 64 * KiB, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB]


def _iterations(nbytes: int, quick: bool) -> int:
    # Enough repeats for a stable median, without spending minutes on large messages.
    n = 40 if nbytes <= MiB else 20 if nbytes <= 16 * MiB else 10
    return n // 2 if quick else n


def slowest_rank(per_rank: Sequence[Sequence[float]]) -> list[float]:
    """Iteration by iteration, the slowest rank's time: an iteration lasts that long (nccl-tests' rule)."""
    return [max(ts) for ts in zip(*per_rank)]


def bus_bandwidth(algbw: float, world_size: int) -> float:
    """nccl-tests' bus bandwidth of an all-reduce: algbw × 2(n−1)/n, comparable across n."""
    return algbw * 2 * (world_size - 1) / world_size if world_size > 1 else algbw


def _timed(op, barrier: bool) -> float:
    if barrier:
        dist.barrier()
    t0 = time.perf_counter()
    op()
    return time.perf_counter() - t0


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
                out[name].setdefault(nbytes, []).append(_timed(lambda: op(x), barrier=True))
        ctx.tick()
    return out


def memcpy_timings(ctx: RankContext, sizes: Sequence[int], quick: bool) -> dict[int, list[float]]:
    """Worker: time copying a message from one buffer to another in this process."""
    out: dict[int, list[float]] = {}
    for nbytes in sizes:
        src = torch.ones(nbytes // 4)
        dst = torch.empty_like(src)
        dst.copy_(src)
        out[nbytes] = [_timed(lambda: dst.copy_(src), barrier=False) for _ in range(_iterations(nbytes, quick))]
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


# Two workloads on one model: the same 4×1024 MLP (4.2 M parameters, 17 MB of fp32
# gradients to all-reduce per step) with a large and a small per-rank batch. Compute
# grows with the batch, communication does not, so t_comm / t_comp sets the scaling.
DP_MODEL = "mlp-4x1024"
DP_WORKLOADS = {"compute-bound": 1024, "communication-bound": 8}


def _dp_model():
    return models.mlp(1024, 4, in_features=1024, out_features=10)


def bench_dp(world_sizes: Sequence[int] = (1, 2, 4), quick: bool = False,
             workloads: dict[str, int] | None = None, bucket_mb: float = 25.0,
             timeout: float = 1800.0) -> list[dict[str, Any]]:
    """Throughput of one process, naive DP, bucketed DP and DDP (chapter 4.1).

    Each world size is one launch in which every rank alternates the implementations
    round by round; each step's time is the slowest rank's, and the median is reported.
    """
    workloads = workloads or DP_WORKLOADS
    rounds, steps = (4, 3) if quick else (8, 5)
    records: list[dict[str, Any]] = []
    with tqdm(total=len(workloads) * len(world_sizes) * (rounds + 1), desc="bench dp", unit="round") as bar:
        for workload, batch in workloads.items():
            single = None
            for n in sorted(world_sizes):
                impls = (("single",) if n == 1 else ()) + IMPLS
                per_rank = run(timed_steps, n, _dp_model, batch, impls, rounds, steps, (1024,), 10,
                               bucket_mb, progress=bar, timeout=timeout)
                for impl in impls:
                    step = slowest_rank([p[impl]["step_s"] for p in per_rank])
                    comm = slowest_rank([p[impl]["comm_s"] for p in per_rank])
                    rec = {
                        "impl": impl, "model": DP_MODEL, "workload": workload, "world_size": n,
                        "bucket_mb": None if impl in ("single", "naive") else bucket_mb,
                        "per_rank_batch": batch, "step_s": statistics.median(step),
                        "step_s_min": min(step), "step_s_max": max(step),
                        "comm_s": None if impl in ("single", "ddp") else statistics.median(comm),
                    }
                    rec["samples_per_s"] = n * batch / rec["step_s"]
                    if impl == "single":
                        single = rec["samples_per_s"]
                    records.append(rec)
            if single is None:
                raise ValueError("world_sizes must include 1: efficiency is measured against one process")
            for rec in records:
                if rec["workload"] == workload:
                    rec["scaling_efficiency"] = rec["samples_per_s"] / (rec["world_size"] * single)
    return records


def dp_ratio(records: list[dict[str, Any]], workload: str, world_size: int, impl: str, over: str) -> float:
    """Throughput of ``impl`` divided by that of ``over`` (e.g. bucketed / ddp)."""
    rate = {r["impl"]: r["samples_per_s"] for r in records
            if r["workload"] == workload and r["world_size"] == world_size}
    return rate[impl] / rate[over]


# --- pipeline parallelism (chapter 4.2) ----------------------------------------------------
# A stack of identical 3×3 convolutions: compute-dense (about 190 GFLOP/s on one thread of
# our 2-core test machine, as fast per sample at 4 samples per micro-batch as at 128), so that pipelining can pay on
# CPU ranks, and every stage gets as many blocks. The stem is a 1×1 convolution (3 → 64
# channels): a 3×3 one over 3 channels runs slowly enough to make stage 0 about 10% slower.
# Stem and head then cost a few % of a stage. Sizes are read when the bench starts.
PIPE_BLOCKS, PIPE_CHANNELS, PIPE_SIZE, PIPE_BATCH, PIPE_CLASSES = 8, 64, 16, 128, 10
PIPE_MICROBATCHES = (1, 2, 4, 8, 16)
# glibc gives freed blocks back to the OS, so the next step page-faults them in again: a
# whole-batch step took 25 000–40 000 faults per rank (10–20% of its time), micro-batched ones
# almost none. That would credit pipelining with an allocator effect, so the ranks keep their
# freed memory (as PyTorch's caching allocator does on GPUs). Children read these at start.
KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def pipe_model(blocks: int = 8, channels: int = 64, classes: int = 10) -> nn.Sequential:
    """``blocks`` alike blocks, conv 3×3 + ReLU; the first also holds a 1×1 stem, the last the head (chapter 4.2)."""
    seq = [nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU()) for _ in range(blocks)]
    seq[0].insert(0, nn.Conv2d(3, channels, 1))
    seq[-1].extend([nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)])
    return nn.Sequential(*seq)


def pipeline_configs(p: int, microbatches: Sequence[int], single: bool = False) -> list[tuple[str, str, int]]:
    """The ``(impl, schedule, m)`` measured at ``p`` stages; "naive" is the whole batch as one micro-batch."""
    configs = [("single", "naive", 1)] if single else []
    for impl in ("nanopar", "torch"):
        configs.append((impl, "naive", 1))  # for torch: ScheduleGPipe with one micro-batch
        configs += [(impl, "gpipe", m) for m in microbatches]
        # torch's Schedule1F1B refuses fewer micro-batches than stages: those are skipped.
        configs += [(impl, "1f1b", m) for m in microbatches if impl == "nanopar" or m >= p]
    return configs


def pipeline_timings(ctx: RankContext, build: Callable[[], nn.Module], boundaries: Sequence[int], batch: int,
                     shape: tuple[int, ...], classes: int, configs: Sequence[tuple[str, str, int]],
                     rounds: int) -> dict[tuple, dict]:
    """Worker: each config's step time on this rank, configs alternating round by round (chapter 4.2).

    A barrier precedes every step, so a step's time is the slowest rank's. "single" is the
    unsplit model on rank 0 alone (one process, one thread) while the other ranks wait.
    Our executor's op timings and peak activation bytes come back too.
    """
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    p, first, last = ctx.world_size, ctx.rank == 0, ctx.rank == ctx.world_size - 1
    x, y = make_classification_data(batch, shape, classes)
    stage = split(seeded(build), boundaries)[ctx.rank]
    whole = seeded(build) if first else None
    runners = {}
    for impl, name, m in configs:
        if impl == "single":
            step = (lambda: F.cross_entropy(whole(x), y).backward()) if first else (lambda: None)
            runners[impl, name, m] = (whole, step)
        elif impl == "nanopar":
            ops = schedules.make(name, p, m)
            runners[impl, name, m] = (stage, lambda ops=ops, m=m: execute(stage, ctx.rank, p, ops, x, y, m, ctx.device))
        else:
            cls = Schedule1F1B if name == "1f1b" else ScheduleGPipe
            sched = cls(PipelineStage(stage, ctx.rank, p, ctx.device), m, loss_fn=F.cross_entropy)
            args, kwargs = ((x,) if first else ()), ({"target": y} if last else {})
            runners[impl, name, m] = (stage, lambda s=sched, a=args, k=kwargs: s.step(*a, **k))
    out = {c: {"step_s": [], "timings": [], "peak_activation_bytes": None} for c in configs}
    for r in range(rounds + 1):  # round 0 warms up (torch infers shapes, buffers get allocated)
        for c, (module, step) in runners.items():
            if module is not None:
                module.zero_grad(set_to_none=True)
            dist.barrier()
            t0 = time.perf_counter()
            res = step()
            if r:
                out[c]["step_s"].append(time.perf_counter() - t0)
                if isinstance(res, dict):  # ours
                    out[c]["timings"].append(res["timings"])
                    out[c]["peak_activation_bytes"] = res["peak_activation_bytes"]
            ctx.tick()
    return out


def bench_pipeline(stages: Sequence[int] = (2, 4), microbatches: Sequence[int] = PIPE_MICROBATCHES,
                   quick: bool = False, rounds: int | None = None, timeout: float = 1800.0) -> list[dict[str, Any]]:
    """Naive split, GPipe and 1F1B, ours and ``torch.distributed.pipelining``, and one process (chapter 4.2).

    One launch of CPU (gloo) ranks per stage count, configs alternating. ``speedup_vs_naive``
    is over the same impl's naive split at the same stages; for "single" (measured in the
    launch with the fewest stages) over our naive split there: > 1 means splitting cost time.
    ``peak_activation_bytes`` is the largest stage's, ours only; so are ``messages_s`` and
    ``slow_ops_s``, what communication and uneven op times added to the step
    (``pipeline.time_budget``, median over rounds). The ranks keep freed memory
    (see ``KEEP_FREED_MEMORY``). More ranks than cores (4 stages on 2 cores) share the
    cores: read those ratios with care.
    """
    stages, rounds = sorted(stages), rounds or (4 if quick else 8)
    for m in microbatches:
        check_microbatches(PIPE_BATCH, m)
    build = functools.partial(pipe_model, PIPE_BLOCKS, PIPE_CHANNELS, PIPE_CLASSES)
    plan = {p: pipeline_configs(p, microbatches, single=p == stages[0]) for p in stages}
    records: list[dict[str, Any]] = []
    with tqdm(total=sum(map(len, plan.values())) * (rounds + 1), desc="bench pipeline", unit="step") as bar:
        for p, configs in plan.items():
            per_rank = run(pipeline_timings, p, build, even_split_points(PIPE_BLOCKS, p), PIPE_BATCH,
                           (3, PIPE_SIZE, PIPE_SIZE), PIPE_CLASSES, configs, rounds, backend="gloo",
                           progress=bar, timeout=timeout, env=KEEP_FREED_MEMORY)
            for impl, name, m in configs:
                res = [r[impl, name, m] for r in per_rank]
                step = slowest_rank([r["step_s"] for r in res])
                ours = impl == "nanopar"
                steps = [list(t) for t in zip(*(r["timings"] for r in res))]  # per round, per rank
                bubble = [measured_idle_fraction(t) for t in steps]
                budget = [time_budget(t) for t in steps]
                records.append({
                    "impl": impl, "schedule": name, "stages": 1 if impl == "single" else p, "microbatches": m,
                    "global_batch": PIPE_BATCH, "cpu_cores": devices.cpu_cores(), "step_s": statistics.median(step),
                    "step_s_min": min(step), "step_s_max": max(step), "rounds": len(step),
                    "bubble_measured": statistics.median(bubble) if ours else None,
                    "bubble_theory": 0.0 if impl == "single" else schedules.bubble_fraction(p, m),
                    "speedup_theory": 1.0 if name == "naive" else p * m / (m + p - 1),
                    "peak_activation_bytes": max(r["peak_activation_bytes"] for r in res) if ours else None,
                    "messages_s": statistics.median(b["span"] - b["instant_messages"] for b in budget) if ours else None,
                    "slow_ops_s": statistics.median(b["instant_messages"] - b["steady_ops"] for b in budget)
                    if ours else None})
            naive = {r["impl"]: r["step_s"] for r in records[-len(configs):] if r["schedule"] == "naive"}
            for rec in records[-len(configs):]:
                rec["speedup_vs_naive"] = naive["nanopar" if rec["impl"] == "single" else rec["impl"]] / rec["step_s"]
    return records


def pipeline_headline(records: list[dict[str, Any]], stages: int = 2, m: int = 8) -> dict[str, float]:
    """The issue's targets at ``stages`` and ``m``: speed-ups over naive, ours / torch step time, worst bubble error."""
    at = {(r["impl"], r["schedule"], r["microbatches"]): r for r in records if r["stages"] == stages}
    out = {f"{s}_speedup": at["nanopar", s, m]["speedup_vs_naive"] for s in ("gpipe", "1f1b")}
    out.update({f"{s}_nanopar_over_torch": at["nanopar", s, m]["step_s"] / at["torch", s, m]["step_s"]
                for s in ("gpipe", "1f1b") if ("torch", s, m) in at})
    out["max_bubble_error"] = max(abs(r["bubble_measured"] - r["bubble_theory"])
                                  for (impl, _, _), r in at.items() if impl == "nanopar")
    return out
