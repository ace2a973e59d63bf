"""Collectives: the primer of chapter 2, and a ring all-reduce built from send/recv.

Book: chapter 2 ("Core concepts"), notebooks ``collectives`` and ``ring_allreduce``.

The ring all-reduce is the bandwidth-optimal algorithm that NCCL, Horovod and gloo use
for large messages (Patarasuk and Yuan, 2009). With N ranks and a message of S bytes cut
into N chunks, it runs N−1 steps of *reduce-scatter* (each rank sends one chunk to its
right neighbour and adds the chunk arriving from its left), after which rank r owns the
full sum of chunk (r+1) mod N, then N−1 steps of *all-gather* that pass the finished
chunks around. Each rank sends 2(N−1)/N · S bytes in all, whatever N is.

    # all ranks, inside a worker started by nanopar.launch.run
    ring_all_reduce(t)         # t now holds the sum over ranks, like dist.all_reduce(t)
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .launch import RankContext

# torch 2.14 renamed the tensor-in, tensor-out collectives and warns on the old names;
# Colab's older torch only has the old ones. One place decides which to call.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_single(output: torch.Tensor, input: torch.Tensor, group=None) -> None:
    """Concatenate every rank's ``input`` into ``output`` (N × input's numel), on every rank."""
    _all_gather_single(output, input, group=group)


def reduce_scatter_single(output: torch.Tensor, input: torch.Tensor, group=None) -> None:
    """Sum ``input`` over ranks and leave chunk r of the sum in rank r's ``output``."""
    _reduce_scatter_single(output, input, group=group)


class _AllReduceSum(torch.autograd.Function):
    # y = Σ_ranks x, so ∂L/∂x on each rank is Σ_ranks ∂L/∂y: the backward is an all-reduce too.
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over ranks that autograd can differentiate (synchronised BatchNorm, chapter 4.1)."""
    return _AllReduceSum.apply(x, group)


def ring_chunks(numel: int, world_size: int) -> list[tuple[int, int]]:
    """(start, length) of the N chunks the ring cuts a flat tensor into; sizes differ by ≤ 1."""
    if world_size < 1 or numel < 0:
        raise ValueError(f"need world_size >= 1 and numel >= 0, got {world_size}, {numel}")
    base, extra = divmod(numel, world_size)
    sizes = [base + (i < extra) for i in range(world_size)]
    starts = [sum(sizes[:i]) for i in range(world_size)]
    return list(zip(starts, sizes))


def ring_schedule(world_size: int) -> list[tuple[str, int, int, int]]:
    """The ring as data: ``(phase, step, send_chunk, recv_chunk)`` for rank 0.

    Rank r sends and receives the chunks of rank 0 shifted by r (mod N). Reduce-scatter
    step s: send chunk −s, add the incoming chunk −s−1; after N−1 steps rank r owns the
    finished chunk r+1. All-gather step s: send chunk 1−s, store the incoming chunk −s.
    ``ring_all_reduce`` runs exactly this list; chapter 2 prints it.
    """
    n = world_size
    reduce = [("reduce-scatter", s, (-s) % n, (-s - 1) % n) for s in range(n - 1)]
    gather = [("all-gather", s, (1 - s) % n, (-s) % n) for s in range(n - 1)]
    return reduce + gather


def ring_all_reduce(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place with a ring of send/recv; returns it.

    Works for any size, including sizes that do not divide by the world size (the
    chunks then differ by one element) and tensors smaller than the world size.
    Book: chapter 2, notebook ``ring_allreduce``.
    """
    n = dist.get_world_size(group)
    if n == 1:
        return tensor
    if not tensor.is_contiguous():
        raise ValueError("ring_all_reduce needs a contiguous tensor (call .contiguous() first)")
    r = dist.get_rank(group)
    right, left = global_rank(group, (r + 1) % n), global_rank(group, (r - 1) % n)
    flat = tensor.view(-1)
    chunks = [flat.narrow(0, s, k) for s, k in ring_chunks(flat.numel(), n)]
    inbox = _scratch(max(c.numel() for c in chunks), tensor.dtype, tensor.device)
    for phase, _, send, recv in ring_schedule(n):
        out, inc = chunks[(send + r) % n], chunks[(recv + r) % n]
        if phase == "reduce-scatter":
            _exchange(out, inbox[: inc.numel()], right, left, group)
            inc.add_(inbox[: inc.numel()])
        else:  # all-gather: the incoming chunk is final, receive it in place
            _exchange(out, inc, right, left, group)
    return tensor


_SCRATCH: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # The receive buffer is reused across calls: a fresh 32 MiB buffer per call is mapped
    # anew by the allocator and page-faults on first write, which measured 12 ms of a
    # 45 ms all-reduce of 64 MiB (chapter 2, notebook ring_allreduce).
    buf = _SCRATCH.get((dtype, device))
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def global_rank(group: dist.ProcessGroup | None, group_rank: int) -> int:
    """The global rank of the rank numbered ``group_rank`` inside ``group`` (None: the default group).

    Point-to-point calls and ``src=`` arguments take global ranks, so every technique that runs
    inside a sub-group (a DP group, a pipeline) names its peers through this (chapter 2).
    """
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def _exchange(send: torch.Tensor, recv: torch.Tensor, to: int, frm: int, group) -> None:
    # Post both at once: with blocking send then recv, every rank would wait in send.
    ops = [dist.P2POp(dist.isend, send, to, group), dist.P2POp(dist.irecv, recv, frm, group)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()


def collectives_primer(ctx: RankContext) -> dict[str, dict[str, list[float]]]:
    """Worker: run each collective on small tensors; return what this rank held before and after.

    Rank r starts with ``[r + 1] * world_size`` style tensors so that every result can be
    checked by hand. The tensors live on the rank's device (a GPU under NCCL). Book:
    chapter 2, notebook ``collectives``.
    """
    r, n, dev = ctx.rank, ctx.world_size, ctx.device
    seen: dict[str, dict[str, list[float]]] = {}

    def mine() -> torch.Tensor:  # rank r holds (r+1)·10 + i in slot i
        return torch.arange(n, dtype=torch.float32, device=dev) + 10.0 * (r + 1)

    t = mine() if r == 0 else torch.zeros(n, device=dev)
    before = t.tolist()
    dist.broadcast(t, src=0)
    seen["broadcast"] = {"before": before, "after": t.tolist()}

    t = mine()
    before = t.tolist()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    seen["all_reduce"] = {"before": before, "after": t.tolist()}

    t = torch.tensor([10.0 * (r + 1)], device=dev)
    gathered = torch.empty(n, device=dev)
    all_gather_single(gathered, t)
    seen["all_gather"] = {"before": t.tolist(), "after": gathered.tolist()}

    t = mine()
    part = torch.empty(1, device=dev)
    reduce_scatter_single(part, t)
    seen["reduce_scatter"] = {"before": t.tolist(), "after": part.tolist()}

    # send/recv: each rank passes its value to the right neighbour of a ring.
    t = torch.tensor([10.0 * (r + 1)], device=dev)
    got = torch.empty(1, device=dev)
    _exchange(t, got, (r + 1) % n, (r - 1) % n, None)
    seen["send_recv"] = {"before": t.tolist(), "after": got.tolist()}
    return seen


def ring_vs_all_reduce(ctx: RankContext, numel: int, dtype: str = "float32", seed: int = 0) -> dict[str, Any]:
    """Worker: reduce the same random tensor with our ring and with ``dist.all_reduce``.

    Returns both results so that the caller can compare them (chapter 2 and tests).
    """
    g = torch.Generator().manual_seed(seed + ctx.rank)
    kind = getattr(torch, dtype)
    scale = 1.0 if kind.is_floating_point else 1000.0  # integers: few zeros, so a lost element shows
    x = (scale * torch.randn(numel, generator=g)).to(kind)
    ours, theirs = (x.to(ctx.device, copy=True) for _ in range(2))  # copies, on a GPU under NCCL
    ring_all_reduce(ours)
    dist.all_reduce(theirs)
    return {"ring": ours.cpu(), "all_reduce": theirs.cpu(), "input": x}


def primer_table(seen: list[dict[str, dict[str, list[float]]]]) -> str:
    """Text table of what each rank held before and after each collective (chapter 2)."""
    fmt = lambda xs: "[" + ", ".join(f"{x:g}" for x in xs) + "]"  # noqa: E731
    lines = []
    for op in seen[0]:
        lines.append(f"{op}")
        for r, s in enumerate(seen):
            lines.append(f"  rank {r}: {fmt(s[op]['before']):<22} -> {fmt(s[op]['after'])}")
    return "\n".join(lines)
