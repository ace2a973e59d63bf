"""Tensor parallelism, Megatron-style: one layer's matrices split across the ranks of a group.

Book: chapter 3.3 (the math of the split, inside a hybrid grid) and chapter 4 (hybrid
training of the small GPT of ``nanopar.models``).

A linear layer y = x Wᵀ + b splits over the t ranks of a tensor-parallel group two ways:

* column-parallel (:class:`ColumnParallelLinear`): rank r keeps the r-th block of W's
  rows, so from the whole input x it computes the r-th block of y's features;
* row-parallel (:class:`RowParallelLinear`): rank r keeps the r-th block of W's columns,
  so from the r-th block of x's features it computes a partial y; the partial results
  are summed by an all-reduce, and the bias is added once, after the sum.

A column layer followed by a row layer (the MLP's ``fc`` then ``proj``; attention's
``qkv``, split by heads, then ``proj``) needs no communication in between: the column
layer's output block is exactly the row layer's input block. So each sub-block costs one
all-reduce forward and one backward, done by Megatron's two conjugate operators:

* f = :func:`copy_to_tp` at the sub-block's input: identity forward, all-reduce backward
  (every rank's input gradient is a partial sum of the full one);
* g = :func:`reduce_from_tp` at its output: all-reduce forward, identity backward.

(``comm.all_reduce_with_grad``, synchronised BatchNorm's sum, is g∘f: both directions reduce.)

The embeddings, LayerNorms and the output head stay replicated. With a vocabulary of a
few dozen characters they are a tiny share of the parameters and of the work. Megatron,
whose vocabularies have 50 000 tokens and more, splits them too: a vocabulary-parallel
embedding (each rank holds a range of token ids, looks up the ids in its range, zeros
elsewhere, and an all-reduce sums the rows) and a column-parallel output layer whose
logits stay split by vocabulary, with the cross-entropy computed on the shards (the max
and the sum of exponentials all-reduced), so the (B, T, V) logits are never gathered.

Replicated parameters get identical gradients on every rank of the group without any
extra communication: their inputs are the same on all ranks, and so is the gradient
reaching them, because f's backward all-reduce has summed it before it reaches the
LayerNorm below. The ranks of a group must therefore be given the same input batch.

    tp = dist.new_group([0, 1])                   # every rank calls new_group
    model = parallelize_gpt(training.seeded(functools.partial(models.gpt, config)), tp)
    loss = models.gpt_loss(model(x), y)           # x and y the same on the ranks of tp
    full_state_dict(model, tp)                    # == the unsharded model's state_dict()
"""
from __future__ import annotations

from typing import ClassVar, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .comm import all_gather_single
from .models import Block

Group = Optional[dist.ProcessGroup]  # None: the default group


def _summed(t: torch.Tensor, group: Group) -> torch.Tensor:
    out = t.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _summed(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        return _summed(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def copy_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Megatron's f (chapter 3.3): ``x`` unchanged forward; its gradient all-reduced over ``group`` backward."""
    return x if dist.get_world_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Megatron's g (chapter 3.3): ``x`` summed over ``group`` forward; the gradient passed through backward."""
    return x if dist.get_world_size(group) == 1 else _ReduceFromTP.apply(x, group)


def _my_slice(t: torch.Tensor, dim: int, group: Group, what: str) -> torch.Tensor:
    """This rank's contiguous block of ``t`` along ``dim``, as a copy."""
    rank, n = dist.get_rank(group), dist.get_world_size(group)
    if t.shape[dim] % n:
        raise ValueError(f"{what} has {t.shape[dim]} features, which do not split over {n} tensor-parallel "
                         f"ranks: use a tensor-parallel degree that divides {t.shape[dim]}, or a layer whose "
                         f"size is a multiple of {n}")
    size = t.shape[dim] // n
    return t.detach().narrow(dim, rank * size, size).clone(memory_format=torch.contiguous_format)


class _ShardedLinear(nn.Module):
    # ``shard_dims``: the dimension along which each of its parameters is split over the group.
    shard_dims: ClassVar[dict[str, int]] = {}

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: Group):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)


class ColumnParallelLinear(_ShardedLinear):
    """This rank's block of a linear layer's output features (chapter 3.3).

    Input: the whole (replicated) activation; output: this rank's block of the features.
    """

    shard_dims: ClassVar[dict[str, int]] = {"weight": 0, "bias": 0}

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: Group) -> ColumnParallelLinear:
        """The slice of ``linear`` that this rank of ``group`` keeps: rows r·out/t … (r+1)·out/t."""
        what = f"the output of Linear({linear.in_features}, {linear.out_features})"
        bias = None if linear.bias is None else _my_slice(linear.bias, 0, group, what)
        return cls(_my_slice(linear.weight, 0, group, what), bias, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp(x, self.group), self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]} of "
                f"{self.weight.shape[0] * dist.get_world_size(self.group)}, bias={self.bias is not None}")


class RowParallelLinear(_ShardedLinear):
    """This rank's block of a linear layer's input features; the partial outputs are summed (chapter 3.3).

    Input: this rank's block of the features (a column-parallel layer's output); output:
    the whole activation, on every rank. The bias is whole, and added once after the sum.
    """

    shard_dims: ClassVar[dict[str, int]] = {"weight": 1}

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: Group) -> RowParallelLinear:
        """The slice of ``linear`` that this rank of ``group`` keeps: columns r·in/t … (r+1)·in/t."""
        what = f"the input of Linear({linear.in_features}, {linear.out_features})"
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(_my_slice(linear.weight, 1, group, what), bias, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_tp(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.weight.shape[1]} of {self.weight.shape[1] * dist.get_world_size(self.group)}, "
                f"out_features={self.weight.shape[0]}, bias={self.bias is not None}")


def _check_heads(name: str, block: Block, tp: int) -> None:
    name = f"block {name}" if name else "the block"
    if not isinstance(block.attn.qkv, nn.Linear) or not isinstance(block.mlp.fc, nn.Linear):
        raise ValueError(f"{name} is already sharded: call parallelize_gpt once, on the unsharded model")
    heads = block.attn.qkv.out_features // (3 * block.attn.head_dim)
    # Whole heads per rank; then n_embd, and 4·n_embd, divide by tp too (n_embd = heads · head_dim).
    if heads % tp:
        fits = [d for d in range(1, heads + 1) if heads % d == 0]
        raise ValueError(f"tensor parallelism over {tp} ranks splits attention by heads, but {name} has "
                         f"{heads} heads: use a tensor-parallel degree in {fits}, or a GPTConfig whose n_head "
                         f"is a multiple of {tp}")


def parallelize_gpt(module: nn.Module, group: Group) -> nn.Module:
    """Shard, in place, every GPT ``Block`` in ``module`` over the ranks of ``group``; return it (chapter 3.3).

    ``module`` is a whole ``models.gpt`` or a pipeline stage of one. Attention is split by
    heads (``qkv`` column-parallel, ``proj`` row-parallel), the MLP by hidden features
    (``fc`` column, ``proj`` row); everything else stays replicated. Every rank of the
    group must hold the same weights (build under ``training.seeded``) and then keeps its
    slice, so the sharded model computes what the unsharded one did. A group of one rank
    leaves the module as it is, and so does a module without Blocks (a pipeline stage
    holding only the embedding or the head). ``n_head`` must divide by the group's size.
    """
    tp = dist.get_world_size(group)
    if tp == 1:
        return module
    blocks = [(name, m) for name, m in module.named_modules() if isinstance(m, Block)]
    for name, block in blocks:  # all checked before any is changed: no half-sharded model
        _check_heads(name, block, tp)
    for _, block in blocks:
        attn, mlp = block.attn, block.mlp
        attn.qkv = ColumnParallelLinear.from_linear(attn.qkv, group)
        attn.proj = RowParallelLinear.from_linear(attn.proj, group)
        mlp.fc = ColumnParallelLinear.from_linear(mlp.fc, group)
        mlp.proj = RowParallelLinear.from_linear(mlp.proj, group)
    return module


def _shard_dims(module: nn.Module) -> dict[str, int]:
    """Qualified parameter name -> the dimension it is split along, for the sharded parameters."""
    return {f"{prefix}.{p}" if prefix else p: dim
            for prefix, m in module.named_modules() for p, dim in getattr(m, "shard_dims", {}).items()}


def _gather(t: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """The ranks' blocks of ``t`` concatenated along ``dim``, in rank order, on every rank."""
    moved = t.detach().movedim(dim, 0).contiguous()
    out = moved.new_empty((dist.get_world_size(group) * moved.shape[0], *moved.shape[1:]))
    all_gather_single(out, moved, group)
    return out.movedim(0, dim).contiguous()


def _unsharded(named: dict[str, torch.Tensor], dims: dict[str, int], group: Group) -> dict[str, torch.Tensor]:
    return {k: _gather(t, dims[k], group) if k in dims else t.detach().clone() for k, t in named.items()}


def full_state_dict(module: nn.Module, group: Group) -> dict[str, torch.Tensor]:
    """The unsharded ``state_dict`` of a sharded ``module``, on every rank of ``group`` (chapter 3.3).

    Names and shapes are those of the module before :func:`parallelize_gpt`, so a
    tensor-parallel run compares with single-process training and its checkpoint loads
    into an unsharded model. Call on every rank of ``group`` at once.
    """
    return _unsharded(module.state_dict(), _shard_dims(module), group)


def full_grads(module: nn.Module, group: Group) -> dict[str, torch.Tensor]:
    """The unsharded gradients of a sharded ``module`` by parameter name (zeros where none) (chapter 3.3).

    Call on every rank of ``group`` at once.
    """
    grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in module.named_parameters()}
    return _unsharded(grads, _shard_dims(module), group)


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor], group: Group) -> None:
    """Load an unsharded ``state`` (a checkpoint, say) into a sharded ``module`` (chapter 3.3).

    Each rank of ``group`` copies its slice of every sharded parameter, and the replicated ones whole.
    """
    own = module.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"the state does not fit the module: missing {missing}, unexpected {unexpected}; "
                         "pass the state_dict of the same model before it was sharded")
    dims = _shard_dims(module)
    with torch.no_grad():
        for name, mine in own.items():
            piece = _my_slice(state[name], dims[name], group, name) if name in dims else state[name]
            if piece.shape != mine.shape:
                raise ValueError(f"{name}: this rank's part of the state has shape {tuple(piece.shape)}, the "
                                 f"module's parameter {tuple(mine.shape)}: the state is of another model shape")
            mine.copy_(piece)
