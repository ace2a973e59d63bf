"""``python -m nanopar bench pipeline``: naive split, GPipe and 1F1B, ours and PyTorch's (chapter 4.2),
and the analysis of a measured pipeline step: its idle fraction and where its time went.
"""
from __future__ import annotations

import functools
import statistics
import time
from typing import Any, Callable, Sequence

import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import devices, schedules
from ..launch import RankContext, run
from ..model_split import even_split_points, split
from ..pipeline import OpTiming, check_microbatches, execute
from ..training import make_classification_data, seeded
from .common import KEEP_FREED_MEMORY, slowest_rank

def measured_idle_fraction(timings: Sequence[Sequence[OpTiming]]) -> float:
    """The bubble as measured: 1 − (busy time of all ranks) / (ranks × span of the step) (chapter 4.2).

    ``timings[r]`` is rank r's list; compare with ``schedules.bubble_fraction``, which
    assumes every op takes the same time and sending costs nothing.
    """
    busy = sum(t.end - t.start for rank in timings for t in rank)
    return 1 - busy / (len(timings) * _span(timings))


def _span(timings: Sequence[Sequence[OpTiming]]) -> float:
    every = [t for rank in timings for t in rank]
    return max(t.end for t in every) - min(t.start for t in every)


def time_budget(timings: Sequence[Sequence[OpTiming]]) -> dict[str, float]:
    """Where a measured step's time went, by replaying its ops without messages (chapter 4.2).

    ``span``: the step as measured, first start to last end. ``instant_messages``: the
    same ops, at their measured durations, replayed through the schedule's dependencies
    with messages taking no time (``schedules.timeline``). ``steady_ops``: the same with
    every op at its stage's median forward or backward time. So ``span −
    instant_messages`` is what communication cost, and ``instant_messages −
    steady_ops`` what slow ops cost; ``steady_ops`` is the schedule at this machine's speed.
    """
    ops = [schedules.Op(k, s, t.microbatch, t.kind) for s, rank in enumerate(timings) for k, t in enumerate(rank)]
    took = {(t.kind, s, t.microbatch): t.end - t.start for s, rank in enumerate(timings) for t in rank}
    median = {(kind, s): statistics.median(v for (k, r, _), v in took.items() if (k, r) == (kind, s))
              for kind in "FB" for s in range(len(timings))}
    replayed = {name: schedules.step_time(ops, len(timings), duration)
                for name, duration in [("instant_messages", lambda k, s, j: took[k, s, j]),
                                       ("steady_ops", lambda k, s, j: median[k, s])]}
    return {"span": _span(timings), **replayed}



# A stack of identical 3×3 convolutions: compute-dense (about 190 GFLOP/s on one thread of
# our 2-core test machine, as fast per sample at 4 samples per micro-batch as at 128), so that pipelining can pay on
# CPU ranks, and every stage gets as many blocks. The stem is a 1×1 convolution (3 → 64
# channels): a 3×3 one over 3 channels runs slowly enough to make stage 0 about 10% slower.
# Stem and head then cost a few % of a stage. Sizes are read when the bench starts.
PIPE_BLOCKS, PIPE_CHANNELS, PIPE_SIZE, PIPE_BATCH, PIPE_CLASSES = 8, 64, 16, 128, 10
PIPE_MICROBATCHES = (1, 2, 4, 8, 16)
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
