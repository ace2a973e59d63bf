"""What micro-batches cost: kernel efficiency against the bubble (chapter 4.2).

Pipelining cuts the bubble by cutting the batch into more micro-batches, but each
micro-batch is a smaller batch for every kernel. Two effects make small batches slower
per sample on a CPU: convolutions run less efficiently on few images, and a layer whose
work is small next to its weights (a memory-bound MLP) re-reads all its weights for
every micro-batch. :func:`per_sample_times` measures both; :func:`tutorial_experiment`
reproduces the shape of PyTorch's model-parallel tutorial (one device, the naive
two-stage split, and the pipelined split over a sweep of split sizes) on CPU ranks.
:func:`cut_balance` measures how much of the work each stage of a cut does (the
article's cut and the tutorial's), and :func:`pipelined_fraction` what that allows.
"""
from __future__ import annotations

import functools
import statistics
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import models
from ..launch import RankContext, run
from ..model_split import ARTICLE_BOUNDARY, Boundary, as_blocks, split, split_points
from ..training import make_classification_data, seeded
from . import common, pipeline

# PyTorch's model-parallel tutorial, ResNet50 on batches of 120 images of 128×128 on two
# GPUs: mean training time of its benchmark for each setup (its published figures).
TUTORIAL_GPU_SECONDS = {"one device": 3.75, "naive split": 4.02, "pipelined (best split size)": 2.43}
# Its best split size, 20 images, makes 6 micro-batches of its 120.
TUTORIAL_BEST_MICROBATCHES = 6
# The tutorial's cut: its second GPU starts at layer3 (the article's at layer2).
TUTORIAL_BOUNDARY = "layer3"


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
    a 2-core CPU. Each round measures every setup once; ``relative_to_one_device`` is the
    median over rounds of the ratio within a round, which survives one disturbed round.
    64×64 keeps ResNet50's last feature maps larger than 1×1, which BatchNorm needs for
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
    steps = {c: common.slowest_rank([t[c]["step_s"] for t in times]) for c in configs}
    one = steps[configs[0]]
    records = []
    for c in configs:
        impl, schedule, m = c
        setup = "one device" if impl == "single" else "naive split" if schedule == "naive" else "pipelined"
        records.append({"setup": setup, "split_size": batch // m, "microbatches": m,
                        "step_s": statistics.median(steps[c]), "batch": batch, "image": image,
                        # paired round by round: a round that disturbs both steps cancels out
                        "relative_to_one_device": common.speed_ratio(one, steps[c]).median})
    return records


def stage_times(ctx: RankContext, build: Callable[[], nn.Module], cuts: dict[str, list[int]], batch: int,
                shape: tuple[int, ...], classes: int, repeats: int = 3) -> dict[str, list[float]]:
    """Worker: median forward+backward seconds of each stage of each cut, run one after another (chapter 4.2).

    Each stage gets the activation that the stages before it produce; every stage but the
    first also computes the gradient of its input, which a pipeline sends back.
    """
    model = seeded(build)
    x, y = make_classification_data(batch, shape, classes)
    out = {}
    for name, points in cuts.items():
        stages = split(model, points)
        inputs = [x]
        with torch.no_grad():
            for stage in stages[:-1]:
                inputs.append(stage(inputs[-1]))
        seconds = []
        for i, stage in enumerate(stages):
            def step() -> None:
                z = stage(inputs[i].detach().requires_grad_(i > 0))
                if i == len(stages) - 1:
                    F.cross_entropy(z, y).backward()
                else:
                    z.backward(torch.ones_like(z))
            step()  # warm-up: allocations, first-call costs
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            seconds.append(statistics.median(times))
        out[name] = seconds
        ctx.tick()
    return out


def cut_balance(cuts: dict[str, Sequence[Boundary]] | None = None, batch: int = 32, image: int = 64,
                repeats: int = 3, progress=None) -> list[dict[str, Any]]:
    """How ResNet50's work divides between the stages of each cut, measured (chapter 4.2).

    ``cuts`` maps a name to its boundaries (default: the article's cut, conv1…layer1 |
    layer2…fc, and PyTorch's tutorial's, conv1…layer2 | layer3…fc). Each stage's
    forward+backward on ``batch`` images runs in one single-thread rank; the record holds
    each stage's seconds and its ``share`` of their sum.
    """
    cuts = cuts or {"article": [ARTICLE_BOUNDARY], "tutorial": [TUTORIAL_BOUNDARY]}
    build = functools.partial(models.resnet50, 10)
    blocks = as_blocks(models.resnet50(10))
    points = {name: split_points(b, blocks) for name, b in cuts.items()}
    (times,) = run(stage_times, 1, build, points, batch, (3, image, image), 10, repeats, backend="gloo",
                   progress=progress, env=common.KEEP_FREED_MEMORY)
    records = []
    for name, seconds in times.items():
        starts = [blocks[i][0] for i in points[name]]
        records.append({"cut": name, "stage_starts": starts, "stage_s": seconds,
                        "share": [t / sum(seconds) for t in seconds], "batch": batch, "image": image})
    return records


def pipelined_fraction(stage_s: Sequence[float], microbatches: int) -> float:
    """A pipeline's step over the naive split's, for stages of unequal times and free messages (chapter 4.2).

    With m micro-batches each stage's work comes in m pieces; the slowest stage works
    without a pause, after the other stages' first pieces and before their last ones:
    (Σ t + (m − 1) max t) / (m Σ t). Equal stages give 1 / ``schedules.speedup(p, m)``.
    """
    if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
        raise ValueError(f"microbatches must be a positive whole number, got {microbatches!r}")
    if not stage_s or min(stage_s) < 0:
        raise ValueError(f"stage times must be one non-negative time per stage, got {list(stage_s)}")
    total = sum(stage_s)
    return (total + (microbatches - 1) * max(stage_s)) / (microbatches * total)
