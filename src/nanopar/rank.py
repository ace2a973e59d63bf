"""What happens on one rank: join the process group, call the worker with its context.

Book: chapter 2 ("Core concepts"). Both ways that ``nanopar.launch.run`` starts ranks
(spawned processes on this machine, or torchrun) end in :func:`call_worker`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class RankContext:
    """What a worker knows about itself. The default process group is initialised."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    _progress: Any = field(default=None, repr=False, compare=False)

    def tick(self, n: int = 1) -> None:
        """Advance the caller's progress bar (``run(..., progress=bar)``) by ``n``.

        Only rank 0's ticks count, so every rank may call it in the same loop.
        """
        if self._progress is not None and self.rank == 0:
            self._progress(n)


def rank_device(backend: str, local_rank: int) -> torch.device:
    """NCCL ranks own cuda:<local_rank>; gloo ranks compute on the CPU (book: chapter 2)."""
    return torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")


def call_worker(fn: Callable[..., Any], args: tuple, kwargs: dict, *, rank: int, world_size: int,
                local_rank: int, backend: str, store: dist.Store, timeout: float,
                progress: Callable[[int], Any] | None) -> Any:
    """Initialise the default process group through ``store`` and return ``fn(ctx, *args, **kwargs)``.

    The caller destroys the group (after reporting the outcome: tearing the group down
    first would make the other ranks fail on a closed connection). Book: chapter 2.
    """
    device = rank_device(backend, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout),
                            **({"device_id": device} if device.type == "cuda" else {}))
    ctx = RankContext(rank, world_size, local_rank, device, backend, progress)
    return fn(ctx, *args, **kwargs)
