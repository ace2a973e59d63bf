"""Hardware tiers and device placement.

Every notebook and command picks its tier at run time and says which it picked
(book: "Setting up", and chapter 4.2 for stage placement):

* ``cpu``: no GPU. N ranks are N processes on gloo, one thread each.
* ``one-gpu``: one GPU (Colab). Single-process work runs on it; multi-rank demos use
  gloo ranks on the CPU.
* ``multi-gpu``: several GPUs. NCCL, one rank per GPU; k stages use cuda:0 … cuda:k-1.

:func:`resolve_backend` turns a backend request (``"auto"``, ``"gloo"``, ``"nccl"``) into
the backend that ranks use on this machine.

``gpu_count`` arguments exist so that tests (and curious readers) can ask what would
happen on another machine without owning it.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import torch

CPU, ONE_GPU, MULTI_GPU = "cpu", "one-gpu", "multi-gpu"

_TIER_WORDS = {
    CPU: "CPU only: ranks are processes on the gloo backend, one thread each",
    ONE_GPU: "one GPU: single-process work runs on cuda:0, multi-rank demos use gloo ranks on the CPU",
    MULTI_GPU: "several GPUs: NCCL, one rank per GPU",
}


def gpu_count() -> int:
    """Number of CUDA devices this process can use (0 when CUDA is unavailable)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_backend(backend: str, ranks_here: int, gpus: int | None = None) -> str:
    """``"auto"`` → NCCL when each of the ``ranks_here`` ranks on this machine can have its own
    GPU, else gloo on the CPU; ``"nccl"`` with too few GPUs is an error (book: chapter 2)."""
    if ranks_here < 1:
        raise ValueError(f"world_size must be at least 1, got {ranks_here}")
    gpus = gpu_count() if gpus is None else gpus
    if backend == "auto":
        import torch.distributed as dist

        return "nccl" if gpus >= ranks_here and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        if gpus < ranks_here:
            raise ValueError(
                f"NCCL needs one GPU per rank: {ranks_here} ranks asked for, {gpus} GPU(s) visible. "
                "Use backend='gloo' (CPU ranks) or at most as many ranks as GPUs."
            )
        return backend
    if backend == "gloo":
        return backend
    raise ValueError(f"unknown backend {backend!r}; choose 'auto', 'gloo' or 'nccl'")


def detect_tier(gpus: int | None = None) -> str:
    """The hardware tier: ``"cpu"``, ``"one-gpu"`` or ``"multi-gpu"`` (book: Setting up)."""
    gpus = gpu_count() if gpus is None else gpus
    if gpus < 0:
        raise ValueError(f"gpu count must be >= 0, got {gpus}")
    return CPU if gpus == 0 else ONE_GPU if gpus == 1 else MULTI_GPU


def cpu_cores() -> int:
    """CPU cores this process may run on (respects affinity masks and containers)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def describe(gpus: int | None = None) -> str:
    """One line naming the tier, for the first cell of every notebook."""
    real = gpu_count()
    gpus = real if gpus is None else gpus
    tier = detect_tier(gpus)
    names = ""
    if gpus and gpus == real:  # a faked count names no devices (they may not exist)
        names = " (" + ", ".join(torch.cuda.get_device_name(i) for i in range(gpus)) + ")"
    return f"tier: {tier} — {_TIER_WORDS[tier]}; {cpu_cores()} CPU cores, {gpus} GPU(s){names}"


def info() -> dict[str, object]:
    """What ``python -m nanopar info`` prints: tier, devices, versions, backends."""
    import torch.distributed as dist

    gpus = gpu_count()
    return {
        "tier": detect_tier(gpus),
        "cpu_cores": cpu_cores(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(gpus)],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "backends": {
            "gloo": dist.is_available() and dist.is_gloo_available(),
            "nccl": dist.is_available() and dist.is_nccl_available() and gpus > 0,
        },
    }


@dataclass(frozen=True)
class Placement:
    """Devices for k pipeline or model-parallel stages, and how they were chosen."""

    devices: tuple[torch.device, ...]
    note: str

    @property
    def fallback(self) -> bool:
        """True when stages share a device because there are fewer devices than stages."""
        return len(set(self.devices)) < len(self.devices)


def stage_devices(stages: int, *, gpus: int | None = None, allow_fallback: bool = True) -> Placement:
    """Devices for ``stages`` consecutive model stages (book: chapter 4.2).

    With at least ``stages`` GPUs: cuda:0, cuda:1, … as the article's two-GPU ResNet50
    uses. Otherwise, when ``allow_fallback``: every stage on cuda:0 (one GPU) or on the
    CPU, and the returned note says so. Without fallback, too few GPUs is an error.
    """
    if stages < 1:
        raise ValueError(f"need at least one stage, got {stages}")
    gpus = gpu_count() if gpus is None else gpus
    if gpus >= stages:
        devs = tuple(torch.device("cuda", i) for i in range(stages))
        return Placement(devs, f"{stages} stage(s) on {stages} GPU(s): " + ", ".join(map(str, devs)))
    if not allow_fallback:
        raise ValueError(
            f"{stages} stages need {stages} GPUs but {gpus} visible; "
            "pass allow_fallback=True to place them all on one device, or use fewer stages"
        )
    dev = torch.device("cuda", 0) if gpus >= 1 else torch.device("cpu")
    return Placement(
        (dev,) * stages,
        f"fallback: {stages} stages asked for, {gpus} GPU(s) visible, so all stages run on {dev} "
        "(results are the same; the stages just do not overlap in time)",
    )
