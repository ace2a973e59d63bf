"""A real pipeline across processes: each stage is a rank; activations and gradients travel by send/recv.

Book: chapter 4.2 ("multi-process pipeline"), with the schedules of chapter 3.2.

The pipeline runs inside a process group (the default group, or a grid's pipeline
group): stage s is the rank s of that group. Each rank builds its stage
(:func:`build_stage`) and runs the ops that the schedule (``nanopar.schedules``, a list
of data) gives its stage, in slot order (:func:`execute`):

* F(j): receive micro-batch j's activation from stage s−1 (stage 0 slices the input),
  run the stage, send the output to stage s+1; the last stage computes the loss of the
  micro-batch divided by m, so that the m losses add up to the mean over the whole batch;
* B(j): receive the gradient of that output from stage s+1 (the last stage starts from
  its loss), backpropagate, send the gradient of the stage's input to stage s−1.

    from nanopar.launch import run
    build = functools.partial(training.seeded, functools.partial(models.mlp, 64, 8))
    results = run(pipeline_step, 4, build, [2, 4, 6], x, y, "1f1b", 8)
    results[r]["grads"], results[-1]["loss"]

Sends are non-blocking and receives complete in schedule order, so any schedule that
``schedules.validate`` accepts runs without deadlock: a rank only ever waits for an op
that comes earlier in the schedule. The messages themselves are ``nanopar.p2p``'s.
Nothing is timed unless a recorder is passed (``bench.pipeline.StepRecorder``), so a GPU
pipeline never waits for its device. ``nanopar.pipeline_torch`` runs the same stages
with ``torch.distributed.pipelining``.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import p2p
from .comm import global_rank
from . import schedules as _schedules
from .launch import RankContext
from .model_split import Blocks, Boundary, as_blocks, run_stage, split
# The same batches and optimizers as the single-process reference, so results compare exactly.
from .training import TrainConfig, global_batches, make_optimizer

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_microbatches(batch: int, microbatches: int) -> int:
    """The micro-batch size, or an error that says which micro-batch counts work (chapter 4.2)."""
    m = microbatches
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"the number of micro-batches must be a positive integer, got {m!r}")
    if m > batch:
        raise ValueError(f"{m} micro-batches asked for but the batch has only {batch} samples: "
                         f"use at most {batch} micro-batches, or a larger batch")
    if batch % m:
        fits = [d for d in range(1, batch + 1) if batch % d == 0]
        raise ValueError(f"{m} micro-batches do not divide a batch of {batch} evenly: use one of {fits}, "
                         f"or a batch that is a multiple of {m}")
    return batch // m


def _check_fifo(schedule: Sequence[_schedules.Op], stages: int) -> None:
    # Messages between two ranks are matched in the order they were posted, so every
    # stage must run the forwards (and the backwards) in the same micro-batch order.
    for kind in "FB":
        orders = {tuple(o.microbatch for o in _schedules.stage_ops(schedule, s) if o.kind == kind)
                  for s in range(stages)}
        if len(orders) > 1:
            raise ValueError(f"every stage must run its {kind} ops in the same micro-batch order; got {orders}")


def _batch_size(index: int, stages: int, x: torch.Tensor | None, y: torch.Tensor | None, batch: int | None) -> int:
    if index == 0 and x is None:
        raise ValueError("the first stage needs the batch's inputs: pass x")
    if index == stages - 1 and y is None:
        raise ValueError("the last stage needs the batch's targets: pass y")
    sizes = {len(t) for t in (x, y) if t is not None} | ({batch} if batch is not None else set())
    if not sizes:
        raise ValueError(f"stage {index} gets neither x nor y, so it must be told the batch size: pass batch=")
    if len(sizes) > 1:
        raise ValueError(f"x, y and batch disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


class Recorder:
    """The hooks :func:`execute` calls as it runs; this one records nothing (``bench.pipeline.StepRecorder`` does)."""

    def start(self, stage: nn.Module, device: torch.device, group: dist.ProcessGroup | None) -> None:
        """Before the first op."""

    def waiting(self) -> None:
        """An op begins: first it may wait for its input."""

    def computing(self) -> None:
        """Its input is here: it computes."""

    def saved_tensors(self) -> contextlib.AbstractContextManager:
        """The context a forward runs in (where autograd's saved tensors can be seen)."""
        return contextlib.nullcontext()

    def forward_done(self, op: _schedules.Op, inp: torch.Tensor, out: torch.Tensor) -> None:
        """A forward has computed ``out`` (the loss, on the last stage) from ``inp``."""

    def backward_done(self, op: _schedules.Op) -> None:
        """A backward has computed."""


class _StageInput(torch.autograd.Function):
    """A received activation as an intermediate tensor of the stage's graph, without a copy.

    A received tensor that merely requires grad is a leaf, and autograd refuses in-place
    ops on leaves (and on views of them): a stage that starts with ``ReLU(inplace=True)``,
    as ResNet's blocks do, would fail. This op declares the buffer modified in place (it
    is not), which makes it an intermediate tensor; ``anchor``, a scalar that requires
    grad, makes autograd track it; backward hands the buffer's gradient to ``sink``.
    """

    @staticmethod
    def forward(ctx, buf: torch.Tensor, anchor: torch.Tensor, sink: list) -> torch.Tensor:
        ctx.mark_dirty(buf)
        ctx.sink = sink
        return buf

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.sink.append(grad)
        return None, None, None


def execute(stage: nn.Module, schedule: Sequence[_schedules.Op], x: torch.Tensor | None, y: torch.Tensor | None,
            device: torch.device, group: dist.ProcessGroup | None = None, *, batch: int | None = None,
            loss_fn: LossFn = F.cross_entropy, recorder: Recorder | None = None,
            forward_only: bool = False) -> torch.Tensor | None:
    """Run this rank's stage of ``schedule`` in the pipeline over ``group``; return the loss (chapter 4.2).

    Call on every rank of ``group`` at once; stage s is the rank s of ``group`` (None: the
    default group), and ``schedule`` gives the stage and micro-batch counts. ``x`` (needed
    on stage 0) and ``y`` (needed on the last stage) are the whole batch, cut into the
    schedule's m micro-batches; a stage given neither gets the batch size as ``batch``.
    Every rank checks these before the first message, so bad input fails on all at once.

    ``loss_fn(output, target)`` is one micro-batch's loss, a mean over its samples
    (default cross-entropy; for a language model, cross-entropy over the flattened
    (batch × sequence, vocabulary) logits, say). Each is divided by m, so that the m of
    them add up to the mean over the whole batch, as do the gradients, which accumulate
    in the stage's parameters. The last stage returns that sum as a tensor (the others
    None), read without waiting for the device.

    ``recorder`` (``bench.pipeline.StepRecorder()``) is told when each op waits, computes
    and ends, and what autograd saves; without one nothing is measured and the ranks
    never wait for the device.

    ``forward_only=True`` runs only the schedule's forwards, without autograd: the loss of
    an evaluation batch (chapter 4, hybrid training).
    """
    index, stages = dist.get_rank(group), dist.get_world_size(group)
    microbatches = max((o.microbatch for o in schedule), default=-1) + 1
    _schedules.validate(schedule, stages, microbatches)
    _check_fifo(schedule, stages)
    check_microbatches(_batch_size(index, stages, x, y, batch), microbatches)
    first, last = index == 0, index == stages - 1
    prev = None if first else global_rank(group, index - 1)
    nxt = None if last else global_rank(group, index + 1)
    xs = x.to(device).chunk(microbatches) if first else None
    ys = y.to(device).chunk(microbatches) if last else None
    ops = _schedules.stage_ops(schedule, index)
    if forward_only:
        ops = [o for o in ops if o.kind == "F"]
    inbox = p2p.PostedReceives(group, device)
    anchor = torch.empty((), device=device, requires_grad=True)
    stash: dict[int, tuple[torch.Tensor, torch.Tensor, list]] = {}  # j -> (input, output, input's gradient)
    # Sends in progress, per micro-batch, so that finished ones release their tensors:
    # holding every sent activation until the end of the step would undo what 1F1B saves.
    sent_fwd: dict[int, p2p.Pending] = {}
    sent_bwd: p2p.Pending = []
    loss = torch.zeros((), device=device) if last else None
    received: tuple[torch.Size, torch.dtype] | None = None  # the activations' shape, once the first came

    def post(k: int) -> None:
        # Posting op k's receive while op k−1 computes lets the bytes travel meanwhile.
        if k >= len(ops) or k in inbox:
            return
        op = ops[k]
        if op.kind == "F" and not first and received is not None:
            inbox.post(k, prev, *received)
        elif op.kind == "B" and not last and op.microbatch in stash:  # shaped like the output sent
            out = stash[op.microbatch][1]
            inbox.post(k, nxt, out.shape, out.dtype)

    def take(k: int) -> torch.Tensor:
        post(k)
        return inbox.take(k)

    rec = recorder or Recorder()
    rec.start(stage, device, group)
    header_sent = False
    for k, op in enumerate(ops):
        j = op.microbatch
        rec.waiting()
        if op.kind == "F":
            sink: list = []
            if first:
                inp = xs[j]
            else:
                if received is None:  # the first activation carries its shape; the others have the same
                    buf = p2p.recv_with_header(prev, device, group)
                    received = (buf.shape, buf.dtype)
                else:
                    buf = take(k)
                inp = _StageInput.apply(buf, anchor, sink)
            post(k + 1)
            rec.computing()
            with rec.saved_tensors(), torch.set_grad_enabled(not forward_only):
                out = run_stage(index, stage, inp)
                if last:
                    out = loss_fn(out, ys[j]) / microbatches
                    loss += out.detach()
            rec.forward_done(op, inp, out)
            if not forward_only:
                stash[j] = (inp, out, sink)
            if not last:
                sent_fwd[j] = p2p.send(out, nxt, group, with_header=not header_sent)
                header_sent = True
        else:
            inp, out, sink = stash.pop(j)
            p2p.wait_all(sent_fwd.pop(j, []))  # done: B(j) needed the next stage to receive F(j)
            sent_bwd = p2p.still_sending(sent_bwd)
            grad = None if last else take(k)
            post(k + 1)
            rec.computing()
            out.backward(grad)
            rec.backward_done(op)
            if not first:
                # No gradient arrived when the output does not depend on the input: zeros.
                sent_bwd += p2p.send(sink[0] if sink else torch.zeros_like(inp), prev, group)
        post(k + 1)  # if its shape became known only now
    p2p.wait_all(sent_bwd + [s for pending in sent_fwd.values() for s in pending])
    return loss


def build_stage(build: Callable[..., nn.Module | Blocks], boundaries: Sequence[Boundary] | None,
                device: torch.device, group: dist.ProcessGroup | None = None) -> nn.Module:
    """This rank's stage of the pipeline over ``group``, on ``device`` (chapter 4.2).

    With ``boundaries``, ``build()`` gives the whole model, which is cut there; this rank
    keeps its stage and drops the rest. Every rank builds the whole model (on the CPU,
    then only the stage moves to ``device``) so that a seeded build draws its random
    numbers in the same order as the single-process model: the weights are exactly its
    weights. That needs the whole model in host memory for a moment. For a model too
    large for that, pass ``boundaries=None``: then ``build(i)`` gives only stage i's
    blocks (an ``nn.Sequential`` or a list of blocks), and only this rank's stage is built.
    """
    index, stages = dist.get_rank(group), dist.get_world_size(group)
    if boundaries is None:
        return nn.Sequential(OrderedDict(as_blocks(build(index)))).to(device)
    parts = split(build(), boundaries)
    if len(parts) != stages:
        raise ValueError(f"{len(boundaries)} split points make {len(parts)} stages but the pipeline has {stages} "
                         f"ranks: launch one rank per stage, run(..., {len(parts)}, ...)")
    return parts[index].to(device)


def stage_grads(stage: nn.Module) -> dict[str, torch.Tensor]:
    """The stage's gradients on the CPU, named as in the unsplit model (zeros where none arrived)."""
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().cpu()
            for n, p in stage.named_parameters()}


def pipeline_step(ctx: RankContext, build: Callable[..., nn.Module | Blocks], boundaries: Sequence[Boundary] | None,
                  x: torch.Tensor, y: torch.Tensor, schedule: str = "1f1b", microbatches: int = 4,
                  loss_fn: LossFn = F.cross_entropy) -> dict[str, Any]:
    """Worker: one forward and backward of the batch through the pipeline (chapter 4.2).

    One rank per stage (``build`` and ``boundaries`` as in :func:`build_stage`). Returns
    this stage's parameter gradients, named as in the unsplit model, and the loss as a
    number (last stage; None elsewhere). ``bench.pipeline.pipeline_sweep`` also measures.
    """
    stage = build_stage(build, boundaries, ctx.device)
    loss = execute(stage, _schedules.make(schedule, ctx.world_size, microbatches), x, y, ctx.device, loss_fn=loss_fn)
    return {"stage": ctx.rank, "grads": stage_grads(stage), "loss": None if loss is None else loss.item()}


def pipeline_train(ctx: RankContext, build: Callable[..., nn.Module | Blocks], boundaries: Sequence[Boundary] | None,
                   x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, schedule: str = "1f1b",
                   microbatches: int = 4, loss_fn: LossFn = F.cross_entropy) -> dict[str, Any]:
    """Worker: train with the pipeline, each rank stepping its own stage's optimizer (chapter 4.2).

    Same batches, optimizer and learning rate as ``training.train_single(build, x, y, cfg)``
    (``cfg.accumulate`` is ignored: the micro-batches are the pipeline's). The losses are
    read once, at the end. Returns them (last stage) and this stage's final state, named
    as in the unsplit model.
    """
    check_microbatches(cfg.global_batch, microbatches)
    stage = build_stage(build, boundaries, ctx.device)
    opt = make_optimizer(cfg, stage.parameters())
    ops = _schedules.make(schedule, ctx.world_size, microbatches)
    losses = []
    for xb, yb in global_batches(x, y, cfg):
        opt.zero_grad()
        losses.append(execute(stage, ops, xb, yb, ctx.device, loss_fn=loss_fn))
        opt.step()
        ctx.tick()
    last = ctx.rank == ctx.world_size - 1
    return {"stage": ctx.rank, "losses": torch.stack(losses).tolist() if last else None,
            "state": {k: v.detach().cpu() for k, v in stage.state_dict().items()}}

