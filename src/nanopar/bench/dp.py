"""``python -m nanopar bench dp``: one process, naive DP, bucketed DP and DDP side by side (chapter 4.1)."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import models
from ..launch import RankContext, run
from ..training import IMPLS, TrainConfig, make_classification_data, wrap
from .common import slowest_rank

# Two workloads on one model: the same 4×1024 MLP (4.2 M parameters, 17 MB of fp32
# gradients to all-reduce per step) with a large and a small per-rank batch. Compute
# grows with the batch, communication does not, so t_comm / t_comp sets the scaling.
DP_MODEL = "mlp-4x1024"
DP_WORKLOADS = {"compute-bound": 1024, "communication-bound": 8}


def _dp_model():
    return models.mlp(1024, 4, in_features=1024, out_features=10)


def timed_steps(ctx: RankContext, build: Callable[[], nn.Module], per_rank_batch: int, impls: tuple[str, ...],
                rounds: int, steps: int, shape: tuple[int, ...], classes: int,
                bucket_mb: float = 25.0) -> dict[str, dict[str, list[float]]]:
    """Worker for ``bench dp``: step and communication times of each implementation,
    alternating implementations round by round (A B C A B C …) on the same machine."""
    x, y = make_classification_data(per_rank_batch, shape, classes, seed=ctx.rank)
    x, y = x.to(ctx.device), y.to(ctx.device)
    runs = {}
    for impl in impls:
        torch.manual_seed(0)
        model = build().to(ctx.device)
        if impl == "single":
            runs[impl] = (model, lambda: None, None)
        else:
            wrapped, sync = wrap(model, TrainConfig(impl=impl, bucket_mb=bucket_mb))
            runs[impl] = (wrapped, sync, wrapped if impl != "ddp" else None)
    out: dict[str, dict[str, list[float]]] = {impl: {"step_s": [], "comm_s": []} for impl in impls}
    for r in range(rounds + 1):  # round 0 warms up
        for impl, (model, sync, ours) in runs.items():
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)
            for _ in range(steps):
                comm0 = ours.comm_seconds if ours else 0.0
                t0 = time.perf_counter()
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                sync()
                opt.step()
                if r:
                    out[impl]["step_s"].append(time.perf_counter() - t0)
                    out[impl]["comm_s"].append(ours.comm_seconds - comm0 if ours else float("nan"))
        ctx.tick()
    return out


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
