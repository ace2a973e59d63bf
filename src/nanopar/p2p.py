"""Point-to-point messages between pipeline stages: send, receive, and receives posted early.

Book: chapter 2 (send/recv) and chapter 4.2 (the multi-process pipeline).

Stages are numbered by their rank in the pipeline's process group; ``comm.global_rank`` turns a
stage number into the global rank that ``send``/``recv`` address. The first activation
a stage sends carries a small header (its number of dimensions, dtype and shape), since
the next stage cannot know it in advance; the later ones have the same shape and travel
without it. Sends are non-blocking: each returns ``(tensor, work)`` pairs that must stay
referenced until the work completes (:func:`wait_all`).

gloo moves a message only once its receive is posted, so :class:`PostedReceives` lets a
stage post the receive of its next op before computing the current one: the bytes then
travel while it computes.
"""
from __future__ import annotations

from typing import Any, Hashable

import torch
import torch.distributed as dist

MAX_DIMS = 8
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32]

Pending = list[tuple[torch.Tensor, Any]]  # tensors being sent, with their work


def send(t: torch.Tensor, dst: int, group: dist.ProcessGroup | None, with_header: bool = False) -> Pending:
    """Start sending ``t`` to global rank ``dst``; with its shape first when ``with_header`` (chapter 4.2)."""
    t = t.detach().contiguous()
    pending: Pending = []
    if with_header:
        if t.dim() > MAX_DIMS or t.dtype not in DTYPES:
            raise ValueError(f"cannot send an activation of shape {tuple(t.shape)} and dtype {t.dtype} between "
                             f"stages: at most {MAX_DIMS} dimensions and one of {DTYPES}")
        head = [t.dim(), DTYPES.index(t.dtype), *t.shape] + [0] * (MAX_DIMS - t.dim())
        header = torch.tensor(head, dtype=torch.int64, device=t.device)
        pending.append((header, dist.isend(header, dst, group=group)))
    pending.append((t, dist.isend(t, dst, group=group)))
    return pending


def recv_with_header(src: int, device: torch.device, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Receive a tensor sent with ``send(..., with_header=True)`` from global rank ``src``."""
    header = torch.empty(2 + MAX_DIMS, dtype=torch.int64, device=device)
    dist.recv(header, src, group=group)
    ndim, code, *dims = header.tolist()
    buf = torch.empty(dims[:ndim], dtype=DTYPES[code], device=device)
    dist.recv(buf, src, group=group)
    return buf


def wait_all(pending: Pending) -> None:
    """Wait until every send in ``pending`` has completed."""
    for _, work in pending:
        work.wait()


def still_sending(pending: Pending) -> Pending:
    """The sends of ``pending`` not yet completed (the others release their tensors)."""
    return [(t, w) for t, w in pending if not w.is_completed()]


class PostedReceives:
    """Receives posted ahead of need, each under a key (the op it is for), taken when needed."""

    def __init__(self, group: dist.ProcessGroup | None, device: torch.device):
        self.group, self.device = group, device
        self._posted: dict[Hashable, tuple[torch.Tensor, Any]] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self._posted

    def post(self, key: Hashable, src: int, shape: torch.Size | list[int], dtype: torch.dtype) -> None:
        """Post a receive from global rank ``src`` into a new buffer of ``shape`` and ``dtype``."""
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        self._posted[key] = (buf, dist.irecv(buf, src, group=self.group))

    def take(self, key: Hashable) -> torch.Tensor:
        """Wait for the receive posted under ``key``; return its buffer."""
        buf, work = self._posted.pop(key)
        work.wait()
        return buf
