"""The book's figures, drawn from the records the benchmarks return.

Book: chapters 1 to 4 (memory, bandwidth, data parallelism, pipelines). Each function
returns a matplotlib Figure that pyplot no longer tracks (so a notebook shows it exactly
once, as the cell's result); pass ``path`` to also save it (PNG or SVG, by suffix).
"""
from __future__ import annotations

from typing import Any, Sequence

import matplotlib.pyplot as plt


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:g} {unit}"
        n /= 1024
    return f"{n:g} TiB"


def _finish(fig, path: str | None):
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    plt.close(fig)  # the caller displays or saves it; pyplot must not show it again
    return fig


def plot_bandwidth(records: Sequence[dict[str, Any]], path: str | None = None):
    """Bus bandwidth against message size, one line per (implementation, world size)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    series: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for r in records:
        series.setdefault((r["impl"], r["world_size"]), []).append((r["bytes"], r["busbw_gbps"]))
    styles = {"gloo": "-o", "ring": "--s", "memcpy": ":^"}
    for (impl, n), pts in sorted(series.items()):
        pts.sort()
        label = "memory copy (one process)" if impl == "memcpy" else f"{impl}, {n} ranks"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], styles.get(impl, "-"), label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    sizes = sorted({r["bytes"] for r in records})
    ax.set_xticks(sizes, [_human_bytes(s) for s in sizes], rotation=45)
    ax.set_xlabel("message size")
    ax.set_ylabel("bus bandwidth (GB/s)")
    ax.set_title("All-reduce bus bandwidth: gloo vs our ring")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(fig, path)


def plot_parallelism_schemes(path: str | None = None):
    """Data, model (pipeline) and hybrid parallelism on four devices (chapter 2)."""
    from matplotlib.patches import Rectangle

    layers, colors = 4, ["#4C72B0", "#55A868", "#C44E52", "#8172B2"]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    titles = ["data parallelism:\nevery device holds the whole model,\neach a different quarter of the batch",
              "model (pipeline) parallelism:\neach device holds some layers,\nactivations flow between them",
              "hybrid (2 × 2): two pipelines,\ndevices {0, 2} and {1, 3},\neach taking half of the batch"]
    # The hybrid panel numbers devices as chapter 3 numbers ranks (Megatron-LM's order with
    # d_tp = 1): rank = i_dp + d_dp * i_pp, so replicas are adjacent and stages are d_dp apart.
    d_dp = 2
    # which layers and which batch shard each device d holds, per scheme
    schemes = [
        [(range(layers), f"batch ¼ #{d + 1}") for d in range(4)],
        [([d], "whole batch") for d in range(4)],
        [(range(2 * (d // d_dp), 2 * (d // d_dp) + 2), f"batch ½ #{d % d_dp + 1}") for d in range(4)],
    ]
    for ax, title, scheme in zip(axes, titles, schemes):
        for d, (held, data) in enumerate(scheme):
            x = d * 1.2
            ax.add_patch(Rectangle((x, 0), 1, layers + 0.6, fill=False, lw=1.5))
            ax.text(x + 0.5, layers + 0.9, f"device {d}", ha="center", fontsize=8)
            for layer in held:
                ax.add_patch(Rectangle((x + 0.1, 0.3 + layer), 0.8, 0.8, color=colors[layer], alpha=0.85))
                ax.text(x + 0.5, 0.7 + layer, f"L{layer + 1}", ha="center", va="center", color="white", fontsize=8)
            ax.text(x + 0.5, -0.4, data, ha="center", fontsize=7)
        ax.set_xlim(-0.2, 4.8)
        ax.set_ylim(-0.9, layers + 1.4)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    return _finish(fig, path)


def plot_dp_scaling(records: Sequence[dict[str, Any]], path: str | None = None):
    """Data parallelism: throughput and scaling efficiency against ranks, per workload (chapter 4.1)."""
    workloads = list(dict.fromkeys(r["workload"] for r in records))
    fig, axes = plt.subplots(2, len(workloads), figsize=(5 * len(workloads), 6.5), squeeze=False)
    styles = {"single": "k*", "naive": "-o", "bucketed": "-s", "ddp": "--^"}
    for col, workload in enumerate(workloads):
        rows = [r for r in records if r["workload"] == workload]
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = sorted((r["world_size"], r["samples_per_s"], r["scaling_efficiency"]) for r in rows if r["impl"] == impl)
            n, rate, eff = zip(*pts)
            axes[0][col].plot(n, rate, styles.get(impl, "-"), label=impl)
            axes[1][col].plot(n, eff, styles.get(impl, "-"), label=impl)
        sizes = sorted({r["world_size"] for r in rows})
        batch = rows[0]["per_rank_batch"]
        axes[0][col].set_title(f"{workload} ({rows[0]['model']}, {batch} samples per rank)", fontsize=9)
        axes[0][col].set_ylabel("samples / s")
        axes[1][col].axhline(1.0, color="grey", lw=0.8, ls=":")
        axes[1][col].set_ylabel("scaling efficiency")
        axes[1][col].set_ylim(0, 1.15)
        for ax in axes[:, col]:
            ax.set_xticks(sizes)
            ax.set_xlabel("ranks")
            ax.grid(True, alpha=0.3)
        axes[0][col].legend(fontsize=8)
    return _finish(fig, path)


def plot_losses(curves: dict[str, Sequence[float]], path: str | None = None, title: str = "training loss"):
    """Loss against step, one line per run (chapter 4.1)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for (label, losses), style in zip(curves.items(), ["-o", "--s", ":^", "-.v"]):
        ax.plot(range(1, len(losses) + 1), losses, style, label=label, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _finish(fig, path)


def plot_training_memory(rows, device_gib: float, path: str | None = None):
    """Weights and training state of reference models against one device's memory (chapter 1)."""
    from .cost import gib

    fig, ax = plt.subplots(figsize=(8, 4))
    positions = range(len(rows))
    ax.bar([p - 0.2 for p in positions], [gib(2 * r.params) for r in rows], 0.4, label="weights only (bf16)")
    ax.bar([p + 0.2 for p in positions], [r.memory_gib["mixed"] for r in rows], 0.4,
           label="training state (mixed, Adam)")
    ax.axhline(device_gib, color="black", linestyle="--", label=f"one A100 ({device_gib:g} GiB)")
    ax.set_yscale("log")
    ax.set_xticks(list(positions), [r.model for r in rows], rotation=20)
    ax.set_ylabel("GiB (log scale)")
    ax.set_title("Memory without activations")
    ax.legend()
    return _finish(fig, path)


def plot_step_scaling(runs, path: str | None = None):
    """Measured step time (median and range) and achieved FLOP/s against model size (chapter 1)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    params = [m.params for m in runs]
    medians = [m.step_s for m in runs]
    spread = [[m.step_s - m.step_s_min for m in runs], [m.step_s_max - m.step_s for m in runs]]
    left.errorbar(params, medians, yerr=spread, fmt="o-", capsize=3, label="measured: median and range")
    left.plot(params, [medians[-1] * p / params[-1] for p in params], ":", color="gray",
              label="proportional to params")
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("parameters")
    left.set_ylabel("seconds per training step")
    left.legend()
    right.semilogx(params, [m.flops_per_s / 1e9 for m in runs], "o-")
    right.set_xlabel("parameters")
    right.set_ylabel("achieved GFLOP/s")
    return _finish(fig, path)


# --- pipelines (chapter 4.2): the planned schedule and the measured one, drawn alike ---------
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
    from .schedules import idle_fraction

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
    from .bench.pipeline import measured_idle_fraction

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
    from .schedules import bubble_fraction, speedup

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
    from .schedules import make, step_time

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


def plot_image_sizes(records: Sequence[dict[str, Any]], path: str | None = None):
    """ResNet50's data-parallel step by image size: time computing and all-reducing, and activations (chapter 5.2)."""
    sizes = [f"{r['image']}×{r['image']}" for r in records]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 3.8))
    compute = [r["compute_s"] for r in records]
    ax_t.bar(sizes, compute, label="forward + backward")
    ax_t.bar(sizes, [r["allreduce_s"] for r in records], bottom=compute, label="gradient all-reduce")
    for i, r in enumerate(records):
        ax_t.annotate(f"{r['comm_share']:.0%}", (i, r["compute_s"] + r["allreduce_s"]), ha="center", va="bottom")
    ax_t.set(ylabel="seconds per step", title=f"one step, {records[0]['batch']} images per rank "
             f"({records[0]['ranks']} ranks); % = all-reduce share")
    ax_t.legend()
    mib = 2**20
    ax_m.bar(sizes, [r["activation_bytes"] / mib for r in records], color="tab:green", label="activations")
    ax_m.axhline(records[0]["gradient_bytes"] / mib, color="tab:orange", ls="--", label="gradients (all-reduced)")
    ax_m.set(ylabel="MiB", title="memory: activations grow with pixels")
    ax_m.legend()
    return _finish(fig, path)


def plot_length_batching(records: Sequence[dict[str, Any]], lengths: Sequence[int] | None = None,
                         path: str | None = None):
    """Frames and time of one epoch per batching plan, from ``bench.lengths`` records (chapter 5.3).

    With ``lengths``, a first panel shows their distribution. The time panel splits a step
    (averaged over the ranks) into compute, straggler wait, the all-reduce's transfer
    (what the last rank to arrive is blocked) and the rest (the optimizer's update).
    """
    plans = list(dict.fromkeys(r["batching"] for r in records))
    fig, axes = plt.subplots(1, 3 if lengths else 2, figsize=(12 if lengths else 8.5, 3.6))
    if lengths:
        axes[0].hist(lengths, bins=40, color="C7")
        axes[0].set_xlabel("frames per utterance")
        axes[0].set_ylabel("utterances")
        axes[0].set_title("the lengths", fontsize=10)
    frames_ax, time_ax = axes[-2:]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    for k, plan in enumerate(plans):
        rs = [r for r in records if r["batching"] == plan]
        real, padded = sum(sum(r["real_frames"]) for r in rs), sum(sum(r["padded_frames"]) for r in rs)
        frames_ax.barh(k, real / 1e3, color="C0", label="real" if k == 0 else None)
        frames_ax.barh(k, (padded - real) / 1e3, left=real / 1e3, color="C3", label="padding" if k == 0 else None)
        parts = {"compute": sum(mean(r["compute_s"]) for r in rs),
                 "straggler wait": sum(mean(r["wait_s"]) for r in rs),
                 "all-reduce": sum(min(r["allreduce_s"]) for r in rs)}
        parts["update, other"] = sum(r["step_s"] for r in rs) - sum(parts.values())
        left = 0.0
        for (name, seconds), color in zip(parts.items(), ["C0", "C3", "C1", "C7"]):
            time_ax.barh(k, seconds, left=left, color=color, label=name if k == 0 else None)
            left += seconds
    for ax, xlabel, title in ((frames_ax, "thousands of frames in the epoch", "padded frames"),
                              (time_ax, "seconds (mean over ranks)", "the epoch's time")):
        ax.set_yticks(range(len(plans)), plans)
        ax.invert_yaxis()
        ax.set_xlabel(xlabel)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
    return _finish(fig, path)


_AXIS_COLORS = {"tp": "tab:red", "dp": "tab:blue", "pp": "tab:green"}
_AXIS_NAMES = {"tp": "tensor", "dp": "data", "pp": "pipeline"}


def plot_hybrid_bench(records: Sequence[dict[str, Any]], path: str | None = None):
    """``bench hybrid``: samples/s of every grid shape, and the bytes each axis moves per step (chapter 3.3)."""
    shapes = [f"{r['dp']}×{r['pp']}×{r['tp']}" for r in records]
    fig, (ax_s, ax_b) = plt.subplots(1, 2, figsize=(11, 4))
    ax_s.bar(shapes, [r["samples_per_s"] for r in records], color="grey")
    cores = records[0].get("cpu_cores")
    ranks = records[0]["dp"] * records[0]["pp"] * records[0]["tp"]
    on = f", {ranks} ranks on {cores} cores" if cores else ""
    ax_s.set(xlabel="dp × pp × tp", ylabel="samples / s", title=f"training speed, {records[0]['model']}{on}")
    ax_s.title.set_fontsize(9)
    bottom = [0.0] * len(records)
    mib = 2**20
    for axis in ("dp", "pp", "tp"):
        counted = [r[f"comm_bytes_{axis}"] / mib for r in records]
        ax_b.bar(shapes, counted, bottom=bottom, color=_AXIS_COLORS[axis], label=f"{_AXIS_NAMES[axis]} ({axis})")
        bottom = [b + c for b, c in zip(bottom, counted)]
    formula = [sum(r[f"comm_bytes_{a}_formula"] for a in ("dp", "pp", "tp")) / mib for r in records]
    ax_b.plot(shapes, formula, "k_", markersize=22, mew=2, label="formulas of 3.3 (total)")
    ax_b.set(xlabel="dp × pp × tp", ylabel="MiB per step, all ranks",
             title=f"bytes handed to collectives per step (counted), batch {records[0]['batch']}")
    ax_b.title.set_fontsize(9)
    ax_b.legend(fontsize=8)
    return _finish(fig, path)


def plot_grid(topology: Any, path: str | None = None):
    """The ranks of a ``grid.Topology`` with its tensor, data and pipeline groups drawn (chapter 3.3).

    Tensor-parallel slices run left to right, data-parallel replicas top to bottom, and
    pipeline stages into the depth; each group is a line through its ranks.
    """
    depth = (1.3, 0.9)  # one pipeline stage further back

    def where(rank: int) -> tuple[float, float]:
        c = topology.coords(rank)
        return 2.2 * c.tp + depth[0] * c.pp, -1.8 * c.dp + depth[1] * c.pp

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for axis in ("pp", "dp", "tp"):
        if topology.degree(axis) == 1:
            continue
        for i, group in enumerate(topology.groups(axis)):
            xs, ys = zip(*(where(r) for r in group))
            ax.plot(xs, ys, "-", color=_AXIS_COLORS[axis], lw=3, alpha=0.7, zorder=1,
                    label=f"{_AXIS_NAMES[axis]}-parallel groups ({axis} = {topology.degree(axis)})" if i == 0 else None)
    for rank in range(topology.world_size):
        x, y = where(rank)
        c = topology.coords(rank)
        ax.scatter([x], [y], s=900, color="white", edgecolors="black", zorder=2)
        ax.text(x, y + 0.05, str(rank), ha="center", va="center", fontsize=11, weight="bold", zorder=3)
        ax.text(x, y - 0.5, f"({c.pp},{c.dp},{c.tp})", ha="center", va="center", fontsize=7, zorder=3)
    ax.set_title(f"dp {topology.dp} × pp {topology.pp} × tp {topology.tp}: rank and (i_pp, i_dp, i_tp)",
                 fontsize=10)
    ax.margins(0.15)
    ax.set_aspect("equal")
    ax.axis("off")
    if topology.world_size > 1:
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=1, frameon=False)
    return _finish(fig, path)


def plot_embedding_memory(rows: Sequence[dict[str, Any]], path: str | None = None):
    """Parameter bytes per rank, one bar per layout, tables and MLPs stacked (chapter 5.4).

    ``rows``: ``{"layout", "rank", "embeddings", "dense"}`` (bytes), one per layout and rank.
    """
    layouts = list(dict.fromkeys(r["layout"] for r in rows))
    ranks = sorted({r["rank"] for r in rows})
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(layouts)
    for i, layout in enumerate(layouts):
        mine = {r["rank"]: r for r in rows if r["layout"] == layout}
        x = [k + (i - (len(layouts) - 1) / 2) * width for k in range(len(ranks))]
        tables = [mine[r]["embeddings"] / 2**20 for r in ranks]
        ax.bar(x, tables, width, color=f"C{i}", label=layout)
        ax.bar(x, [mine[r]["dense"] / 2**20 for r in ranks], width, bottom=tables, color="0.6", hatch="//",
               label="MLPs" if i == 0 else None)
    ax.set_xticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    ax.set_ylabel("parameters (MiB)")
    ax.set_title("Parameters per rank: tables sharded, MLPs (grey) replicated")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _finish(fig, path)


_ZERO_NAMES = {"ddp": "DDP", "nanopar": "nanopar", "zero_redundancy_optimizer": "ZeroRedundancy-\nOptimizer",
               "fsdp2": "FSDP2"}


def plot_zero_bench(records: Sequence[dict[str, Any]], path: str | None = None):
    """``bench zero``: bytes held per rank, stacked parameters / gradients / optimizer state, with the
    ZeRO formula's total marked, and the median step time; one row per world size (chapter 6.5)."""
    sizes = sorted({r["world_size"] for r in records})
    fig, axes = plt.subplots(len(sizes), 2, figsize=(12, 3.8 * len(sizes)), squeeze=False)
    for (ax_m, ax_t), n in zip(axes, sizes):
        rows = [r for r in records if r["world_size"] == n]
        labels = [f"{_ZERO_NAMES.get(r['impl'], r['impl'])}\nstage {r['stage']}" for r in rows]
        bottom = [0.0] * len(rows)
        for kind, color in (("param", "C0"), ("grad", "C1"), ("optim", "C2")):
            held = [r[f"{kind}_bytes"] / 2**20 for r in rows]
            ax_m.bar(labels, held, bottom=bottom, color=color, label={"param": "parameters", "grad": "gradients",
                                                                      "optim": "optimizer state"}[kind])
            bottom = [b + h for b, h in zip(bottom, held)]
        ax_m.plot(labels, [r["predicted_bytes"] / 2**20 for r in rows], "k_", markersize=22, mew=2,
                  label="ZeRO formula")
        ax_m.set(ylabel="MiB held per rank", title=f"{n} ranks: training state per rank, {rows[0]['model']}")
        ax_m.set_ylim(top=1.3 * max(bottom))  # room for the legend above the bars
        ax_m.legend(fontsize=8, ncol=2, loc="upper right")
        ax_t.bar(labels, [r["step_s"] * 1e3 for r in rows], color="grey")
        ax_t.errorbar(labels, [r["step_s"] * 1e3 for r in rows],
                      yerr=[[(r["step_s"] - r["step_s_min"]) * 1e3 for r in rows],
                            [(r["step_s_max"] - r["step_s"]) * 1e3 for r in rows]], fmt="none", ecolor="black")
        ax_t.set(ylabel="ms per step (median, range)", title=f"{n} ranks: step time, batch {rows[0]['batch']}")
        for ax in (ax_m, ax_t):
            ax.title.set_fontsize(9)
            ax.tick_params(axis="x", labelsize=7)
    return _finish(fig, path)
