"""``python -m nanopar bench lengths``: uneven sequence lengths under data parallelism (chapter 5.3).

Ranks train a small frame classifier over speech-like utterances
(:func:`nanopar.length_batching.synthetic_lengths`), one epoch per batching plan, the plans
alternating step by step (A B, then B A, …) so that a slow minute of a shared machine hurts
all alike. The model's gradients (2.9 MB at the default size) fit one bucket of
``BucketedDataParallel``, all-reduced once backward has produced the last of them, so a
rank's step splits cleanly into its *compute* (pad, forward, backward) and its time
*blocked in the all-reduce*. The rank that computed longest is blocked only for the
transfer itself; what any other rank is blocked beyond that is its *straggler wait*.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..launch import RankContext, run
from ..length_batching import (PaddingStats, Plan, backward_on_share, length_bucketed_batches, padding_stats,
                               random_batches, synthetic_frames, synthetic_lengths)
from ..training import TrainConfig, wrap
from .common import KEEP_FREED_MEMORY, speed_ratio

FRAMES_PER_SECOND = 25  # encoder frames: 10 ms features after the usual 4× subsampling front end
FEATURES, CLASSES = 40, 32  # 40 filterbank channels; per-frame targets
WARMUP_STEPS = 2  # of each plan, untimed: the first steps allocate and warm the kernels


class FrameEncoder(nn.Module):
    """1-D convolutions over time and a per-frame classifier; ``forward(x, mask)`` (chapter 5.3).

    After every layer the padded frames are set back to zero, so a real frame near the end
    of an utterance sees zeros beyond it however much padding follows: the result for the
    real frames does not depend on the padding (speech encoders mask their convolutions the
    same way).
    """

    def __init__(self, features: int = FEATURES, channels: int = 256, layers: int = 3, kernel: int = 5,
                 classes: int = CLASSES):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(features if k == 0 else channels, channels, kernel, padding=kernel // 2)
                                   for k in range(layers))
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h, keep = x.transpose(1, 2), mask.unsqueeze(1).to(x.dtype)  # Conv1d wants (batch, channels, frames)
        for conv in self.convs:
            h = torch.relu(conv(h)) * keep
        return self.head(h.transpose(1, 2))


def plans(lengths: Sequence[int], batch: int, ranks: int, seed: int = 0, chunk_batches: int = 32) -> dict[str, Plan]:
    """The plans ``bench lengths`` compares, on the same samples: ``random`` (the baseline),
    ``bucketed`` (sorted within chunks) and ``balanced`` (bucketed, ranks' padded frames evened)."""
    return {"random": random_batches(lengths, batch, ranks, seed),
            "bucketed": length_bucketed_batches(lengths, batch, ranks, seed, chunk_batches),
            "balanced": length_bucketed_batches(lengths, batch, ranks, seed, chunk_batches, balance_tokens=True)}


def timed_plan_steps(ctx: RankContext, lengths: Sequence[int], chosen: dict[str, Plan], seed: int,
                     channels: int) -> dict[str, dict[str, list[float]]]:
    """Worker for ``bench lengths``: this rank's compute and all-reduce seconds at every step of every plan."""
    data = synthetic_frames(lengths, FEATURES, CLASSES, seed)
    runs = {}
    for name in chosen:
        torch.manual_seed(seed)
        model, sync = wrap(FrameEncoder(channels=channels).to(ctx.device), TrainConfig(impl="bucketed"))
        runs[name] = (model, sync, torch.optim.SGD(model.parameters(), lr=0.01))
    steps = len(next(iter(chosen.values())))
    out: dict[str, dict[str, list[float]]] = {name: {"compute_s": [], "allreduce_s": [], "step_s": []}
                                              for name in chosen}
    schedule = [(k, False) for k in range(WARMUP_STEPS)] + [(k, True) for k in range(steps)]
    for n, (k, timed) in enumerate(schedule):
        for name in list(chosen)[:: 1 if n % 2 == 0 else -1]:
            model, sync, opt = runs[name]
            step = chosen[name][k]
            frames = sum(lengths[i] for share in step for i in share)
            opt.zero_grad()
            t0 = time.perf_counter()
            backward_on_share(model, [data[i] for i in step[ctx.rank]], frames, ctx.world_size, ctx.device)
            t1 = _finished(ctx.device)
            sync()
            t2 = _finished(ctx.device)
            opt.step()
            if timed:
                out[name]["compute_s"].append(t1 - t0)
                out[name]["allreduce_s"].append(t2 - t1)
                out[name]["step_s"].append(_finished(ctx.device) - t0)
        ctx.tick()
    return out


def _finished(device: torch.device) -> float:
    if device.type == "cuda":  # kernels run asynchronously: the work has ended when they have
        torch.cuda.synchronize(device)
    return time.perf_counter()


def bench_lengths(samples: int | None = None, batch: int = 16, ranks: int = 2, quick: bool = False, seed: int = 0,
                  chunk_batches: int = 32, channels: int = 256, timeout: float = 900.0) -> list[dict[str, Any]]:
    """One epoch of each batching plan of :func:`plans`, alternated step by step (chapter 5.3).

    ``samples`` defaults to 512 utterances with ``quick``, else 4096. One record per plan
    and step: the samples, real and padded frames, compute and all-reduce seconds of each
    rank, each rank's straggler wait (``wait_s``) and the step's time (``step_s``, the
    slowest rank's, the optimizer's update included). :func:`lengths_summary` turns them into ratios.
    """
    samples = samples or (512 if quick else 4096)
    lengths = synthetic_lengths(samples, seed, frames_per_second=FRAMES_PER_SECOND)
    chosen = plans(lengths, batch, ranks, seed, chunk_batches)
    steps = len(chosen["random"])
    with tqdm(total=WARMUP_STEPS + steps, desc="bench lengths", unit="step") as bar:
        per_rank = run(timed_plan_steps, ranks, lengths, chosen, seed, channels, progress=bar, timeout=timeout,
                       env=KEEP_FREED_MEMORY)
    records = []
    for name, plan in chosen.items():
        stats = padding_stats(plan, lengths)
        for k in range(steps):
            compute = [p[name]["compute_s"][k] for p in per_rank]
            blocked = [p[name]["allreduce_s"][k] for p in per_rank]
            records.append({
                "batching": name, "step": k, "ranks": ranks, "batch": batch,
                "samples": [len(share) for share in plan[k]],
                "real_frames": stats.real[k], "padded_frames": stats.padded[k],
                "compute_s": compute, "allreduce_s": blocked,
                "wait_s": [b - min(blocked) for b in blocked],
                "step_s": max(p[name]["step_s"][k] for p in per_rank),
            })
    return records


def lengths_summary(records: Sequence[dict[str, Any]], baseline: str = "random",
                    stretches: int = 8) -> dict[str, dict[str, float]]:
    """Per plan: padding fraction, straggler wait, steps/s, and the speed-up over ``baseline`` (chapter 5.3).

    ``wait_fraction`` is the ranks' straggler wait over their whole time. ``speedup`` is the
    baseline's epoch time over the plan's; ``speedup_q1`` … ``speedup_q3`` are the quartiles
    of the same ratio over ``stretches`` consecutive stretches of steps (the spread the run saw:
    stretches differ in content as well as in the machine's speed). ``idle_predicted`` and
    ``speedup_predicted`` are what they would be if compute time were proportional to padded
    frames (:class:`~nanopar.length_batching.PaddingStats`).
    """
    by_plan: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_plan.setdefault(r["batching"], []).append(r)
    if baseline not in by_plan:
        raise ValueError(f"no records of the baseline {baseline!r}; plans present: {sorted(by_plan)}")
    times = {name: [r["step_s"] for r in sorted(rs, key=lambda r: r["step"])] for name, rs in by_plan.items()}
    frames = {name: PaddingStats([r["real_frames"] for r in rs], [r["padded_frames"] for r in rs])
              for name, rs in by_plan.items()}
    summary = {}
    for name, rs in by_plan.items():
        epoch = sum(times[name])
        spread = speed_ratio(_stretch_sums(times[name], stretches), _stretch_sums(times[baseline], stretches))
        summary[name] = {
            "steps": len(rs), "epoch_s": epoch, "steps_per_s": len(rs) / epoch,
            "samples_per_s": sum(sum(r["samples"]) for r in rs) / epoch,
            "padding_fraction": frames[name].padding_fraction, "idle_predicted": frames[name].idle_fraction,
            "wait_fraction": sum(sum(r["wait_s"]) for r in rs) / sum(r["step_s"] * r["ranks"] for r in rs),
            "speedup": sum(times[baseline]) / epoch, "speedup_q1": spread.q1, "speedup_q3": spread.q3,
            "speedup_predicted": frames[baseline].slowest_frames / frames[name].slowest_frames,
        }
    return summary


def _stretch_sums(times: list[float], stretches: int) -> list[float]:
    if len(times) < stretches:
        raise ValueError(f"{len(times)} steps cannot form {stretches} stretches: run more samples or ask fewer")
    bounds = [len(times) * k // stretches for k in range(stretches + 1)]
    return [sum(times[a:b]) for a, b in zip(bounds, bounds[1:])]
