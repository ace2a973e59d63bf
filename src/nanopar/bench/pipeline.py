"""``python -m nanopar bench pipeline``: naive split, GPipe and 1F1B, ours and PyTorch's (chapter 4.2),
and how a pipeline step is measured: what each rank records while it runs
(:class:`StepRecorder`), then the step's idle fraction and where its time went.
"""
from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import devices, pipeline_torch, schedules
from ..launch import RankContext, run
from ..model_split import Blocks, Boundary, even_split_points
from ..pipeline import LossFn, Recorder, build_stage, check_microbatches, execute, stage_grads
from ..training import make_classification_data, seeded
from .common import KEEP_FREED_MEMORY, slowest_rank


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


def _bytes_held(tensors: dict[int, int], t: torch.Tensor, skip: set[int]) -> None:
    # Keyed by storage, so a tensor saved twice (a ReLU's output, which is also the next
    # Linear's input) counts once; sized by the view, because rank 0's micro-batches are
    # slices of one input tensor.
    ptr = t.untyped_storage().data_ptr()
    if ptr not in skip:
        tensors[ptr] = max(tensors.get(ptr, 0), t.numel() * t.element_size())


class StepRecorder(Recorder):
    """Measures one step of ``pipeline.execute(..., recorder=StepRecorder())`` on this rank (chapter 4.2).

    It starts with a barrier and waits for the device after every op, so that an op's
    time is its own. :meth:`result` (called on every rank of the pipeline) gives
    ``timings``, an :class:`OpTiming` per op, and two peaks of memory held for backward,
    at the moment the most micro-batches were in flight: ``peak_activation_bytes``
    counts the stage's inputs, outputs and every tensor autograd saved;
    ``peak_stashed_bytes`` only the inputs and outputs (what crosses the stage boundaries).
    """

    def start(self, stage: nn.Module, device: torch.device, group: dist.ProcessGroup | None) -> None:
        # Parameters are also saved by autograd (a Linear keeps its weight), but they are
        # not activations: leave them out of the count.
        self.skip = {t.untyped_storage().data_ptr() for t in [*stage.parameters(), *stage.buffers()]}
        self.device, self.group = device, group
        self.timings: list[OpTiming] = []
        self.saved: dict[int, int] = {}
        self.bytes: dict[int, tuple[int, int]] = {}  # micro-batch -> (all it holds, its input and output)
        self.held = self.peak = self.held_io = self.peak_io = 0
        dist.barrier(group=group)  # start together
        self.t0, self.wall0 = time.perf_counter(), time.time()
        self.wait_from = self.begin = self.t0

    def waiting(self) -> None:
        self.wait_from = time.perf_counter()

    def computing(self) -> None:
        self.begin = time.perf_counter()

    def saved_tensors(self):
        self.saved = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            _bytes_held(self.saved, t, self.skip)
            return t
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def _done(self, op: schedules.Op) -> None:
        if self.device.type == "cuda":  # kernels run asynchronously: the op has ended when they have
            torch.cuda.synchronize(self.device)
        self.timings.append(OpTiming(op.kind, op.microbatch, self.begin - self.t0, time.perf_counter() - self.t0,
                                     self.begin - self.wait_from))

    def forward_done(self, op: schedules.Op, inp: torch.Tensor, out: torch.Tensor) -> None:
        self._done(op)
        io: dict[int, int] = {}
        for t in (inp, out):
            _bytes_held(self.saved, t, self.skip)
            _bytes_held(io, t, self.skip)
        nbytes, io_bytes = self.bytes[op.microbatch] = (sum(self.saved.values()), sum(io.values()))
        self.held, self.held_io = self.held + nbytes, self.held_io + io_bytes
        self.peak, self.peak_io = max(self.peak, self.held), max(self.peak_io, self.held_io)

    def backward_done(self, op: schedules.Op) -> None:
        self._done(op)
        nbytes, io_bytes = self.bytes.pop(op.microbatch)
        self.held, self.held_io = self.held - nbytes, self.held_io - io_bytes

    def result(self) -> dict[str, Any]:
        """``timings``, ``peak_activation_bytes`` and ``peak_stashed_bytes``; a collective over the group."""
        # The ranks leave the barrier up to a scheduler tick (~4 ms) apart, which would shift
        # their timings against each other: put them on the wall clock instead (one clock for
        # all ranks of a machine), counted from the earliest rank's start.
        origin = torch.tensor([self.wall0], dtype=torch.float64, device=self.device)
        dist.all_reduce(origin, op=dist.ReduceOp.MIN, group=self.group)
        shift = self.wall0 - origin.item()
        return {"timings": [replace(t, start=t.start + shift, end=t.end + shift) for t in self.timings],
                "peak_activation_bytes": self.peak, "peak_stashed_bytes": self.peak_io}


def pipeline_sweep(ctx: RankContext, build: Callable[..., nn.Module | Blocks], boundaries: Sequence[Boundary] | None,
                   x: torch.Tensor, y: torch.Tensor, configs: Sequence[tuple[str, int]],
                   loss_fn: LossFn = F.cross_entropy) -> list[dict[str, Any]]:
    """Worker: a measured pipeline step for each ``(schedule, microbatches)``, in one launch (chapter 4.2).

    ``pipeline.pipeline_step``'s results (gradients, loss), each from fresh gradients,
    and what :class:`StepRecorder` measured: op timings and peak activation bytes.
    """
    for _, m in configs:  # every config, before the first runs
        check_microbatches(len(x), m)
    stage = build_stage(build, boundaries, ctx.device)
    results = []
    for name, m in configs:
        stage.zero_grad(set_to_none=True)
        rec = StepRecorder()
        loss = execute(stage, schedules.make(name, ctx.world_size, m), x, y, ctx.device, loss_fn=loss_fn, recorder=rec)
        results.append({"stage": ctx.rank, "schedule": name, "microbatches": m, "grads": stage_grads(stage),
                        "loss": None if loss is None else loss.item(), **rec.result()})
        ctx.tick()
    return results


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


def pipeline_configs(stages: int, microbatches: Sequence[int], single: bool = False) -> list[tuple[str, str, int]]:
    """The ``(impl, schedule, microbatches)`` measured at ``stages``; "naive" is the whole batch as one micro-batch."""
    configs = [("single", "naive", 1)] if single else []
    for impl in ("nanopar", "torch"):
        configs.append((impl, "naive", 1))  # for torch: ScheduleGPipe with one micro-batch
        configs += [(impl, "gpipe", m) for m in microbatches]
        # torch's Schedule1F1B refuses fewer micro-batches than stages: those are skipped.
        configs += [(impl, "1f1b", m) for m in microbatches if impl == "nanopar" or m >= stages]
    return configs


def pipeline_timings(ctx: RankContext, build: Callable[[], nn.Module], boundaries: Sequence[int], batch: int,
                     shape: tuple[int, ...], classes: int, configs: Sequence[tuple[str, str, int]],
                     rounds: int) -> dict[tuple, dict]:
    """Worker: each config's step time on this rank, configs alternating round by round (chapter 4.2).

    A barrier precedes every step, so a step's time is the slowest rank's. "single" is the
    unsplit model on rank 0 alone (one process, one thread) while the other ranks wait.
    What :class:`StepRecorder` measured in our executor comes back too.
    """
    first = ctx.rank == 0
    x, y = make_classification_data(batch, shape, classes)
    stage = build_stage(functools.partial(seeded, build), boundaries, ctx.device)
    whole = seeded(build) if first else None

    def single() -> None:
        if first:
            F.cross_entropy(whole(x), y).backward()

    def ours(ops: list[schedules.Op]) -> StepRecorder:
        rec = StepRecorder()
        execute(stage, ops, x, y, ctx.device, recorder=rec)
        return rec
    runners: dict[tuple, tuple[nn.Module | None, Callable[[], Any]]] = {}
    for impl, name, m in configs:
        if impl == "single":
            runners[impl, name, m] = (whole, single)
        elif impl == "nanopar":
            runners[impl, name, m] = (stage, functools.partial(ours, schedules.make(name, ctx.world_size, m)))
        else:
            torch_step = pipeline_torch.make_step(stage, name, m, ctx.device)
            runners[impl, name, m] = (stage, functools.partial(torch_step, x, y))
    out = {c: {"step_s": [], "timings": [], "peak_activation_bytes": None} for c in configs}
    for r in range(rounds + 1):  # round 0 warms up (torch infers shapes, buffers get allocated)
        for c, (module, step) in runners.items():
            if module is not None:
                module.zero_grad(set_to_none=True)
            dist.barrier()
            t0 = time.perf_counter()
            res = step()
            took = time.perf_counter() - t0
            measured = res.result() if isinstance(res, StepRecorder) else None  # a collective: after the clock
            if r:
                out[c]["step_s"].append(took)
                if measured:
                    out[c]["timings"].append(measured["timings"])
                    out[c]["peak_activation_bytes"] = measured["peak_activation_bytes"]
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
    (:func:`time_budget`, median over rounds). The ranks keep freed memory
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
                    "speedup_theory": 1.0 if name == "naive" else schedules.speedup(p, m),
                    "peak_activation_bytes": max(r["peak_activation_bytes"] for r in res) if ours else None,
                    "messages_s": statistics.median(b["span"] - b["instant_messages"] for b in budget)
                    if ours else None,
                    "slow_ops_s": statistics.median(b["instant_messages"] - b["steady_ops"] for b in budget)
                    if ours else None})
            naive = {r["impl"]: r["step_s"] for r in records[-len(configs):] if r["schedule"] == "naive"}
            for rec in records[-len(configs):]:
                rec["speedup_vs_naive"] = naive["nanopar" if rec["impl"] == "single" else rec["impl"]] / rec["step_s"]
    return records


def pipeline_headline(records: list[dict[str, Any]], stages: int = 2, microbatches: int = 8) -> dict[str, float]:
    """Speed-ups over naive, ours / torch step time, worst bubble error, at this size (chapter 4.2)."""
    m = microbatches
    at = {(r["impl"], r["schedule"], r["microbatches"]): r for r in records if r["stages"] == stages}
    out = {f"{s}_speedup": at["nanopar", s, m]["speedup_vs_naive"] for s in ("gpipe", "1f1b")}
    out.update({f"{s}_nanopar_over_torch": at["nanopar", s, m]["step_s"] / at["torch", s, m]["step_s"]
                for s in ("gpipe", "1f1b") if ("torch", s, m) in at})
    out["max_bubble_error"] = max(abs(r["bubble_measured"] - r["bubble_theory"])
                                  for (impl, _, _), r in at.items() if impl == "nanopar")
    return out
