"""What micro-batches cost: kernel efficiency against the bubble (chapter 4.2).

Pipelining cuts the bubble by cutting the batch into more micro-batches, but each
micro-batch is a smaller batch for every kernel. Two effects make small batches slower
per sample on a CPU: convolutions run less efficiently on few images, and a layer whose
work is small next to its weights (a memory-bound MLP) re-reads all its weights for
every micro-batch. :func:`per_sample_times` measures both; :func:`tutorial_experiment`
reproduces the shape of PyTorch's model-parallel tutorial (one device, the naive
two-stage split, and the pipelined split over a sweep of split sizes) on CPU ranks.
"""
from __future__ import annotations

import functools
import statistics
import time
from typing import Any, Callable, Sequence

import torch.nn.functional as F
from torch import nn

from .. import models
from ..launch import RankContext, run
from ..model_split import ARTICLE_BOUNDARY, as_blocks, split_points
from ..training import make_classification_data, seeded
from . import common, pipeline

# PyTorch's model-parallel tutorial, ResNet50 on batches of 120 images of 128×128 on two
# GPUs: mean training time of its benchmark for each setup (its published figures).
TUTORIAL_GPU_SECONDS = {"one device": 3.75, "naive split": 4.02, "pipelined (best split size)": 2.43}


def per_sample_times(ctx: RankContext, build: Callable[[], nn.Module], shape: tuple[int, ...], classes: int,
                     sizes: Sequence[int], repeats: int = 5, min_seconds: float = 0.1) -> dict[int, float]:
    """Worker: median forward+backward seconds per sample, for each micro-batch size (chapter 4.2).

    Each size runs ``repeats`` times and for at least ``min_seconds``: steps of a few
    milliseconds vary with what the caches hold, and their median needs more samples.
    """
    model = seeded(build)
    out = {}
    for b in sizes:
        x, y = make_classification_data(b, shape, classes)
        F.cross_entropy(model(x), y).backward()  # warm-up: allocations, first-call costs
        times: list[float] = []
        while len(times) < repeats or sum(times) < min_seconds:
            t0 = time.perf_counter()
            F.cross_entropy(model(x), y).backward()
            times.append(time.perf_counter() - t0)
        out[b] = statistics.median(times) / b
        ctx.tick()
    return out


def kernel_efficiency(sizes: Sequence[int] = (1, 2, 4, 8, 16, 32), image: int = 64, progress=None) -> dict[str, dict[int, float]]:
    """Per-sample step time against micro-batch size for three models, in one single-thread rank.

    ResNet50 (convolutions, at ``image``×``image``), the data-parallel chapter's 4×1024 MLP
    (memory-bound at small batches) and the pipeline benchmark's conv stack.
    """
    cases = {
        "ResNet50": (functools.partial(models.resnet50, 10), (3, image, image)),
        "MLP 4x1024": (functools.partial(models.mlp, 1024, 4, in_features=1024, out_features=10), (1024,)),
        "conv stack (bench)": (pipeline.pipe_model, (3, pipeline.PIPE_SIZE, pipeline.PIPE_SIZE)),
    }
    # Freed memory stays in the ranks, so page faults do not flatter the small batches.
    return {name: run(per_sample_times, 1, build, shape, 10, sizes, backend="gloo", progress=progress,
                      env=common.KEEP_FREED_MEMORY)[0]
            for name, (build, shape) in cases.items()}


def tutorial_experiment(batch: int = 64, image: int = 64, split_sizes: Sequence[int] = (32, 16, 8),
                        rounds: int = 3, progress=None) -> list[dict[str, Any]]:
    """PyTorch's model-parallel tutorial, in shape, on CPU ranks (chapter 4.2).

    ResNet50 cut where the article cuts it (conv1…layer1 | layer2…fc). "one device" is
    the unsplit model in one single-thread process; "naive split" the two ranks with one
    micro-batch; "pipelined" GPipe with micro-batches of ``split_size`` images. The
    tutorial used 120 images of 128×128 on two GPUs; these defaults take about 40 s on
    a 2-core CPU, and their median of 3 rounds survives one disturbed round. 64×64
    keeps ResNet50's last feature maps larger than 1×1, which BatchNorm needs for
    micro-batches of one image.
    """
    if any(batch % s for s in split_sizes):
        raise ValueError(f"every split size must divide the batch of {batch}: got {list(split_sizes)}")
    build = functools.partial(models.resnet50, 10)
    boundaries = split_points([ARTICLE_BOUNDARY], as_blocks(models.resnet50(10)))
    configs = [("single", "naive", 1), ("nanopar", "naive", 1)]
    configs += [("nanopar", "gpipe", batch // s) for s in split_sizes if s < batch]
    times = run(pipeline.pipeline_timings, 2, build, boundaries, batch, (3, image, image), 10, configs, rounds,
                backend="gloo", progress=progress, env=common.KEEP_FREED_MEMORY)  # as in bench pipeline
    records = []
    for impl, schedule, m in configs:
        step = statistics.median(common.slowest_rank([t[impl, schedule, m]["step_s"] for t in times]))
        setup = "one device" if impl == "single" else "naive split" if schedule == "naive" else "pipelined"
        records.append({"setup": setup, "split_size": batch // m, "microbatches": m, "step_s": step,
                        "batch": batch, "image": image})
    one = records[0]["step_s"]
    for r in records:
        r["relative_to_one_device"] = r["step_s"] / one
    return records
