"""The book's figures, drawn from the records the benchmarks return.

Book: chapter 2 (bandwidth). Each function returns the matplotlib Figure; pass ``path``
to also save it (PNG or SVG, by suffix).
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
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig
