"""Figures of chapters 3.2 and 4.2: schedules as drawn and as measured, pipeline benchmarks, micro-batches."""
from __future__ import annotations

from typing import Any, Sequence

import matplotlib.pyplot as plt

from ._common import _finish


_OP_COLORS = {"F": "#4C72B0", "B": "#DD8452"}


def _draw_ops(ax, boxes: Sequence[tuple[int, float, float, str, int]], stages: int, xlabel: str) -> None:
    """Boxes ``(stage, start, width, kind, microbatch)``: stage 0 on top, labelled when there is room."""
    from matplotlib.patches import Patch

    span = max((start + width for _, start, width, _, _ in boxes), default=1.0)
    for stage, start, width, kind, j in boxes:
        ax.broken_barh([(start, width)], (stage - 0.4, 0.8), facecolors=_OP_COLORS[kind], edgecolors="white")
        if width > span / 70:  # a number that does not fit its box would only add noise
            ax.text(start + width / 2, stage, str(j), ha="center", va="center", color="white", fontsize=7)
    ax.set_yticks(range(stages), [f"stage {s}" for s in range(stages)])
    ax.set_ylim(stages - 0.5, -0.5)
    ax.set_xlim(0, span)
    ax.set_xlabel(xlabel)
    ax.legend(handles=[Patch(color=c, label="forward" if k == "F" else "backward") for k, c in _OP_COLORS.items()],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, title="micro-batch #", title_fontsize=7)


def plot_schedule(ops, stages: int, microbatches: int, title: str | None = None, path: str | None = None):
    """A schedule as planned: one box per op, time slots on x, stages on y (chapters 3.2 and 4.2).

    ``ops`` is a ``schedules`` list of ``Op``; every op takes one slot.
    """
    from ..schedules import idle_fraction

    p, m = stages, microbatches
    fig, ax = plt.subplots(figsize=(min(14, 3 + 0.22 * max(o.slot for o in ops)), 0.9 + 0.45 * p))
    _draw_ops(ax, [(o.stage, o.slot, 1.0, o.kind, o.microbatch) for o in ops], p, "time slot")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(title or f"{p} stages, {m} micro-batches: idle {idle_fraction(ops, p):.0%} of stage-time",
                 fontsize=10)
    return _finish(fig, path)


def plot_gantt(timings_per_rank, title: str | None = None, path: str | None = None):
    """A step as measured: ``timings_per_rank[r]`` is rank r's list of ``bench.pipeline.OpTiming`` (chapter 4.2).

    Drawn like :func:`plot_schedule`, with milliseconds on x, so that plan and measurement sit side by side.
    """
    from ..bench.pipeline import measured_idle_fraction

    p = len(timings_per_rank)
    boxes = [(r, t.start * 1e3, (t.end - t.start) * 1e3, t.kind, t.microbatch)
             for r, ts in enumerate(timings_per_rank) for t in ts]
    n_ops = max(len(ts) for ts in timings_per_rank)
    fig, ax = plt.subplots(figsize=(min(14, 3 + 0.11 * n_ops * p / 2 + 0.2 * p), 0.9 + 0.45 * p))
    _draw_ops(ax, boxes, p, "time since the step started (ms)")
    ax.set_title(title or f"measured: idle {measured_idle_fraction(timings_per_rank):.0%} of stage-time", fontsize=10)
    return _finish(fig, path)


def plot_pipeline_bench(records: Sequence[dict[str, Any]], path: str | None = None):
    """``bench pipeline``: speed-up over the naive split and the bubble against micro-batches (chapter 4.2)."""
    from ..schedules import bubble_fraction, speedup

    stages = sorted({r["stages"] for r in records if r["impl"] != "single"})
    fig, axes = plt.subplots(2, len(stages), figsize=(5.5 * len(stages), 7), squeeze=False)
    styles = {("nanopar", "gpipe"): "-o", ("nanopar", "1f1b"): "-s",
              ("torch", "gpipe"): "--^", ("torch", "1f1b"): "--v"}
    for col, p in enumerate(stages):
        top, bottom = axes[0][col], axes[1][col]
        rows = [r for r in records if r["stages"] == p]
        ms = sorted({r["microbatches"] for r in rows})
        every = range(ms[0], ms[-1] + 1)
        top.plot(every, [speedup(p, m) for m in every], color="grey", lw=3, alpha=0.4,
                 label=f"theory {p}m/(m+{p - 1})")
        bottom.plot(every, [bubble_fraction(p, m) for m in every], color="grey", lw=3, alpha=0.4,
                    label=f"theory {p - 1}/(m+{p - 1})")
        for (impl, sched), style in styles.items():
            pts = sorted((r["microbatches"], r["speedup_vs_naive"], r["bubble_measured"]) for r in rows
                         if (r["impl"], r["schedule"]) == (impl, sched))
            if pts:
                top.plot([q[0] for q in pts], [q[1] for q in pts], style, label=f"{impl} {sched}")
                if pts[0][2] is not None:
                    bottom.plot([q[0] for q in pts], [q[2] for q in pts], style, label=f"{impl} {sched} (measured)")
        for single in (r for r in records if r["impl"] == "single" and col == 0):
            top.axhline(single["speedup_vs_naive"], color="black", ls=":", lw=1, label="one process (unsplit)")
        top.axhline(1.0, color="grey", lw=0.8)
        cores = rows[0].get("cpu_cores") or p
        shared = f" ({p} ranks share {cores} cores)" if p > cores else ""
        if p > cores:  # the naive split keeps one core busy; no schedule can use more than all of them
            top.axhline(cores, color="grey", ls="--", lw=1, label=f"{cores} cores: at most {cores}x")
        top.set_title(f"{p} stages, batch {rows[0]['global_batch']}{shared}: speed-up over the naive split", fontsize=9)
        top.set_ylabel("naive step time / step time")
        bottom.set_title(f"{p} stages: the bubble, measured (ours) and in theory", fontsize=9)
        bottom.set_ylabel("idle fraction of stage-time")
        bottom.set_ylim(0, 1)
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xticks(ms, [str(m) for m in ms])
            ax.set_xlabel("micro-batches m")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    return _finish(fig, path)


def plot_per_sample(times: dict[str, dict[int, float]], path: str | None = None):
    """Per-sample step time against micro-batch size, relative to the largest batch (chapter 4.2)."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for (name, per_size), style in zip(times.items(), ["-o", "-s", "-^", "-v"]):
        sizes = sorted(per_size)
        ax.plot(sizes, [per_size[b] / per_size[sizes[-1]] for b in sizes], style, label=name)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_xlabel("samples per micro-batch")
    ax.set_ylabel("time per sample\n(relative to the largest batch)")
    ax.set_title("Smaller micro-batches cost more per sample")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(fig, path)


def plot_tutorial(records: Sequence[dict[str, Any]], published: dict[str, float], path: str | None = None):
    """PyTorch's model-parallel tutorial experiment: ours on CPU ranks beside its GPU figures (chapter 4.2)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    piped = [r for r in records if r["setup"] == "pipelined"]
    left.plot([r["split_size"] for r in piped], [r["relative_to_one_device"] for r in piped], "-o",
              label="pipelined (ours, CPU ranks)")
    for r, style in zip([r for r in records if r["setup"] != "pipelined"], ["k--", "r:"]):
        left.axhline(r["relative_to_one_device"], color=style[0], ls=style[1:], label=f"{r['setup']} (ours)")
    left.set_xscale("log", base=2)
    left.set_xticks([r["split_size"] for r in piped], [str(r["split_size"]) for r in piped])
    left.set_xlabel("split size (images per micro-batch)")
    left.set_ylabel("step time / one device")
    left.set_title(f"ResNet50, batch {records[0]['batch']} of {records[0]['image']}×{records[0]['image']}, 2 CPU ranks")
    left.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    best = min(piped, key=lambda r: r["step_s"])["relative_to_one_device"]
    ours = [1.0, next(r for r in records if r["setup"] == "naive split")["relative_to_one_device"], best]
    theirs = [v / published["one device"] for v in published.values()]
    pos = range(len(theirs))
    right.bar([p - 0.2 for p in pos], theirs, 0.4, label="tutorial, 2 GPUs")
    right.bar([p + 0.2 for p in pos], ours, 0.4, label="ours, 2 CPU ranks")
    right.set_xticks(list(pos), ["one\ndevice", "naive\nsplit", "pipelined\n(best)"])
    right.set_ylabel("time / one device")
    right.legend(fontsize=8)
    return _finish(fig, path)


def plot_handoff_cost(stages: int = 2, microbatches: Sequence[int] = (8, 16), backward: float = 2.0,
                      latencies: Sequence[float] | None = None, path: str | None = None):
    """Step time against the time one message takes, GPipe beside 1F1B, from ``schedules.timeline`` (chapter 4.2).

    Ops cost 1 (forward) and ``backward`` units; a message between stages costs the
    latency on x, in the same units. The step time is relative to instant messages.
    """
    from ..schedules import make, step_time

    latencies = latencies or [i / 20 for i in range(21)]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    cost = lambda kind, s, j: 1.0 if kind == "F" else backward  # noqa: E731
    for m, line in zip(microbatches, ["-", "--", ":"]):
        for name, color in (("gpipe", "C0"), ("1f1b", "C1")):
            ops = make(name, stages, m)
            span = [step_time(ops, stages, cost, c) for c in latencies]
            ax.plot(latencies, [s / span[0] for s in span], line, color=color, label=f"{name}, m = {m}")
    ax.set_xlabel("time one message takes (units of one micro-batch's forward)")
    ax.set_ylabel("step time / with instant messages")
    ax.set_title(f"{stages} stages, backward = {backward:g} × forward: where a message's time lands", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(fig, path)
