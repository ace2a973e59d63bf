"""Figures of chapters 1, 2 and 4.1: bandwidth, the parallelism schemes, scaling, memory, losses."""
from __future__ import annotations

from typing import Any, Sequence

import matplotlib.pyplot as plt

from ._common import _finish, _human_bytes


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
    from ..cost import gib

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
