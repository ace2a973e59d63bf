"""The pipeline of ``nanopar.pipeline`` run by PyTorch's engine, ``torch.distributed.pipelining``.

Book: chapter 4.2, where our executor is checked against it (same stages, same
micro-batches: the same gradients) and timed beside it (``bench pipeline``).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .launch import RankContext
from .model_split import Blocks, Boundary
from .pipeline import LossFn, build_stage, check_microbatches, stage_grads


def make_step(stage: nn.Module, schedule: str, microbatches: int, device: torch.device,
              group: dist.ProcessGroup | None = None,
              loss_fn: LossFn = F.cross_entropy) -> Callable[[torch.Tensor | None, torch.Tensor | None], Any]:
    """``stage`` run by ``torch.distributed.pipelining``, as a function ``step(x, y)`` (chapter 4.2).

    ``schedule`` is "gpipe" (ScheduleGPipe), "1f1b" (Schedule1F1B, which needs at least
    as many micro-batches as stages) or "naive" (ScheduleGPipe with one micro-batch).
    ``step`` runs one forward and backward of the batch and returns the loss as ours
    does (last stage; None elsewhere): ``loss_fn`` is each micro-batch's mean, and
    PyTorch divides the accumulated gradients by m (its ``scale_grads``).
    """
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    classes = {"naive": ScheduleGPipe, "gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
    if schedule not in classes:
        raise ValueError(f"the torch.distributed.pipelining comparison supports {sorted(classes)}, got {schedule!r}")
    if schedule == "naive" and microbatches != 1:
        raise ValueError(f"PyTorch has no naive schedule for {microbatches} micro-batches: use 1, or 'gpipe'")
    index, stages = dist.get_rank(group), dist.get_world_size(group)
    engine = classes[schedule](PipelineStage(stage, index, stages, device, group=group), microbatches, loss_fn=loss_fn)

    def step(x: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor | None:
        losses: list[torch.Tensor] = []
        args = (x.to(device),) if index == 0 else ()
        kwargs = {"target": y.to(device), "losses": losses} if index == stages - 1 else {}
        engine.step(*args, **kwargs)
        return torch.stack(losses).sum() / microbatches if losses else None
    return step


def pipeline_step(ctx: RankContext, build: Callable[..., nn.Module | Blocks], boundaries: Sequence[Boundary] | None,
                  x: torch.Tensor, y: torch.Tensor, schedule: str = "1f1b", microbatches: int = 4,
                  loss_fn: LossFn = F.cross_entropy) -> dict[str, Any]:
    """Worker: ``nanopar.pipeline.pipeline_step`` run by PyTorch's engine, for parity (chapter 4.2).

    Same arguments, same results: this stage's gradients and the loss (last stage).
    """
    check_microbatches(len(x), microbatches)  # PyTorch checks on the first stage only
    stage = build_stage(build, boundaries, ctx.device)
    loss = make_step(stage, schedule, microbatches, ctx.device, loss_fn=loss_fn)(x, y)
    return {"stage": ctx.rank, "grads": stage_grads(stage), "loss": None if loss is None else loss.item()}
