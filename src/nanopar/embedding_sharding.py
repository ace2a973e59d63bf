"""Embedding tables sharded over the ranks of a group, table-wise or row-wise (chapter 5.4).

The inputs are data-parallel: each of the N ranks holds its own b samples, and each sample
has one bag of ids per table (EmbeddingBag's ``(ids, offsets)``). The tables are not
replicated; every rank holds only its shards. One forward, as DLRM and TorchRec do it:

1. **ids to their owners.** Each rank sends every owner the ids it must look up, with the
   bags' lengths: one small all-to-all of counts (with a flag for bad input, so that every
   rank raises together and none is left waiting), then one all-to-all of lengths and ids.
2. **lookups.** Each owner pools its rows for the bags of all N ranks (B = N·b bags).
3. **pooled vectors back.** *Table-wise* (each table whole on one rank): an all-to-all
   returns to each rank its b pooled vectors of every table. *Row-wise* (each table's rows
   cut into N ranges): each owner holds a partial sum of every bag, and a reduce-scatter
   adds them and leaves each rank its b bags. The volume is the one an all-to-all would
   send, but the sum happens inside the collective, so no rank holds N partials at once;
   its backward is an all-gather. A mean is divided by the bag's length after the sum.

The backward reverses step 3 only (ids carry no gradient): the all-to-all's backward is
the all-to-all with the splits swapped. ``dist.all_to_all_single`` works on gloo.

    emb = ShardedEmbeddingBags(tables, "row", group)   # on every rank of group, same tables
    pooled = emb(sparse)                               # (b, T, D): this rank's bags
    loss.backward(); emb.average_gradients()           # owners got the sum over ranks
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from .comm import all_gather_single, global_rank, reduce_scatter_single, ring_chunks

SCHEMES = ("table", "row")
Bags = tuple[torch.Tensor, torch.Tensor]  # (ids, offsets), as nn.EmbeddingBag takes them


def place_tables(table_bytes: Sequence[int], world_size: int) -> list[int]:
    """Owner (group rank) of each table: largest first, each to the least-loaded rank (chapter 5.4).

    The greedy rule keeps the heaviest rank within one table of the average load.
    """
    load, owner = [0] * world_size, [0] * len(table_bytes)
    for t in sorted(range(len(table_bytes)), key=lambda t: -table_bytes[t]):
        owner[t] = min(range(world_size), key=lambda r: (load[r], r))
        load[owner[t]] += table_bytes[t]
    return owner


def row_ranges(rows: int, world_size: int) -> list[tuple[int, int]]:
    """(start, stop) of each rank's rows of a table sharded row-wise; sizes differ by at most one."""
    if rows < world_size:
        raise ValueError(f"a table of {rows} rows cannot be sharded row-wise over {world_size} ranks (every rank "
                         "needs a row): shard it table-wise, or use fewer ranks")
    return [(s, s + k) for s, k in ring_chunks(rows, world_size)]


class _AllToAll(torch.autograd.Function):
    # y = all-to-all(x): row block j of rank i goes to rank j. The gradient of a block goes
    # back where the block came from: the same all-to-all with the splits swapped.
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, sent):
        ctx.splits, ctx.group, ctx.sent = (out_splits, in_splits), group, sent
        y = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(y, x.contiguous(), out_splits, in_splits, group=group)
        _count(sent, "pooled", x, in_splits, group)
        return y

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        dx = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(dx, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        _count(ctx.sent, "gradients", grad, out_splits, ctx.group)
        return dx, None, None, None, None


def all_to_all_with_grad(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group=None,
                         sent: dict[str, int] | None = None) -> torch.Tensor:
    """``dist.all_to_all_single`` along dim 0 that autograd differentiates (chapter 5.4).

    ``sent``, when given, counts the bytes this rank sent to other ranks, by phase.
    """
    return _AllToAll.apply(x, output_splits, input_splits, group, sent)


class _ReduceScatter(torch.autograd.Function):
    # y_r = Σ_i x_i[block r], so ∂L/∂x_i[block r] = ∂L/∂y_r on every rank i: an all-gather.
    @staticmethod
    def forward(ctx, x, group, sent):
        ctx.group, ctx.sent, n = group, sent, dist.get_world_size(group)
        y = x.new_empty((x.shape[0] // n, *x.shape[1:]))
        reduce_scatter_single(y, x.contiguous(), group=group)
        _count(sent, "pooled", x, [y.shape[0]] * n, group)
        return y

    @staticmethod
    def backward(ctx, grad):
        n = dist.get_world_size(ctx.group)
        dx = grad.new_empty((grad.shape[0] * n, *grad.shape[1:]))
        all_gather_single(dx, grad.contiguous(), group=ctx.group)
        _count(ctx.sent, "gradients", dx, [grad.shape[0]] * n, ctx.group)
        return dx, None, None


def _count(sent: dict[str, int] | None, phase: str, x: torch.Tensor, splits: list[int], group) -> None:
    # What a direct exchange moves: every block except the one this rank keeps.
    if sent is not None:
        row = x[0].numel() * x.element_size() if x.shape[0] else 0
        sent[phase] = sent.get(phase, 0) + row * (sum(splits) - splits[dist.get_rank(group)])


class ShardedEmbeddingBags(nn.Module):
    """``tables`` sharded over ``group``, table-wise (``"table"``) or row-wise (``"row"``) (chapter 5.4).

    Every rank passes the same tables (same weights); each keeps only its shards, as
    EmbeddingBags of their own, so the parameters and their gradients are shard-sized.
    ``forward(sparse)`` takes this rank's bags of every table and returns ``(b, T, D)``,
    the pooled vectors the unsharded tables would give for these bags.
    ``sent_bytes`` counts what this rank sent to the others, by phase: ``ids``, ``pooled``
    (forward) and ``gradients`` (backward).
    """

    def __init__(self, tables: Sequence[nn.EmbeddingBag], scheme: str, group=None):
        super().__init__()
        _check_tables(tables, scheme)
        self.scheme, self.group = scheme, group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        if self.rank < 0:
            raise ValueError(f"rank {dist.get_rank()} is not in the group: build the sharded tables on its ranks only")
        self.rows = [t.num_embeddings for t in tables]
        self.means = [t.mode == "mean" for t in tables]
        self.dim, self.weight_like = tables[0].embedding_dim, tables[0].weight.detach()[:0]
        n, everything = self.world_size, list(range(len(tables)))
        if scheme == "table":
            self.owner = place_tables([t.weight.numel() * t.weight.element_size() for t in tables], n)
            self.handled = [[t for t in everything if self.owner[t] == r] for r in range(n)]
            self.ranges = [[(0, rows)] * n for rows in self.rows]
        else:
            self.handled = [everything] * n
            self.ranges = [row_ranges(rows, n) for rows in self.rows]
        # Table-wise owners pool as the table does; row-wise partial sums are divided after the sum.
        self.shards = nn.ModuleDict({str(t): nn.EmbeddingBag.from_pretrained(
            tables[t].weight.detach()[slice(*self.ranges[t][self.rank])].clone(), freeze=False,
            mode=tables[t].mode if scheme == "table" else "sum") for t in self.handled[self.rank]})
        self.sent_bytes: dict[str, int] = {}

    def pieces(self) -> dict[int, tuple[int, int, nn.EmbeddingBag]]:
        """This rank's shards: table index -> (first row, row after the last, the shard)."""
        return {int(t): (*self.ranges[int(t)][self.rank], shard) for t, shard in self.shards.items()}

    def average_gradients(self) -> None:
        """Divide the shards' gradients by N (chapter 5.4).

        An owner receives the sum over ranks of each rank's loss gradient. When each rank's
        loss is the mean over its own b samples, the model's loss is the mean of the N
        losses: this is the division that data parallelism applies to the dense
        gradients. (TorchRec leaves the sum; then the tables learn N times faster.)
        """
        for shard in self.shards.values():
            if shard.weight.grad is not None:
                shard.weight.grad.div_(self.world_size)

    def forward(self, sparse: Sequence[Bags]) -> torch.Tensor:
        problem = _sparse_problem(sparse, self.rows)
        batch = 0 if problem else len(sparse[0][1])
        chunks = self._send_ids([] if problem else self._route(sparse, batch), batch, problem)
        pooled = self._lookup(chunks, batch)  # (tables handled here, B, D)
        if self.scheme == "table":
            return self._table_wise_return(pooled, batch)
        mine = _ReduceScatter.apply(pooled.transpose(0, 1).contiguous(), self.group, self.sent_bytes)
        lengths = torch.stack([bag_lengths(ids, offsets) for ids, offsets in sparse], 1).to(mine.device)
        means = torch.tensor(self.means, device=mine.device)
        return mine / torch.where(means, lengths.clamp(min=1), 1).to(mine.dtype).unsqueeze(2)

    def _send_ids(self, messages: list[torch.Tensor], batch: int, problem: str | None) -> list[torch.Tensor]:
        """Exchange the routed ids; return what each source rank sent here. Raises on every rank at once."""
        n, here = self.world_size, len(self.handled[self.rank])
        header = torch.tensor([[batch, len(m) - len(self.handled[d]) * batch, 0] for d, m in enumerate(messages)]
                              if messages else [[0, 0, 1]] * n, dtype=torch.int64, device=self.weight_like.device)
        heard = torch.empty_like(header)
        dist.all_to_all_single(heard, header, group=self.group)  # row s: source s's [b, ids, bad input]
        self._raise_if_bad(problem, heard.tolist())
        splits, got_splits = [len(m) for m in messages], [here * b + k for b, k, _ in heard.tolist()]
        payload = torch.cat(messages)
        got = payload.new_empty(sum(got_splits))
        dist.all_to_all_single(got, payload, got_splits, splits, group=self.group)
        others = sum(splits) - splits[self.rank] + header.numel() - header.shape[1]
        self.sent_bytes["ids"] = self.sent_bytes.get("ids", 0) + others * payload.element_size()
        return list(got.split(got_splits))

    def _route(self, sparse: Sequence[Bags], batch: int) -> list[torch.Tensor]:
        """Per destination: the lengths of its tables' bags (table order), then their ids (local rows)."""
        n, device = self.world_size, self.weight_like.device
        lengths: list[list[torch.Tensor]] = [[] for _ in range(n)]
        ids: list[list[torch.Tensor]] = [[] for _ in range(n)]
        for t, (tids, offsets) in enumerate(sparse):
            tids, offsets = tids.to(device), offsets.to(device)
            if self.scheme == "table":
                d = self.owner[t]
                lengths[d].append(bag_lengths(tids, offsets))
                ids[d].append(tids)
                continue
            starts = torch.tensor([s for s, _ in self.ranges[t]], device=device)
            dest = torch.searchsorted(starts, tids, right=True) - 1
            bag = torch.repeat_interleave(torch.arange(batch, device=device), bag_lengths(tids, offsets))
            per_bag = torch.bincount(bag * n + dest, minlength=batch * n).view(batch, n)
            order = torch.argsort(dest, stable=True)  # grouped by owner, bags in order within each
            local = (tids - starts[dest])[order].split(per_bag.sum(0).tolist())
            for d in range(n):
                lengths[d].append(per_bag[:, d])
                ids[d].append(local[d])
        return [torch.cat([*lengths[d], *ids[d], torch.empty(0, dtype=torch.int64, device=device)]).to(torch.int64)
                for d in range(n)]

    def _raise_if_bad(self, problem: str | None, heard: list[list[int]]) -> None:
        if problem:
            raise ValueError(problem)
        bad = [global_rank(self.group, s) for s, (_, _, flag) in enumerate(heard) if flag]
        if bad:
            raise ValueError(f"rank(s) {bad} passed invalid sparse input to the sharded tables (see their error)")
        batches = [b for b, _, _ in heard]
        if len(set(batches)) > 1:
            ranks = [global_rank(self.group, s) for s in range(len(heard))]
            raise ValueError(f"sharded tables need the same number of bags on every rank; ranks {ranks} have "
                             f"{batches}: split the global batch evenly (nanopar.sharding.split_batch)")

    def _lookup(self, chunks: Sequence[torch.Tensor], batch: int) -> torch.Tensor:
        mine = self.handled[self.rank]
        lengths, ids = [], []
        for chunk in chunks:  # one per source rank, in rank order
            lens = chunk[: len(mine) * batch].view(len(mine), batch)
            lengths.append(lens)
            ids.append(chunk[len(mine) * batch:].split(lens.sum(1).tolist()))
        pooled = []
        for j, t in enumerate(mine):
            lens = torch.cat([ls[j] for ls in lengths])
            offsets = torch.cumsum(lens, 0) - lens
            pooled.append(self.shards[str(t)](torch.cat([i[j] for i in ids]), offsets))
        if not pooled:  # owns no table, yet its backward must join the reverse all-to-all: requires grad
            return self.weight_like.new_zeros(0, batch * self.world_size, self.dim).requires_grad_(
                torch.is_grad_enabled())
        return torch.stack(pooled)

    def _table_wise_return(self, pooled: torch.Tensor, batch: int) -> torch.Tensor:
        n, handled, k = self.world_size, self.handled, pooled.shape[0]
        # Block for source rank s: this owner's tables, s's b bags: (k, b, D) -> rows of D.
        blocks = pooled.view(k, n, batch, self.dim).transpose(0, 1).reshape(n * k * batch, self.dim)
        back = all_to_all_with_grad(blocks, [len(h) * batch for h in handled], [k * batch] * n,
                                    self.group, self.sent_bytes)
        order = [t for h in handled for t in h]  # received: by owner, then its tables
        per_table = back.view(len(order), batch, self.dim)
        return per_table[torch.tensor(order).argsort()].transpose(0, 1)


class EmbeddingBags(nn.Module):
    """The unsharded reference: ``forward(sparse)`` pools every table's bags into ``(b, T, D)`` (chapter 5.4)."""

    def __init__(self, tables: Sequence[nn.EmbeddingBag]):
        super().__init__()
        _check_tables(tables, "table")
        self.tables = nn.ModuleList(tables)

    def forward(self, sparse: Sequence[Bags]) -> torch.Tensor:
        problem = _sparse_problem(sparse, [t.num_embeddings for t in self.tables])
        if problem:
            raise ValueError(problem)
        return torch.stack([table(ids, offsets) for table, (ids, offsets) in zip(self.tables, sparse)], 1)


def bag_lengths(ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The number of ids in each bag of EmbeddingBag's ``(ids, offsets)``."""
    return offsets.diff(append=offsets.new_tensor([len(ids)]))


def _check_tables(tables: Sequence[nn.EmbeddingBag], scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if not tables:
        raise ValueError("no tables to shard")
    for t, table in enumerate(tables):
        if not isinstance(table, nn.EmbeddingBag):
            raise TypeError(f"table {t} is a {type(table).__name__}; pass nn.EmbeddingBag tables")
        if table.mode not in ("sum", "mean"):
            raise ValueError(f"table {t} pools with mode={table.mode!r}; sharded tables support 'sum' and 'mean' "
                             "(a max over row shards would need a different reduction)")
        extras = {"padding_idx": table.padding_idx, "max_norm": table.max_norm, "sparse": table.sparse or None,
                  "include_last_offset": table.include_last_offset or None}
        if any(v is not None for v in extras.values()):
            raise ValueError(f"table {t} sets {[k for k, v in extras.items() if v is not None]}: not supported "
                             "by the sharded tables; build it without them")
        if table.embedding_dim != tables[0].embedding_dim:
            raise ValueError(f"table {t} has dimension {table.embedding_dim}, table 0 has "
                             f"{tables[0].embedding_dim}: the pooled vectors interact, so all tables need one")


def _sparse_problem(sparse: Sequence[Bags], rows: Sequence[int]) -> str | None:
    """What is wrong with one rank's bags (None: nothing), checked before any id travels."""
    if len(sparse) != len(rows):
        return f"got bags for {len(sparse)} tables, the model has {len(rows)}: pass one (ids, offsets) per table"
    batch = {len(offsets) for _, offsets in sparse}
    if len(batch) > 1:
        return f"tables got different numbers of bags {sorted(batch)}: every sample needs a bag in every table"
    for t, ((ids, offsets), n) in enumerate(zip(sparse, rows)):
        if ids.dim() != 1 or offsets.dim() != 1 or ids.is_floating_point() or offsets.is_floating_point():
            return f"table {t}: ids and offsets must be 1-D integer tensors, as nn.EmbeddingBag takes them"
        if len(offsets) and (offsets[0] != 0 or (offsets.diff() < 0).any() or offsets[-1] > len(ids)):
            return f"table {t}: offsets must start at 0 and never decrease nor pass len(ids) = {len(ids)}"
        if len(ids) and (ids.min() < 0 or ids.max() >= n):
            bad = ids[(ids < 0) | (ids >= n)][0].item()
            return f"table {t} has {n} rows but got id {bad}: ids must lie in 0 … {n - 1} (hash or clip them first)"
    return None


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters, as held on this rank (chapter 5.4)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in ``optimizer``'s state (SGD with momentum: one buffer per parameter)."""
    return sum(v.numel() * v.element_size() for state in optimizer.state.values()
               for v in state.values() if torch.is_tensor(v))
