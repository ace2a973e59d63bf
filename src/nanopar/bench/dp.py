"""``python -m nanopar bench dp``: one process, naive DP, bucketed DP and DDP side by side (chapter 4.1)."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import models
from ..launch import RankContext, run
from ..training import IMPLS, TrainConfig, make_classification_data, wrap
from .common import PairedRatio, slowest_rank, speed_ratio

# Two workloads on one model: the same 4×1024 MLP (4.2 M parameters, 17 MB of fp32
# gradients to all-reduce per step) with a large and a small per-rank batch. Compute
# grows with the batch, communication does not, so t_comm / t_comp sets the scaling.
DP_MODEL = "mlp-4x1024"
DP_WORKLOADS = {"compute-bound": 1024, "communication-bound": 8}


def _dp_model():
    return models.mlp(1024, 4, in_features=1024, out_features=10)


WARMUP_STEPS = 3  # of each implementation, in round 0, which also sets the steps per round
MAX_STEPS_PER_ROUND = 30


def timed_steps(ctx: RankContext, build: Callable[[], nn.Module], per_rank_batch: int, impls: tuple[str, ...],
                rounds: int, round_s: float, shape: tuple[int, ...], classes: int,
                bucket_cap_mb: float = 25.0) -> dict[str, dict[str, list[float]]]:
    """Worker for ``bench dp``: step and communication times of each implementation,
    alternating implementations step by step (A B C, then C B A, …) on the same machine.

    Step k of every implementation forms a pair measured a moment apart. A round has as
    many steps of each as fill about ``round_s`` seconds (``WARMUP_STEPS`` to
    ``MAX_STEPS_PER_ROUND``): many for short steps, whose times vary most."""
    x, y = make_classification_data(per_rank_batch, shape, classes, seed=ctx.rank)
    x, y = x.to(ctx.device), y.to(ctx.device)
    runs = {}
    for impl in impls:
        torch.manual_seed(0)
        model = build().to(ctx.device)
        wrapped, sync = (model, lambda: None) if impl == "single" else wrap(
            model, TrainConfig(impl=impl, bucket_cap_mb=bucket_cap_mb))
        ours = wrapped if impl in ("naive", "bucketed") else None  # they count their blocked time
        runs[impl] = (wrapped, sync, ours, torch.optim.SGD(wrapped.parameters(), lr=1e-3))
    out: dict[str, dict[str, list[float]]] = {impl: {"step_s": [], "comm_s": []} for impl in impls}
    steps, warm = WARMUP_STEPS, []
    for r in range(rounds + 1):  # round 0 warms up and sets the steps per round
        for k in range(steps):
            for impl, (model, sync, ours, opt) in list(runs.items())[:: 1 if k % 2 == 0 else -1]:
                comm0 = ours.comm_seconds if ours else 0.0
                t0 = time.perf_counter()
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                sync()
                opt.step()
                seconds = time.perf_counter() - t0
                if r:
                    out[impl]["step_s"].append(seconds)
                    out[impl]["comm_s"].append(ours.comm_seconds - comm0 if ours else float("nan"))
                else:
                    warm.append(seconds)
        if r == 0:  # the fastest warm-up step: what a step costs when nothing else disturbs it
            steps = _steps_per_round(min(warm) * len(runs), round_s)
        ctx.tick()
    return out


def _steps_per_round(one_of_each_s: float, round_s: float) -> int:
    # Every rank must run the same number of steps (each step all-reduces): take the slowest rank's estimate.
    slowest = torch.tensor([one_of_each_s], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return max(WARMUP_STEPS, min(MAX_STEPS_PER_ROUND, round(round_s / slowest.item())))


def bench_dp(world_sizes: Sequence[int] = (1, 2, 4), quick: bool = False,
             workloads: dict[str, int] | None = None, bucket_cap_mb: float = 25.0,
             timeout: float = 1800.0, round_s: float | None = None) -> list[dict[str, Any]]:
    """Throughput of one process, naive DP, bucketed DP and DDP (chapter 4.1).

    Each world size is one launch in which every rank alternates the implementations
    step by step; each step's time is the slowest rank's, and the median is reported.
    Records hold every step's time (``step_s_each``, in order) and, for all but DDP,
    ``throughput_vs_ddp`` with its quartiles ``throughput_vs_ddp_q1``, ``throughput_vs_ddp_q3``:
    the throughput over DDP's, pair by pair, as :func:`dp_speed_ratio` computes it.
    A round lasts about ``round_s`` seconds (default 1.5 with ``quick``, else 3): the
    communication-bound workload needs about a hundred pairs of steps to settle.
    """
    workloads = workloads or DP_WORKLOADS
    rounds = 6 if quick else 10
    round_s = round_s or (1.5 if quick else 3.0)
    records: list[dict[str, Any]] = []
    with tqdm(total=len(workloads) * len(world_sizes) * (rounds + 1), desc="bench dp", unit="round") as bar:
        for workload, batch in workloads.items():
            single = None
            for n in sorted(world_sizes):
                impls = (("single",) if n == 1 else ()) + IMPLS
                per_rank = run(timed_steps, n, _dp_model, batch, impls, rounds, round_s, (1024,), 10,
                               bucket_cap_mb, progress=bar, timeout=timeout)
                steps = {impl: slowest_rank([p[impl]["step_s"] for p in per_rank]) for impl in impls}
                for impl in impls:
                    step = steps[impl]
                    comm = slowest_rank([p[impl]["comm_s"] for p in per_rank])
                    rec = {
                        "impl": impl, "model": DP_MODEL, "workload": workload, "world_size": n,
                        "bucket_cap_mb": None if impl in ("single", "naive") else bucket_cap_mb,
                        "per_rank_batch": batch, "step_s": statistics.median(step),
                        "step_s_min": min(step), "step_s_max": max(step), "step_s_each": step,
                        "comm_s": None if impl in ("single", "ddp") else statistics.median(comm),
                    }
                    rec["samples_per_s"] = n * batch / rec["step_s"]
                    if impl != "ddp":
                        vs = speed_ratio(step, steps["ddp"])
                        rec.update(throughput_vs_ddp=vs.median, throughput_vs_ddp_q1=vs.q1, throughput_vs_ddp_q3=vs.q3)
                    if impl == "single":
                        single = rec["samples_per_s"]
                    records.append(rec)
            if single is None:
                raise ValueError("world_sizes must include 1: efficiency is measured against one process")
            for rec in records:
                if rec["workload"] == workload:
                    rec["scaling_efficiency"] = rec["samples_per_s"] / (rec["world_size"] * single)
    return records


def dp_speed_ratio(records: list[dict[str, Any]], workload: str, world_size: int, impl: str,
                   over: str) -> PairedRatio:
    """Throughput of ``impl`` over that of ``over`` (e.g. bucketed over ddp), step pair by step pair:
    the median and quartiles of ``over``'s step time divided by ``impl``'s (chapter 4.1)."""
    each = {r["impl"]: r["step_s_each"] for r in records
            if r["workload"] == workload and r["world_size"] == world_size}
    return speed_ratio(each[impl], each[over])


def dp_ratio(records: list[dict[str, Any]], workload: str, world_size: int, impl: str, over: str) -> float:
    """The figure chapter 4.1 quotes: the median of :func:`dp_speed_ratio`."""
    return dp_speed_ratio(records, workload, world_size, impl, over).median
