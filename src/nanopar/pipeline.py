"""A real pipeline across processes: each stage is a rank; activations and gradients travel by send/recv.

Book: chapter 4.2 ("multi-process pipeline"), with the schedules of chapter 3.2.

Rank r builds the whole model with the seeded builder, keeps stage r, and runs the ops
that the schedule (``nanopar.schedules``, a list of data) gives stage r, in slot order:

* F(j): receive micro-batch j's activation from rank r−1 (rank 0 slices the input),
  run the stage, send the output to rank r+1; the last stage computes the loss,
  cross-entropy over the micro-batch divided by m, so that the m losses add up to the
  mean over the whole batch;
* B(j): receive the gradient of that output from rank r+1 (the last stage starts from
  its loss), backpropagate, send the gradient of the stage's input to rank r−1.

    from nanopar.launch import run
    build = functools.partial(training.seeded, functools.partial(models.mlp, 64, 8))
    results = run(pipeline_step, 4, build, [2, 4, 6], x, y, "1f1b", 8)
    results[r]["grads"], results[-1]["loss"], results[r]["timings"], results[r]["peak_activation_bytes"]

Sends are non-blocking (``isend``) and receives blocking, so any schedule that
``schedules.validate`` accepts runs without deadlock: a rank only ever waits for an op
that comes earlier in the schedule. :func:`torch_pipeline_step` runs the same split
with ``torch.distributed.pipelining`` (ScheduleGPipe, Schedule1F1B) for parity.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import schedules as _schedules
from .launch import RankContext
from .model_split import Boundary, shape_error, split
# The same batches and optimizers as the single-process reference, so results compare exactly.
from .training import TrainConfig, global_batches, make_optimizer

_MAX_DIMS = 8
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32]


@dataclass(frozen=True)
class OpTiming:
    """When one op computed, in seconds after the earliest rank's start; ``wait`` was spent receiving.

    The ranks' times are on the wall clock: exact between the ranks of one machine, and
    across machines as good as their clocks' synchronisation (NTP: about a millisecond).
    """

    kind: str
    microbatch: int
    start: float
    end: float
    wait: float


def check_microbatches(batch: int, m: int) -> int:
    """The micro-batch size, or an error that says which micro-batch counts work."""
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


def _check_fifo(schedule: Sequence[_schedules.Op], p: int) -> None:
    # Messages between two ranks are matched in the order they were posted, so every
    # stage must run the forwards (and the backwards) in the same micro-batch order.
    for kind in "FB":
        orders = {tuple(o.microbatch for o in _schedules.stage_ops(schedule, s) if o.kind == kind) for s in range(p)}
        if len(orders) > 1:
            raise ValueError(f"every stage must run its {kind} ops in the same micro-batch order; got {orders}")


def _send(t: torch.Tensor, dst: int, group, pending: list, with_header: bool) -> None:
    t = t.detach().contiguous()
    if with_header:  # the receiver does not know the shape yet: tell it first
        if t.dim() > _MAX_DIMS or t.dtype not in _DTYPES:
            raise ValueError(f"cannot send an activation of shape {tuple(t.shape)} and dtype {t.dtype} between "
                             f"stages: at most {_MAX_DIMS} dimensions and one of {_DTYPES}")
        head = [t.dim(), _DTYPES.index(t.dtype), *t.shape] + [0] * (_MAX_DIMS - t.dim())
        header = torch.tensor(head, dtype=torch.int64, device=t.device)
        pending.append((header, dist.isend(header, dst, group=group)))
    pending.append((t, dist.isend(t, dst, group=group)))  # keep t alive until the send is done


def _recv_with_header(src: int, device: torch.device, group) -> torch.Tensor:
    header = torch.empty(2 + _MAX_DIMS, dtype=torch.int64, device=device)
    dist.recv(header, src, group=group)
    ndim, code, *dims = header.tolist()
    buf = torch.empty(dims[:ndim], dtype=_DTYPES[code], device=device)
    dist.recv(buf, src, group=group)
    return buf


def _bytes_held(tensors: dict[int, int], t: torch.Tensor, skip: set[int]) -> None:
    # Keyed by storage, so a tensor saved twice (a ReLU's output, which is also the next
    # Linear's input) counts once; sized by the view, because rank 0's micro-batches are
    # slices of one input tensor.
    ptr = t.untyped_storage().data_ptr()
    if ptr not in skip:
        tensors[ptr] = max(tensors.get(ptr, 0), t.numel() * t.element_size())


def execute(stage: nn.Module, index: int, p: int, schedule: Sequence[_schedules.Op], x: torch.Tensor | None,
            y: torch.Tensor | None, m: int, device: torch.device, ranks: Sequence[int] | None = None,
            group=None) -> dict[str, Any]:
    """Run stage ``index``'s ops of ``schedule`` (call on every stage's rank at once; chapter 4.2).

    ``x`` (stage 0) and ``y`` (last stage) are the whole batch; they are cut into ``m``
    micro-batches. ``ranks[s]`` is the global rank of stage s (default: s). Gradients
    accumulate in the stage's parameters. Returns the loss (last stage, else None), an
    :class:`OpTiming` per op and, at the moment the most micro-batches were in flight,
    the bytes held for backward: ``peak_activation_bytes`` counts the stage's inputs,
    outputs and every tensor autograd saved; ``peak_stashed_bytes`` only the inputs and
    outputs (what crosses the stage boundaries).
    """
    _schedules.validate(schedule, p, m)
    _check_fifo(schedule, p)
    ranks = list(range(p)) if ranks is None else list(ranks)
    first, last = index == 0, index == p - 1
    xs = ys = None
    if first:
        check_microbatches(len(x), m)
        xs = x.to(device).chunk(m)
    if last:
        check_microbatches(len(y), m)
        ys = y.to(device).chunk(m)
    # Parameters are also saved by autograd (a Linear keeps its weight), but they are not
    # activations: leave them out of the count.
    skip = {t.untyped_storage().data_ptr() for t in [*stage.parameters(), *stage.buffers()]}
    stash: dict[int, tuple[torch.Tensor, torch.Tensor, int, int]] = {}
    # Sends in progress, per micro-batch, so that finished ones release their tensors:
    # holding every sent activation until the end of the step would undo what 1F1B saves.
    sent_fwd: dict[int, list] = {}
    sent_bwd: list = []
    timings, loss_total = [], 0.0
    held = peak = held_io = peak_io = 0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)

    ops = _schedules.stage_ops(schedule, index)
    act: tuple[list[int], torch.dtype] | None = None  # shape of the activations received, once known
    shape_sent = False  # the first activation sent carries its shape; the others have the same
    posted: dict[int, tuple[torch.Tensor, Any]] = {}  # op position -> (buffer, receive in flight)

    def post(k: int) -> None:
        # gloo moves a message only once its receive is posted: posting op k's receive while
        # op k−1 computes lets the bytes travel meanwhile, instead of after it.
        if k >= len(ops) or k in posted:
            return
        op = ops[k]
        if op.kind == "F" and not first and act is not None:
            buf = torch.empty(act[0], dtype=act[1], device=device)
            posted[k] = (buf, dist.irecv(buf, ranks[index - 1], group=group))
        elif op.kind == "B" and not last and op.microbatch in stash:  # its shape: the output sent
            buf = torch.empty_like(stash[op.microbatch][1])
            posted[k] = (buf, dist.irecv(buf, ranks[index + 1], group=group))

    def take(k: int) -> torch.Tensor:
        post(k)
        buf, work = posted.pop(k)
        work.wait()
        return buf

    dist.barrier(group=group)  # start together
    t0, wall0 = time.perf_counter(), time.time()
    for k, op in enumerate(ops):
        j, w0 = op.microbatch, time.perf_counter()
        if op.kind == "F":
            if first:
                inp = xs[j]
            elif act is None:  # the first activation carries its shape; the others have the same
                inp = _recv_with_header(ranks[index - 1], device, group)
                act = (list(inp.shape), inp.dtype)
            else:
                inp = take(k)
            inp.requires_grad_(not first)
            post(k + 1)
            start = time.perf_counter()
            saved: dict[int, int] = {}
            pack = lambda t: (_bytes_held(saved, t, skip), t)[1]  # noqa: E731
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                try:
                    out = stage(inp)
                except RuntimeError as e:
                    if first:
                        raise
                    raise ValueError(shape_error(index, stage, tuple(inp.shape), str(e))) from e
                if last:
                    out = F.cross_entropy(out, ys[j]) / m
                    loss_total += out.item()
            sync(device)  # CUDA runs asynchronously: the op has ended when its kernels have
            end = time.perf_counter()  # before sending: the next stage cannot start before this
            io: dict[int, int] = {}
            for t in (inp, out):
                _bytes_held(saved, t, skip)
                _bytes_held(io, t, skip)
            nbytes, io_bytes = sum(saved.values()), sum(io.values())
            stash[j] = (inp, out, nbytes, io_bytes)
            held, held_io = held + nbytes, held_io + io_bytes
            peak, peak_io = max(peak, held), max(peak_io, held_io)
            if not last:
                _send(out, ranks[index + 1], group, sent_fwd.setdefault(j, []), with_header=not shape_sent)
                shape_sent = True
        else:
            inp, out, nbytes, io_bytes = stash.pop(j)
            for _, work in sent_fwd.pop(j, []):  # done: B(j) needed the next stage to receive F(j)
                work.wait()
            sent_bwd = [(t, w) for t, w in sent_bwd if not w.is_completed()]
            grad = None if last else take(k)  # shaped like the output this stage sent
            post(k + 1)
            start = time.perf_counter()
            out.backward(grad)
            sync(device)
            end = time.perf_counter()
            if not first:
                g = inp.grad if inp.grad is not None else torch.zeros_like(inp)
                _send(g, ranks[index - 1], group, sent_bwd, with_header=False)
            held, held_io = held - nbytes, held_io - io_bytes
        post(k + 1)  # if its shape became known only now
        timings.append(OpTiming(op.kind, j, start - t0, end - t0, start - w0))
    for _, work in [*sent_bwd, *(w for ws in sent_fwd.values() for w in ws)]:
        work.wait()
    # The ranks leave the barrier up to a scheduler tick (~4 ms) apart, which would shift
    # their timings against each other: put them on the wall clock instead (one clock for
    # all ranks of a machine), counted from the earliest rank's start.
    origin = torch.tensor([wall0], dtype=torch.float64, device=device)
    dist.all_reduce(origin, op=dist.ReduceOp.MIN, group=group)
    shift = wall0 - origin.item()
    timings = [replace(t, start=t.start + shift, end=t.end + shift) for t in timings]
    return {"loss": loss_total if last else None, "timings": timings, "peak_activation_bytes": peak,
            "peak_stashed_bytes": peak_io}


def _my_stage(ctx: RankContext, build: Callable[[], nn.Module], boundaries: Sequence[Boundary]) -> nn.Module:
    stages = split(build(), boundaries)
    if len(stages) != ctx.world_size:
        raise ValueError(f"{len(boundaries)} split points make {len(stages)} stages but {ctx.world_size} ranks "
                         f"were started: launch one rank per stage, run(..., {len(stages)}, ...)")
    return stages[ctx.rank].to(ctx.device)


def _grads(stage: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().cpu()
            for n, p in stage.named_parameters()}


def pipeline_step(ctx: RankContext, build: Callable[[], nn.Module], boundaries: Sequence[Boundary],
                  x: torch.Tensor, y: torch.Tensor, schedule: str = "1f1b", microbatches: int = 4) -> dict[str, Any]:
    """Worker: one forward and backward of the batch through the pipeline (chapter 4.2).

    One rank per stage. Returns this stage's parameter gradients (named as in the
    unsplit model), the loss (last stage; None elsewhere), the op timings and the peak
    activation bytes.
    """
    return pipeline_sweep(ctx, build, boundaries, x, y, [(schedule, microbatches)])[0]


def pipeline_sweep(ctx: RankContext, build: Callable[[], nn.Module], boundaries: Sequence[Boundary],
                   x: torch.Tensor, y: torch.Tensor, configs: Sequence[tuple[str, int]]) -> list[dict[str, Any]]:
    """Worker: :func:`pipeline_step` for each ``(schedule, microbatches)`` in one launch, from fresh gradients."""
    for _, m in configs:  # fail before any communication, on every rank alike
        check_microbatches(len(x), m)
    stage = _my_stage(ctx, build, boundaries)
    results = []
    for name, m in configs:
        stage.zero_grad(set_to_none=True)
        ops = _schedules.make(name, ctx.world_size, m)
        out = execute(stage, ctx.rank, ctx.world_size, ops, x, y, m, ctx.device)
        results.append({"stage": ctx.rank, "schedule": name, "microbatches": m, "grads": _grads(stage), **out})
        ctx.tick()
    return results


def torch_pipeline_step(ctx: RankContext, build: Callable[[], nn.Module], boundaries: Sequence[Boundary],
                        x: torch.Tensor, y: torch.Tensor, schedule: str = "1f1b",
                        microbatches: int = 4) -> dict[str, Any]:
    """Worker: the same step with PyTorch's engine, ``torch.distributed.pipelining`` (chapter 4.2).

    ``schedule`` is "gpipe" (ScheduleGPipe) or "1f1b" (Schedule1F1B, which needs at
    least as many micro-batches as stages). Returns the stage's gradients and the loss.
    """
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    classes = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
    if schedule not in classes:
        raise ValueError(f"torch.distributed.pipelining comparison supports {sorted(classes)}, got {schedule!r}")
    check_microbatches(len(x), microbatches)
    stage_mod = _my_stage(ctx, build, boundaries)
    p, first, last = ctx.world_size, ctx.rank == 0, ctx.rank == ctx.world_size - 1
    stage = PipelineStage(stage_mod, ctx.rank, p, ctx.device)
    # loss_fn is the mean over one micro-batch; scale_grads (the default) then divides the
    # accumulated gradients by m: together, the mean over the whole batch, as ours.
    sched = classes[schedule](stage, microbatches, loss_fn=F.cross_entropy)
    losses: list[torch.Tensor] = []
    args = (x.to(ctx.device),) if first else ()
    kwargs = {"target": y.to(ctx.device), "losses": losses} if last else {}
    sched.step(*args, **kwargs)
    loss = sum(l.item() for l in losses) / microbatches if last else None
    return {"stage": ctx.rank, "grads": _grads(stage_mod), "loss": loss}


def pipeline_train(ctx: RankContext, build: Callable[[], nn.Module], boundaries: Sequence[Boundary],
                   x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, schedule: str = "1f1b",
                   microbatches: int = 4) -> dict[str, Any]:
    """Worker: train with the pipeline, each rank stepping its own stage's optimizer (chapter 4.2).

    Same batches, optimizer and learning rate as ``training.train_single(build, x, y, cfg)``
    (``cfg.accumulate`` is ignored: the micro-batches are the pipeline's). Returns the
    losses (last stage) and this stage's final state, named as in the unsplit model.
    """
    check_microbatches(cfg.global_batch, microbatches)
    stage = _my_stage(ctx, build, boundaries)
    opt = make_optimizer(cfg, stage.parameters())
    ops = _schedules.make(schedule, ctx.world_size, microbatches)
    losses = []
    for xb, yb in global_batches(x, y, cfg):
        opt.zero_grad()
        out = execute(stage, ctx.rank, ctx.world_size, ops, xb, yb, microbatches, ctx.device)
        losses.append(out["loss"])
        opt.step()
        ctx.tick()
    return {"stage": ctx.rank, "losses": losses if ctx.rank == ctx.world_size - 1 else None,
            "state": {k: v.detach().cpu() for k, v in stage.state_dict().items()}}
