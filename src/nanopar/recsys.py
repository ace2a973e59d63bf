"""A DLRM-like click model, synthetic click data, and the runs that check its sharded tables (chapter 5.4).

The model follows DLRM (Naumov et al., 2019): dense features go through a bottom MLP to a
vector of dimension D; every sparse feature pools a bag of ids from its embedding table to
another such vector; the pairwise dot products of these T + 1 vectors, with the dense
vector, feed a top MLP that predicts the click's logit.

Training mixes the two forms of parallelism: the tables are sharded
(:mod:`nanopar.embedding_sharding`), the MLPs are data-parallel (each rank holds a copy
and averages their gradients). :func:`train_sharded` runs that on the ranks of a group,
:func:`train_unsharded` the same steps in one process on the whole global batch: their
outputs, losses, gradients and parameters must agree.

    build = functools.partial(recsys.dlrm, seed=0)      # every rank builds the same model
    data = recsys.make_click_data(256)
    reference = recsys.train_unsharded(build, data, global_batch=64)
    per_rank = launch.run(recsys.train_sharded, 2, build, data, 64, timeout=120)
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .data_parallel import NaiveDataParallel
from .embedding_sharding import (
    Bags,
    EmbeddingBags,
    ShardedEmbeddingBags,
    optimizer_state_bytes,
    parameter_bytes,
)
from .launch import RankContext
from .models import mlp


class DLRM(nn.Module):
    """Bottom MLP, embedding tables, dot-product interaction, top MLP -> one click logit per sample."""

    def __init__(self, dense_features: int, table_rows: Sequence[int], dim: int, hidden: int = 32, depth: int = 2,
                 modes: str | Sequence[str] = "sum"):
        super().__init__()
        modes = [modes] * len(table_rows) if isinstance(modes, str) else list(modes)
        self.bottom = mlp(hidden, depth, dense_features, dim)
        self.embeddings: nn.Module = EmbeddingBags([nn.EmbeddingBag(r, dim, mode=m) for r, m in zip(table_rows, modes)])
        vectors = len(table_rows) + 1
        self.top = mlp(hidden, depth, dim + vectors * (vectors - 1) // 2, 1)

    def forward(self, dense: torch.Tensor, sparse: Sequence[Bags]) -> torch.Tensor:
        x = self.bottom(dense)
        z = torch.cat([x.unsqueeze(1), self.embeddings(sparse)], 1)  # (b, T + 1, D)
        i, j = torch.tril_indices(z.shape[1], z.shape[1], offset=-1, device=z.device)
        dots = (z @ z.transpose(1, 2))[:, i, j]  # each pair once
        return self.top(torch.cat([x, dots], 1)).squeeze(1)


def dlrm(dense_features: int = 8, table_rows: Sequence[int] = (1000, 500, 200, 100), dim: int = 16,
         hidden: int = 32, depth: int = 2, modes: str | Sequence[str] = "sum", seed: int = 0) -> DLRM:
    """A small DLRM, the same on every rank for the same ``seed`` (chapter 5.4)."""
    torch.manual_seed(seed)
    return DLRM(dense_features, table_rows, dim, hidden, depth, modes)


def shard(model: DLRM, scheme: str, group=None) -> DLRM:
    """Replace ``model``'s tables by this rank's shards of them (``"table"`` or ``"row"``), in place."""
    model.embeddings = ShardedEmbeddingBags(list(model.embeddings.tables), scheme, group)
    return model


@dataclass(frozen=True)
class ClickData:
    """Samples: dense features (S, F), one bag per table per sample, and clicks (S,) in {0, 1}."""

    dense: torch.Tensor
    sparse: list[Bags]
    clicks: torch.Tensor

    def __len__(self) -> int:
        return len(self.clicks)

    def slice(self, start: int, stop: int) -> ClickData:
        """Samples ``start`` … ``stop - 1``, their bags re-based to start at offset 0."""
        bags = []
        for ids, offsets in self.sparse:
            ends = torch.cat([offsets, offsets.new_tensor([len(ids)])])
            bags.append((ids[ends[start]:ends[stop]], offsets[start:stop] - ends[start]))
        return ClickData(self.dense[start:stop], bags, self.clicks[start:stop])

    def to(self, device: torch.device) -> ClickData:
        """The same samples on ``device``."""
        return ClickData(self.dense.to(device), [(i.to(device), o.to(device)) for i, o in self.sparse],
                         self.clicks.to(device))


def make_click_data(samples: int, dense_features: int = 8, table_rows: Sequence[int] = (1000, 500, 200, 100),
                    max_bag: int = 4, skew: float = 3.0, seed: int = 0) -> ClickData:
    """Synthetic clicks with a seed (chapter 5.4).

    Bags hold 0 … ``max_bag`` ids. Ids are skewed to the low rows (``rows · u**skew`` for
    uniform u), as real ids are: a few hot items, a long tail. A click's probability is the
    sigmoid of a hidden linear score of the dense features plus a hidden score per row.
    """
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(samples, dense_features, generator=g)
    logit = dense @ (torch.randn(dense_features, generator=g) / dense_features ** 0.5)
    sparse = []
    for rows in table_rows:
        lengths = torch.randint(0, max_bag + 1, (samples,), generator=g)
        ids = (rows * torch.rand(int(lengths.sum()), generator=g) ** skew).long().clamp(max=rows - 1)
        offsets = torch.cumsum(lengths, 0) - lengths
        score = torch.randn(rows, generator=g)
        logit = logit + nn.functional.embedding_bag(ids, score.unsqueeze(1), offsets, mode="mean").squeeze(1)
        sparse.append((ids, offsets))
    clicks = torch.bernoulli(torch.sigmoid(logit), generator=g)
    return ClickData(dense, sparse, clicks)


def _step_batches(data: ClickData, global_batch: int, steps: int) -> list[ClickData]:
    if steps * global_batch > len(data):
        raise ValueError(f"{steps} steps of {global_batch} samples need {steps * global_batch} samples, "
                         f"the data has {len(data)}")
    return [data.slice(i * global_batch, (i + 1) * global_batch) for i in range(steps)]


def _record(model: DLRM, sharded: bool) -> dict[str, Any]:
    """Dense parameters and gradients by name; the tables' as {table: (first row held, those rows)}."""
    dense = {n: p for n, p in model.named_parameters() if not n.startswith("embeddings.")}
    tables = ({t: (start, shard.weight) for t, (start, _, shard) in model.embeddings.pieces().items()} if sharded
              else {t: (0, table.weight) for t, table in enumerate(model.embeddings.tables)})
    return {"dense": {n: _copy(p) for n, p in dense.items()},
            "dense_grads": {n: _copy(p.grad) for n, p in dense.items()},
            "tables": {t: (s, _copy(w)) for t, (s, w) in tables.items()},
            "table_grads": {t: (s, _copy(w.grad)) for t, (s, w) in tables.items()}}


def _copy(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone()


def train_unsharded(build: Callable[[], DLRM], data: ClickData, global_batch: int, steps: int = 3,
                    lr: float = 0.5, momentum: float = 0.0) -> dict[str, Any]:
    """The reference: ``steps`` SGD steps in one process on whole global batches (chapter 5.4)."""
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    out: dict[str, Any] = {"losses": []}
    for i, batch in enumerate(_step_batches(data, global_batch, steps)):
        opt.zero_grad()
        logits = model(batch.dense, batch.sparse)
        loss = F.binary_cross_entropy_with_logits(logits, batch.clicks)
        loss.backward()
        if i == 0:
            out.update(logits=logits.detach(), first_step=_record(model, sharded=False))
        out["losses"].append(loss.item())
        opt.step()
    out["final"] = _record(model, sharded=False)
    return out


def train_sharded(ctx: RankContext, build: Callable[[], DLRM], data: ClickData, global_batch: int,
                  steps: int = 3, lr: float = 0.5, schemes: Sequence[str] = ("table", "row"),
                  group_ranks: Sequence[int] | None = None, momentum: float = 0.0) -> dict[str, Any] | None:
    """Worker: the steps of :func:`train_unsharded` with sharded tables and data-parallel MLPs (chapter 5.4).

    Each scheme in ``schemes`` runs from the same start. ``group_ranks`` (global ranks)
    makes the group a sub-group; ranks outside it return None. Per scheme, this rank
    returns its logits, losses and records of the first step and of the end, the bytes it
    sent per phase in the first step, and its memory: parameters and optimizer state.
    """
    group = dist.new_group(list(group_ranks)) if group_ranks is not None else None
    if group_ranks is not None and ctx.rank not in group_ranks:
        return None
    me, n = dist.get_rank(group), dist.get_world_size(group)
    if global_batch % n:
        raise ValueError(f"a global batch of {global_batch} does not split over {n} ranks: use a multiple of {n}")
    local = global_batch // n
    results: dict[str, Any] = {}
    for scheme in schemes:
        model = shard(build().to(ctx.device), scheme, group)
        dense = NaiveDataParallel(nn.ModuleDict({"bottom": model.bottom, "top": model.top}), group=group)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        out: dict[str, Any] = {"losses": []}
        for i, batch in enumerate(_step_batches(data, global_batch, steps)):
            mine = batch.slice(me * local, (me + 1) * local).to(ctx.device)
            opt.zero_grad()
            logits = model(mine.dense, mine.sparse)
            loss = F.binary_cross_entropy_with_logits(logits, mine.clicks)
            loss.backward()
            dense.sync_gradients()  # the MLPs: data parallelism
            model.embeddings.average_gradients()
            if i == 0:
                out.update(logits=logits.detach(), first_step=_record(model, sharded=True),
                           sent_bytes=dict(model.embeddings.sent_bytes))
            out["losses"].append(loss.item())
            opt.step()
        out["final"] = _record(model, sharded=True)
        out["memory"] = {**parameter_memory(model), "optimizer": optimizer_state_bytes(opt)}
        results[scheme] = out
    return results


def largest_difference(per_rank: Sequence[dict[str, Any]], reference: dict[str, Any]) -> float:
    """The largest absolute difference between one scheme's ranks and :func:`train_unsharded` (chapter 5.4).

    Compares the logits (ranks' concatenated), the losses (ranks' mean), and every
    parameter and gradient after the first step and at the end, each shard against its rows.
    """
    diffs = [(torch.cat([r["logits"] for r in per_rank]) - reference["logits"]).abs().max(),
             (torch.tensor([r["losses"] for r in per_rank]).mean(0) - torch.tensor(reference["losses"])).abs().max()]
    for r in per_rank:
        for key in ("first_step", "final"):
            mine, ref = r[key], reference[key]
            diffs += [(mine[k][name] - ref[k][name]).abs().max() for k in ("dense", "dense_grads") for name in mine[k]]
            diffs += [(v - ref[k][t][1][s:s + len(v)]).abs().max()
                      for k in ("tables", "table_grads") for t, (s, v) in mine[k].items()]
    return max(float(d) for d in diffs)


def parameter_memory(model: DLRM) -> dict[str, int]:
    """Parameter bytes that this rank holds: its tables (or shards of them) and the MLPs (chapter 5.4)."""
    return {"embeddings": parameter_bytes(model.embeddings),
            "dense": parameter_bytes(model.bottom) + parameter_bytes(model.top)}


def fixed_bags(ids: torch.Tensor) -> Bags:
    """``(b, L)`` ids as EmbeddingBag's ``(ids, offsets)``: b bags of L ids each."""
    return ids.reshape(-1), torch.arange(ids.shape[0], device=ids.device) * ids.shape[1]


def rowwise_vs_dtensor(ctx: RankContext, weight: torch.Tensor, ids: torch.Tensor, lr: float = 0.5) -> dict[str, Any]:
    """Worker: one row-wise sharded table, ours beside DTensor's ``RowwiseParallel`` (chapter 5.4).

    ``ids`` (B, L) is the global batch of fixed-size bags; rank r takes its b = B/N rows.
    PyTorch's engine shards an ``nn.Embedding`` (``RowwiseParallel`` supports no
    EmbeddingBag): its (b, L, D) lookups, summed over L, are our sum-pooled bags. Both take
    the loss Σ pooled ⊙ c, one backward and one SGD step. Returns this rank's pooled
    vectors, gradient and new weights from both, the rows it holds, and how PyTorch placed
    the gradient.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

    n, weight = ctx.world_size, weight.to(ctx.device)
    mine = ids.chunk(n)[ctx.rank].to(ctx.device)
    c = torch.linspace(-1, 1, weight.shape[1], device=ctx.device)
    ours = ShardedEmbeddingBags([nn.EmbeddingBag.from_pretrained(weight.clone(), freeze=False, mode="sum")], "row")
    # Batch-sharded ids in, batch-sharded vectors out: the same data-parallel contract as ours.
    # (The default input layout, Shard(-1), would read each rank's ids as slices of one longer bag.)
    theirs = parallelize_module(nn.Embedding.from_pretrained(weight.clone(), freeze=False),
                                init_device_mesh(ctx.device.type, (n,)),
                                RowwiseParallel(input_layouts=Shard(0), output_layouts=Shard(0)))
    pooled = {"ours": ours([fixed_bags(mine)]).squeeze(1), "dtensor": theirs(mine).sum(1)}
    out: dict[str, Any] = {"pooled": {k: v.detach() for k, v in pooled.items()}}
    for name, module in (("ours", ours), ("dtensor", theirs)):
        (pooled[name] * c).sum().backward()
        torch.optim.SGD(module.parameters(), lr=lr).step()
    start, stop, piece = ours.pieces()[0]
    grad = theirs.weight.grad
    out.update(rows=(start, stop), ours_grad=piece.weight.grad.detach(), dtensor_grad=grad.full_tensor().detach(),
               ours_weight=piece.weight.detach(), dtensor_weight=theirs.weight.full_tensor().detach(),
               dtensor_grad_placement=repr(grad.placements[0]), dtensor_grad_local_rows=grad.to_local().shape[0],
               dtensor_weight_local_rows=theirs.weight.to_local().shape[0])
    return out

