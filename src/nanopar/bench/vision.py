"""ResNet50 from small images to the article's 224×224: what grows and what does not (chapter 5.2).

A data-parallel step of ResNet50 computes in proportion to the pixels of its images, holds
activations in proportion to them too, and all-reduces the same 25.6 million gradients
whatever the image size. :func:`image_size_sweep` measures the three on CPU ranks, side
by side, so that the share of the step spent communicating can be read at each size.
"""
from __future__ import annotations

import functools
import statistics
import time
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..launch import RankContext, run
from ..models import resnet50
from ..training import make_classification_data, seeded
from .memory import saved_activation_bytes


def image_size_timings(ctx: RankContext, sizes: Sequence[int], batch: int, classes: int,
                       rounds: int) -> dict[int, dict[str, Any]]:
    """Worker: per image size, the forward+backward seconds of ``batch`` images on this rank,
    the seconds of the all-reduce of every gradient across the ranks, and the activation bytes
    saved for backward. Sizes alternate round by round; round 0 is a warm-up."""
    model = seeded(functools.partial(resnet50, classes))
    grads = torch.zeros(sum(p.numel() for p in model.parameters()))
    data = {s: make_classification_data(batch, (3, s, s), classes) for s in sizes}
    out = {s: {"compute_s": [], "allreduce_s": [], "activation_bytes": saved_activation_bytes(
        model, lambda: F.cross_entropy(model(data[s][0]), data[s][1]))} for s in sizes}
    for r in range(rounds + 1):
        for s in sizes:
            dist.barrier()
            t0 = time.perf_counter()
            F.cross_entropy(model(data[s][0]), data[s][1]).backward()
            t1 = time.perf_counter()
            dist.all_reduce(grads)
            t2 = time.perf_counter()
            if r:
                out[s]["compute_s"].append(t1 - t0)
                out[s]["allreduce_s"].append(t2 - t1)
            model.zero_grad(set_to_none=True)
            ctx.tick()
    out["gradient_bytes"] = grads.nbytes
    return out


def image_size_sweep(sizes: Sequence[int] = (32, 64, 128, 224), batch: int = 2, ranks: int = 2, rounds: int = 3,
                     classes: int = 10, progress=None) -> list[dict[str, Any]]:
    """ResNet50's data-parallel step at each image size, on ``ranks`` CPU (gloo) ranks (chapter 5.2).

    One record per size: ``compute_s`` (forward and backward of ``batch`` images per rank,
    slowest rank, median over rounds), ``allreduce_s`` (the gradients' all-reduce, same),
    ``comm_share`` (the all-reduce's share of the step, ratio of medians),
    ``activation_bytes`` (saved for backward, rank 0) and ``gradient_bytes``. The defaults
    take about 20 s on 2 cores; ``batch=32`` is the per-GPU batch of the large-batch runs.
    """
    if sorted(set(sizes)) != list(sizes) or min(sizes) < 32:
        raise ValueError(f"sizes must be increasing image sizes of at least 32 pixels, got {list(sizes)}")
    if batch < 2 and sizes[0] < 64:  # ResNet50's last maps are then 1×1: BatchNorm needs two values per channel
        raise ValueError(f"images of {sizes[0]}×{sizes[0]} need a batch of at least 2 (BatchNorm), got {batch}")
    per_rank = run(image_size_timings, ranks, list(sizes), batch, classes, rounds, backend="gloo", progress=progress)
    records = []
    for s in sizes:
        compute = statistics.median(max(t) for t in zip(*(r[s]["compute_s"] for r in per_rank)))
        comm = statistics.median(max(t) for t in zip(*(r[s]["allreduce_s"] for r in per_rank)))
        records.append({"image": s, "batch": batch, "ranks": ranks, "compute_s": compute, "allreduce_s": comm,
                        "comm_share": comm / (compute + comm), "activation_bytes": per_rank[0][s]["activation_bytes"],
                        "gradient_bytes": per_rank[0]["gradient_bytes"]})
    return records
