"""Figures of chapters 3.3 and 6: the hybrid grid and its benchmark, ZeRO against PyTorch's engines."""
from __future__ import annotations

from typing import Any, Sequence

import matplotlib.pyplot as plt

from ._common import _finish


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
