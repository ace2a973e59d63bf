"""Data parallelism from scratch: the teaching ladder of chapter 4.1 (the math: chapter 3.1).

Every rank holds the whole model and a shard of each batch. After backward, the
gradients are averaged over ranks, θ ← θ − η·(1/N)·Σᵢ gᵢ, so every replica takes the
same step. The rungs differ only in *when* and *how* that average is communicated:

1. :class:`NaiveDataParallel`: after backward, one all-reduce per parameter tensor.
2. :class:`BucketedDataParallel`: gradients are packed into buckets (25 MB by default, as
   DDP; ``nanopar.buckets``) and each bucket is all-reduced asynchronously as soon as all
   its gradients are ready, while backward is still computing the rest (autograd hooks).
3. Gradient accumulation: ``with model.no_sync(): loss.backward()`` for k−1 micro-steps,
   then a normal step: one communication for k micro-batches (DDP's ``no_sync``).

Usage, on every rank of ``group`` (inside a worker started by ``nanopar.launch.run``):

    model = BucketedDataParallel(net, group=group)  # the group's first rank's weights everywhere
    loss_fn(model(x_shard), y_shard).backward()
    model.sync_gradients()                   # p.grad is now the average over the group
    optimizer.step(); optimizer.zero_grad()

The rules of a step (the backward passes between two ``sync_gradients()`` calls), the same
for both wrappers: at most one backward outside ``no_sync()`` (the last; a second one raises),
and a parameter is *unused* when its ``.grad`` is None at ``sync_gradients()``, i.e. no
backward since ``zero_grad()`` reached it. Unused parameters are an error on every rank
at once, naming them, unless ``find_unused_parameters=True`` averages zeros for them.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from .buckets import Bucket, assign_buckets, bucket_cap_bytes
from .comm import all_gather_single, global_rank


def broadcast_parameters(module: nn.Module, group=None) -> None:
    """Copy the parameters and buffers of the group's first rank to every rank of ``group`` (chapter 4.1)."""
    src = global_rank(group, 0)
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=src, group=group)


def check_same_parameters(module: nn.Module, group=None, after_step: int | None = None) -> None:
    """Raise on every rank of ``group`` if any replica differs from the group's first rank's (chapter 4.1).

    Compares a fingerprint (float64 sum and sum of squares of every tensor), so it costs
    one small all-gather, not a copy of the model. At start-up (``after_step=None``) the
    buffers are compared too; during training only the parameters, because BatchNorm
    statistics stay per rank unless synchronised.
    """
    named = [*module.named_parameters(), *(module.named_buffers() if after_step is None else [])]
    if not named:
        return
    names, tensors = zip(*named)
    device = tensors[0].device  # NCCL gathers GPU tensors only
    mine = torch.stack([torch.stack([t.detach().double().sum(), t.detach().double().square().sum()]).to(device)
                        for t in tensors]).flatten()
    n = dist.get_world_size(group)
    every = torch.empty(n * mine.numel(), dtype=mine.dtype, device=device)
    all_gather_single(every, mine, group=group)
    every = every.view(n, -1, 2).cpu()
    for r in range(1, n):
        differs = (every[r] != every[0]).any(dim=1)
        if differs.any():
            rank, first = global_rank(group, r), global_rank(group, 0)
            where = (f"first: {names[int(differs.nonzero()[0])]!r}, "
                     f"{int(differs.sum())} of {len(names)} tensors differ")
            if after_step is None:
                raise ValueError(
                    f"rank {rank} starts from different parameters than rank {first} ({where}). Data "
                    "parallelism needs identical replicas: keep broadcast=True, or seed every rank the "
                    "same before building the model.")
            raise ValueError(
                f"after step {after_step}, rank {rank}'s replica differs from rank {first}'s ({where}): "
                "some step's gradients were not averaged over the ranks, or a rank changed its "
                "parameters alone. Call sync_gradients() after the last backward of every step, "
                "outside no_sync(), and step the optimizer on every rank.")


class _DataParallel(nn.Module):
    """What every rung shares: the replica, its group, the start-up checks, the rules of a step."""

    def __init__(self, module: nn.Module, group=None, broadcast: bool = True,
                 find_unused_parameters: bool = False):
        super().__init__()
        self.module, self.group = module, group
        self.world_size = dist.get_world_size(group)
        self.find_unused_parameters = find_unused_parameters
        self.comm_seconds = 0.0  # time the caller spent blocked on communication
        self._sync_enabled = True
        self._params = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        self._name_of = {id(p): name for name, p in self._params}
        self._ready: set[int] = set()  # parameters whose gradient arrived outside no_sync this step
        if broadcast:
            broadcast_parameters(module, group=group)
        check_same_parameters(module, group)
        for _, p in self._params:
            p.register_post_accumulate_grad_hook(self._on_grad_ready)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (no communication) inside this block."""
        self._sync_enabled = False
        try:
            yield
        finally:
            self._sync_enabled = True

    def _on_grad_ready(self, p: torch.Tensor) -> None:
        # Autograd calls this once per backward, after p.grad has been accumulated.
        if self._sync_enabled:
            self._mark_ready(p)

    def _mark_ready(self, p: torch.Tensor) -> None:
        if id(p) in self._ready:
            raise RuntimeError(
                f"parameter {self._name_of[id(p)]!r} got a second gradient in one step outside no_sync(): "
                "a step may run only one backward outside no_sync(), the last. To accumulate several "
                "backward passes, run all but the last inside `with model.no_sync():`, then call "
                "sync_gradients() once.")
        self._ready.add(id(p))

    def _check_not_in_no_sync(self) -> None:
        if not self._sync_enabled:
            raise RuntimeError("sync_gradients() inside no_sync(): call it after the last micro-step")

    def _unused(self) -> list[bool]:
        return [p.grad is None for _, p in self._params]

    def _agree_on_unused(self, unused: list[bool]) -> None:
        """Raise on every rank, naming parameters and ranks, if any rank has an unused parameter.

        Every rank calls this at the same point of its sequence of collectives. With
        ``find_unused_parameters`` there is nothing to agree on: zeros are averaged.
        """
        if self.find_unused_parameters or not self._params:
            return
        mine = torch.tensor(unused, dtype=torch.uint8, device=self._params[0][1].device)
        every = torch.empty(self.world_size * mine.numel(), dtype=mine.dtype, device=mine.device)
        all_gather_single(every, mine, group=self.group)
        rows = every.view(self.world_size, -1).cpu().tolist()
        where = [f"rank {global_rank(self.group, r)}: {names[:5]}" + (" …" if len(names) > 5 else "")
                 for r, row in enumerate(rows) if (names := [n for (n, _), m in zip(self._params, row) if m])]
        if where:
            raise RuntimeError(
                f"parameters got no gradient in this step ({'; '.join(where)}). If the model really skips them "
                "(e.g. a branch not taken), pass find_unused_parameters=True to average zeros for them, "
                "as DDP does; otherwise check that the loss uses them on every rank.")


class NaiveDataParallel(_DataParallel):
    """Rung 1: after backward, all-reduce every gradient tensor and divide by N (chapter 4.1)."""

    def sync_gradients(self) -> None:
        """Average ``p.grad`` over ranks, one blocking all-reduce per parameter."""
        self._check_not_in_no_sync()
        self._ready.clear()
        t0 = time.perf_counter()
        self._agree_on_unused(self._unused())  # before any gradient moves: every rank raises, or none
        for _, p in self._params:
            if p.grad is None:  # unused, and find_unused_parameters allows it
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=self.group)
            p.grad.div_(self.world_size)
        self.comm_seconds += time.perf_counter() - t0


class BucketedDataParallel(_DataParallel):
    """Rung 2: bucketed, overlapped gradient all-reduce, as DDP does it (chapter 4.1).

    Parameters are bucketed by dtype and device, first in reverse registration order
    (roughly the order in which backward produces their gradients), then, after the
    first step, in the order in which their gradients actually arrived (DDP rebuilds its
    buckets the same way), taken from the group's first rank so that every rank agrees.
    A bucket is launched when each of its parameters has its gradient, and buckets are
    launched strictly in order, so that every rank issues the same sequence of collectives.
    ``sync_gradients`` launches what backward did not (gradients accumulated inside
    ``no_sync``), waits, and points each ``.grad`` at its averaged slice of its bucket.
    """

    def __init__(self, module: nn.Module, bucket_cap_mb: float = 25.0, group=None, broadcast: bool = True,
                 find_unused_parameters: bool = False):
        self._cap_bytes = bucket_cap_bytes(bucket_cap_mb)
        super().__init__(module, group, broadcast, find_unused_parameters)
        self._arrival: dict[int, None] | None = {}  # first step: gradients in order of arrival
        self._build_buckets(self._params[::-1])

    def _build_buckets(self, order: list[tuple[str, nn.Parameter]]) -> None:
        groups = assign_buckets([p.numel() * p.element_size() for _, p in order], self._cap_bytes,
                                keys=[(p.dtype, p.device) for _, p in order])
        # The last bucket carries the count of unused parameters (see sync_gradients).
        flagged = len(groups) - 1 if not self.find_unused_parameters else -1
        self.buckets = [Bucket([order[i] for i in g], flag=b == flagged) for b, g in enumerate(groups)]
        self._unused_here = 0  # this rank's term of that count, for the bucket launches
        self._bucket_of = {id(p): bucket for bucket in self.buckets for p in bucket.params}
        self._launched = 0  # buckets 0 … _launched−1 are in flight

    def _on_grad_ready(self, p: torch.Tensor) -> None:
        if self._arrival is not None:
            self._arrival.setdefault(id(p))
        super()._on_grad_ready(p)

    def _mark_ready(self, p: torch.Tensor) -> None:
        super()._mark_ready(p)
        self._bucket_of[id(p)].mark_ready(p)
        self._launch_full_buckets()

    def _launch_full_buckets(self) -> None:
        # In order only: bucket b goes after buckets 0 … b−1, on every rank alike.
        while self._launched < len(self.buckets) and self.buckets[self._launched].full:
            self.buckets[self._launched].launch(self.world_size, self.group, flag=self._unused_here)
            self._launched += 1

    def sync_gradients(self) -> None:
        """Wait for every bucket's all-reduce and write the averaged gradients to ``p.grad``."""
        self._check_not_in_no_sync()
        unused = self._unused()
        # Buckets launch in order, so a last bucket launched during backward means that every
        # gradient had arrived (its flag term is 0); any bucket launched from here carries the
        # count of this rank's unused parameters. No collective of its own: the flag rides
        # along with the gradients.
        self._unused_here = sum(unused)
        for bucket in self.buckets:  # what backward did not launch: gradients from no_sync, or none
            for p in bucket.params:
                bucket.mark_ready(p)
        t0 = time.perf_counter()
        self._launch_full_buckets()
        for bucket in self.buckets:
            bucket.finish()
        self._launched, self._unused_here = 0, 0
        self._ready.clear()
        if self.buckets and not self.find_unused_parameters and self.buckets[-1].flag_sum() > 0:
            self._agree_on_unused(unused)  # some rank missed gradients: every rank names them and raises
        if self._arrival is not None:
            self._rebuild_buckets()
        self.comm_seconds += time.perf_counter() - t0

    def _rebuild_buckets(self) -> None:
        # The first rank's arrival order for all: ranks may see gradients arrive in different
        # orders, yet must launch the same all-reduces in the same order.
        index = {id(p): i for i, (_, p) in enumerate(self._params)}
        arrived = [index[i] for i in self._arrival]
        never = sorted(set(range(len(self._params))) - set(arrived), reverse=True)
        self._arrival = None
        if not self._params:
            return
        order = torch.tensor(arrived + never, device=self._params[0][1].device)
        dist.broadcast(order, src=global_rank(self.group, 0), group=self.group)
        self._build_buckets([self._params[i] for i in order.tolist()])
