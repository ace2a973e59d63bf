"""Hybrid parallelism: data, pipeline and tensor parallelism together on one grid (chapter 4, hybrid training; math: 3.3).

Each rank of a dp × pp × tp grid (:mod:`nanopar.grid`) holds one pipeline stage of the
model (its ``pp`` coordinate), split by tensor parallelism with the other ranks of its
TP group, and is one of ``dp`` replicas of that shard. One optimizer step
(:func:`hybrid_step`):

1. DP replica d takes its contiguous slice of the global batch; the TP ranks of a stage
   all see the same slice;
2. the slice runs through the pipeline over the PP group in m micro-batches
   (``pipeline.execute``), with TP's all-reduces inside every block of every stage;
3. the stage's gradients are averaged over the DP group (``BucketedDataParallel``), once,
   after the pipeline has flushed: the micro-batches' backward passes accumulate inside
   ``no_sync()``. (Megatron-LM overlaps that all-reduce with the last micro-batch's
   backward; here the executor runs every micro-batch inside one call, so it does not.)
4. every rank steps the optimizer on its own parameters.

An axis of degree 1 costs nothing: pp = 1 sends no messages (the one stage is first and
last), tp = 1 shards nothing, dp = 1 wraps nothing (no all-reduce).

    grid = Grid(Topology(dp=2, pp=2, tp=2))       # on each of the 8 ranks
    model = build_hybrid(build, gpt_boundaries(config, 2), grid, ctx.device,
                         shard=tensor_parallel.parallelize_gpt)
    loss = hybrid_step(model, opt, grid, schedules.make("1f1b", 2, 4), x, y, ctx.device, models.gpt_loss)

:func:`train_hybrid` is the worker that trains a few steps and returns what the
single-process reference (:func:`single_process_reference`) returns, for comparison.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import schedules as _schedules
from .data_parallel import BucketedDataParallel, check_same_parameters
from .grid import Grid, Topology
from .launch import RankContext
from .model_split import Blocks, Boundary
from .models import GPTConfig
from .pipeline import LossFn, build_stage, check_microbatches, execute
from .sharding import split_batch
from .tensor_parallel import full_state_dict
from .training import TrainConfig, global_batches, make_optimizer, train_single

Shard = Callable[[nn.Module, dist.ProcessGroup], nn.Module]


def gpt_boundaries(config: GPTConfig, pp: int) -> list[str]:
    """Where each of ``pp`` pipeline stages of a GPT starts: the layers split evenly (chapter 4, hybrid training).

    Stage 0 also holds the embedding, the last stage the head, as in Megatron-LM; the
    layers must divide into the stages.
    """
    if config.n_layer % pp:
        fits = [d for d in range(1, config.n_layer + 1) if config.n_layer % d == 0]
        raise ValueError(f"the GPT's {config.n_layer} layers do not split evenly into {pp} pipeline stages: "
                         f"choose pp among {fits}, or a model whose layer count pp divides")
    per_stage = config.n_layer // pp
    return [f"h{s * per_stage}" for s in range(1, pp)]


def build_hybrid(build: Callable[..., nn.Module | Blocks], boundaries: Sequence[Boundary] | None, grid: Grid,
                 device: torch.device, shard: Shard | None = None) -> nn.Module:
    """This rank's part of the model on ``grid``: its stage, TP-sharded, a DP replica (chapter 4, hybrid training).

    The stage comes from ``pipeline.build_stage`` over the grid's PP group (``build`` and
    ``boundaries`` as there; one stage, ``boundaries=[]``, when pp = 1). When tp > 1,
    ``shard(stage, tp_group)`` splits it (``tensor_parallel.parallelize_gpt``). When
    dp > 1 the result is a ``BucketedDataParallel`` over the DP group (its ``.module`` is
    the stage); otherwise the stage itself. Call on every rank of the grid at once.
    """
    stage = build_stage(build, boundaries, device, group=grid.group("pp"))
    if grid.size("tp") > 1:
        if shard is None:
            raise ValueError(f"tp = {grid.size('tp')} needs a way to shard the stage: pass shard=, "
                             "e.g. tensor_parallel.parallelize_gpt, or use tp = 1")
        stage = shard(stage, grid.group("tp"))
    if grid.size("dp") > 1:
        stage = BucketedDataParallel(stage, group=grid.group("dp"))
    return stage


def unwrap(model: nn.Module) -> nn.Module:
    """The stage inside what :func:`build_hybrid` returned (its parameters keep the model's names)."""
    return model.module if isinstance(model, BucketedDataParallel) else model


def check_replicas(model: nn.Module, grid: Grid, step: int, device: torch.device) -> None:
    """Raise on every rank of the grid if some stage's DP replicas drifted apart (chapter 4.1's check).

    Each DP group compares its replicas' fingerprints (``check_same_parameters``); a flag
    all-reduced over the world then stops every rank at once with the same message, so
    that no stage waits for a peer that has stopped. ``device`` is the rank's (NCCL's flag
    must be on its GPU). ``TrainConfig.check_every`` and ``--check-every`` call it.
    """
    stage, error = unwrap(model), None
    if grid.size("dp") > 1:
        try:
            check_same_parameters(stage, grid.group("dp"), after_step=step)
        except ValueError as e:
            error = str(e)
    flag = torch.tensor([float(error is not None)], device=device)
    dist.all_reduce(flag)
    if flag.item():  # rare: only now gather what the groups that noticed say
        said: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(said, error)
        raise ValueError(next(s for s in said if s))


def check_batch(batch: int, topology: Topology, microbatches: int) -> None:
    """A clear error unless ``batch`` splits over the DP replicas, then into ``microbatches``."""
    if batch % topology.dp:
        raise ValueError(f"a global batch of {batch} does not split over dp = {topology.dp} replicas: "
                         f"use a multiple of {topology.dp * microbatches} (dp × micro-batches)")
    check_microbatches(batch // topology.dp, microbatches)


def _replica_slice(grid: Grid, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return [split_batch(t, grid.index("dp"), grid.size("dp")) for t in tensors]


def hybrid_step(model: nn.Module, optimizer: torch.optim.Optimizer, grid: Grid, schedule: Sequence[_schedules.Op],
                x: torch.Tensor, y: torch.Tensor, device: torch.device,
                loss_fn: LossFn = F.cross_entropy) -> torch.Tensor | None:
    """One optimizer step of ``model`` (from :func:`build_hybrid`) on the global batch ``x, y`` (chapter 4, hybrid training).

    Call on every rank of the grid with the same batch. Returns this replica's loss (the
    mean over its slice) on the last stage, None elsewhere; the global batch's loss is
    the mean over the DP replicas (:func:`replica_mean`).
    """
    replica = model if isinstance(model, BucketedDataParallel) else None
    optimizer.zero_grad()
    # The m micro-batches' backward passes accumulate; the DP average comes once, after them.
    with replica.no_sync() if replica else contextlib.nullcontext():
        loss = execute(unwrap(model), schedule, *_replica_slice(grid, x, y), device, group=grid.group("pp"),
                       loss_fn=loss_fn)
    if replica:
        replica.sync_gradients()
    optimizer.step()
    return loss


def evaluate(model: nn.Module, grid: Grid, schedule: Sequence[_schedules.Op], x: torch.Tensor, y: torch.Tensor,
             device: torch.device, loss_fn: LossFn = F.cross_entropy) -> float | None:
    """The loss of the batch ``x, y``, forward only, in eval mode (chapter 4, hybrid training).

    Each DP replica evaluates its slice through the pipeline; the last stage returns the
    mean over the whole batch (one all-reduce over the DP group), the others None.
    """
    stage = unwrap(model)
    was_training = stage.training
    stage.eval()
    try:
        loss = execute(stage, schedule, *_replica_slice(grid, x, y), device, group=grid.group("pp"),
                       loss_fn=loss_fn, forward_only=True)
    finally:
        stage.train(was_training)
    return None if loss is None else replica_mean([loss], grid)[0]


def replica_mean(losses: list[torch.Tensor], grid: Grid) -> list[float] | None:
    """The losses of this replica averaged over the DP group: the global batch's (last stage; else None).

    One all-reduce for the whole list, among the last stage's ranks only.
    """
    if grid.index("pp") != grid.size("pp") - 1:
        return None
    stacked = torch.stack(losses)
    if grid.size("dp") > 1:
        dist.all_reduce(stacked, group=grid.group("dp"))
        stacked /= grid.size("dp")
    return stacked.tolist()


def full_parameters(model: nn.Module, grid: Grid) -> dict[str, torch.Tensor]:
    """This stage's parameters on the CPU, TP shards gathered, named as in the unsplit model.

    A collective over the TP group when tp > 1 (call on all its ranks).
    """
    stage = unwrap(model)
    if grid.size("tp") == 1:
        return {n: p.detach().cpu() for n, p in stage.named_parameters()}
    names = {n for n, _ in stage.named_parameters()}
    return {n: t.detach().cpu() for n, t in full_state_dict(stage, grid.group("tp")).items() if n in names}


def merge_parameters(per_rank: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One full set of parameters from every rank's :func:`full_parameters` (chapter 4, hybrid training).

    Ranks holding the same tensor (DP replicas; TP ranks, after gathering) must hold it
    exactly: anything else means a gradient was not averaged where it should have been.
    """
    merged: dict[str, torch.Tensor] = {}
    for rank, params in enumerate(per_rank):
        for name, t in params.items():
            if name in merged and not torch.equal(merged[name], t):
                diff = (merged[name] - t).abs().max().item()
                raise ValueError(f"rank {rank}'s {name!r} differs from another rank's copy by up to {diff:.3g}: "
                                 "the replicas drifted apart (a gradient that was not averaged over its group)")
            merged[name] = t
    return merged


def largest_difference(params: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between two full sets of parameters with the same names."""
    if params.keys() != reference.keys():
        raise ValueError(f"the parameter names differ: only in the first {sorted(params.keys() - reference.keys())}, "
                         f"only in the reference {sorted(reference.keys() - params.keys())}")
    return max((params[k] - reference[k]).abs().max().item() for k in reference)


def train_hybrid(ctx: RankContext, topology: Topology, build: Callable[..., nn.Module | Blocks],
                 boundaries: Sequence[Boundary] | None, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
                 schedule: str = "1f1b", microbatches: int = 1, loss_fn: LossFn = F.cross_entropy,
                 shard: Shard | None = None) -> dict[str, Any]:
    """Worker: ``cfg.steps`` steps of hybrid training on ``topology`` (chapter 4, hybrid training).

    The same global batches (``training.global_batches``), optimizer and learning rate
    as :func:`single_process_reference`; ``cfg.accumulate`` is ignored (the micro-batches
    are the pipeline's). Returns ``coords`` (this rank's place), ``losses`` (the global
    batch's mean loss per step, on the last stage's ranks; None elsewhere) and ``params``
    (this rank's parameters with TP shards gathered; :func:`merge_parameters` joins them).
    """
    topology.check_world(ctx.world_size)
    check_batch(cfg.global_batch, topology, microbatches)
    grid = Grid(topology)
    torch.manual_seed(cfg.seed)  # as train_single does, for a builder that does not seed itself
    model = build_hybrid(build, boundaries, grid, ctx.device, shard)
    opt = make_optimizer(cfg, model.parameters())
    ops = _schedules.make(schedule, grid.size("pp"), microbatches)
    losses = []
    for step, (xb, yb) in enumerate(global_batches(x, y, cfg), start=1):
        losses.append(hybrid_step(model, opt, grid, ops, xb, yb, ctx.device, loss_fn))
        if cfg.checks_replicas_after(step):
            check_replicas(model, grid, step, ctx.device)
        ctx.tick()
    return {"coords": grid.coords, "losses": replica_mean(losses, grid), "params": full_parameters(model, grid)}


def single_process_reference(build: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
                             topology: Topology, microbatches: int = 1,
                             loss_fn: LossFn = F.cross_entropy) -> dict[str, Any]:
    """What :func:`train_hybrid` must equal: one process, the same micro-batches in order (chapter 4, hybrid training).

    Replica d's micro-batch j is the global batch's micro-batch d·m + j of dp·m, so
    accumulating dp·m micro-batches in one process sees the same samples together:
    BatchNorm in training mode normalises over the same groups. Returns the losses and
    the parameters, named as :func:`merge_parameters` names them.
    """
    out = train_single(build, x, y, replace(cfg, accumulate=topology.dp * microbatches), loss_fn=loss_fn)
    with torch.device("meta"):  # the names only: no memory, no initialisation
        params = {n for n, _ in build().named_parameters()}
    return {"losses": out["losses"], "params": {n: t for n, t in out["state"].items() if n in params}}


def reference_worker(ctx: RankContext, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Worker: :func:`single_process_reference` on one spawned rank, computing on one thread as ranks do.

    Run it as ``run(reference_worker, 1, build, x, y, cfg, topology, m)``. For models
    whose BatchNorm normalises micro-batches of a few samples, where one rounding
    difference grows by orders of magnitude in a step, the same thread count as the ranks
    makes the operations, and so the roundings, the same (chapter 4, hybrid training).
    """
    return single_process_reference(*args, **kwargs)
