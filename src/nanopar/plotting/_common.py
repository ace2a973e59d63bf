"""What every figure shares: sizes in human units, and a figure handed back untracked."""
from __future__ import annotations

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
