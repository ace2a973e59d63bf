"""Figures of chapter 5: image sizes (5.2), uneven lengths (5.3), sharded embedding tables (5.4)."""
from __future__ import annotations

from typing import Any, Sequence

import matplotlib.pyplot as plt

from ._common import _finish


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
