"""ZeRO from scratch: data parallelism that shards the training state over its ranks (chapter 6.5).

Plain data parallelism keeps the whole training state on each of the N ranks: Ψ parameters,
Ψ gradients and the optimizer's state (Adam: two moments per parameter). ZeRO (Rajbhandari et
al., 2020) keeps 1/N of it per rank, in three stages (stage 0 here is plain data parallelism on
the same buffers: an all-reduce of the gradients, every rank updating everything):

* stage 1 shards the optimizer state: the gradients are reduce-scattered, each rank updates only
  the slice of the parameters it owns, then the ranks all-gather the updated parameters (a
  reduce-scatter plus an all-gather is what a ring all-reduce does: no extra traffic);
* stage 2 also shards the gradients: each unit's gradient is reduce-scattered as soon as backward
  has produced it and then dropped, so a rank keeps only its slice of the averaged gradient;
* stage 3 also shards the parameters: a unit's parameters are all-gathered just before its
  forward and again just before its backward, and freed after each (1.5× the traffic of stage 1).

Layout. The parameters are grouped into *units*: by default the module's children that hold
parameters (a GPT's embedding, each block, its head), plus the module's own parameters if any.
Stage 3 gathers one unit at a time, so a rank holds the full parameters of about one unit
at once. Each unit's parameters are flattened in registration order into one fp32 buffer,
**padded with zeros at its end to a multiple of N elements**, so that rank r owns the contiguous
slice r·S … (r+1)·S − 1 of S = padded / N elements. The padding costs at most N − 1 elements
per unit; its gradients are zero, so Adam never moves it. The bytes held per rank follow
:func:`zero_bytes_per_rank` with Ψ rounded up unit by unit (``padded_numel``), plus Adam's
step counter (one scalar per unit).

Usage, on every rank of ``group`` (inside a worker started by ``nanopar.launch.run``):

    model = ZeroDataParallel(net, lambda params: torch.optim.Adam(params, lr=1e-3), stage=2, group=group)
    loss_fn(model(x_shard), y_shard).backward()
    model.step()        # average the gradients, update this rank's slice, share it
    model.zero_grad()

Rules: fp32 parameters on one device (the formulas cover mixed precision; the code does not).
The optimizer is built by ``optimizer_factory`` over this rank's slices (one flat parameter per
unit). An optimizer without state (plain SGD) trains exactly as with state, but stage 1 then
saves nothing (it warns so); stages 2 and 3 still do. In stage 3 every rank must use the same
parameters in every step: gathers and reductions then run in the same order on every rank.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from . import cost
from .comm import all_gather_single, reduce_scatter_single
from .data_parallel import broadcast_parameters
from .memory_model import ZERO_STAGES, check_zero_stage, memory_per_device

STAGES = ZERO_STAGES


def zero_bytes_per_rank(params: float, world_size: int, stage: int, precision: str = "fp32",
                        optimizer: str = "adam") -> dict[str, float]:
    """Bytes of parameters, gradients and optimizer state one rank holds under ZeRO (chapter 6.5).

    With Ψ = ``params``, N ranks and the bytes per parameter of :func:`nanopar.memory_model.bytes_per_param`
    (mixed precision: 2, 2 and K = 12 for Adam; fp32: 4, 4 and K = 8): stage 0 keeps
    (2 + 2 + K)Ψ, stage 1 2Ψ + 2Ψ + KΨ/N, stage 2 2Ψ + (2Ψ + KΨ)/N, stage 3 (4Ψ + KΨ)/N,
    as :func:`nanopar.memory_model.memory_per_device` computes them.
    """
    m = memory_per_device(params, precision, optimizer, zero_stage=stage, dp=world_size)
    return {"param_bytes": m["weights"], "grad_bytes": m["grads"], "optim_bytes": m["optimizer"],
            "total_bytes": m["total"]}


def zero_comm_bytes(params: float, world_size: int, stage: int, element_bytes: int = 4) -> float:
    """Bytes one rank sends per step under ring algorithms, ZeRO stage ``stage`` (chapter 6.5).

    Stages 0–2 move 2(N−1)/N · Ψ elements (an all-reduce, or a reduce-scatter and an
    all-gather of (N−1)/N · Ψ each); stage 3 gathers the parameters twice: 3(N−1)/N · Ψ.
    """
    check_zero_stage(stage)
    cost.check_positive(params=params, world_size=world_size)
    rounds = 3 if stage == 3 else 2
    return rounds * (world_size - 1) / world_size * params * element_bytes


class _Unit:
    """One unit's parameters as a flat buffer padded to a multiple of N; this rank's slice of it."""

    def __init__(self, module: nn.Module, params: list[nn.Parameter], stage: int, group):
        first = params[0]
        self.module, self.params, self.stage, self.group = module, params, stage, group
        n, rank = dist.get_world_size(group), dist.get_rank(group)
        self.numel = sum(p.numel() for p in params)
        self.padded = -(-self.numel // n) * n
        size = self.padded // n
        self.mine = slice(rank * size, (rank + 1) * size)
        self.full = torch.zeros(self.padded, dtype=first.dtype, device=first.device)
        for p, view in zip(params, self.views(self.full)):  # the parameters become views of the buffer
            view.copy_(p.detach())
            p.data = view
        if stage == 0:
            self.shard = nn.Parameter(self.full)
        elif stage < 3:
            self.shard = nn.Parameter(self.full[self.mine])  # a view: updating it updates the model
        else:
            self.shard = nn.Parameter(self.full[self.mine].clone())
            self.free()
        if stage <= 1:  # the full gradient is kept: backward accumulates into views of it
            self.grad = torch.zeros_like(self.full)
            self.shard.grad = self.grad if stage == 0 else self.grad[self.mine]
        else:
            self.shard.grad = torch.zeros_like(self.shard)
        self.zero_grad()

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter's part of a flat buffer, shaped as the parameter."""
        sizes = [p.numel() for p in self.params]
        return [v.view_as(p) for v, p in zip(flat[: self.numel].split(sizes), self.params)]

    def zero_grad(self) -> None:
        self.shard.grad.zero_()
        if self.stage <= 1:
            self.grad.zero_()
        grads = self.views(self.grad) if self.stage <= 1 else [None] * len(self.params)
        for p, grad in zip(self.params, grads):  # stages 0, 1: backward accumulates into the buffer
            p.grad = grad
        self.arrived = 0

    def gather(self) -> None:
        """Stage 3: rebuild the full parameters from every rank's slice (a no-op while they are here)."""
        storage = self.full.untyped_storage()
        if storage.nbytes() == 0:
            storage.resize_(self.padded * self.full.element_size())
            all_gather_single(self.full, self.shard.detach(), group=self.group)

    def free(self) -> None:
        """Stage 3: release the full parameters; the module's parameters keep their shapes, not their data."""
        self.full.untyped_storage().resize_(0)

    def reduce(self) -> None:
        """Average this unit's gradient over the group into the slice(s) this stage keeps."""
        n = dist.get_world_size(self.group)
        self.arrived = 0
        if self.stage <= 1:
            for p, view in zip(self.params, self.views(self.grad)):
                if p.grad is None or p.grad.data_ptr() != view.data_ptr():  # e.g. module.zero_grad() dropped it
                    view.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
                    p.grad = view
            if self.stage == 0:
                dist.all_reduce(self.grad, group=self.group)
                self.grad.div_(n)
                return
            flat = self.grad
        else:
            grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in self.params]
            flat = torch.cat([*grads, self.full.new_zeros(self.padded - self.numel)])
            for p in self.params:
                p.grad = None  # the full gradient is not kept: this is what stage 2 saves
        part = torch.empty_like(self.shard)
        reduce_scatter_single(part, flat, group=self.group)
        if self.stage == 1:
            self.shard.grad.copy_(part.div_(n))
        else:  # adds, so that several backward passes per step accumulate
            self.shard.grad.add_(part.div_(n))
        if self.stage == 3:
            self.free()

    def share(self) -> None:
        """Stages 1 and 2: every rank's updated slice to every rank."""
        all_gather_single(self.full, self.shard.detach().clone(), group=self.group)


def _group_parameters(module: nn.Module, units: list[nn.Module] | None) -> list[tuple[nn.Module, list]]:
    # Each unit takes its parameters that no earlier unit took; the module itself comes last.
    units = [m for m in module.children() if any(True for _ in m.parameters())] if units is None else units
    taken: set[int] = set()
    groups: list[tuple[nn.Module, list]] = []
    for m in [*units, module]:
        mine = [p for p in m.parameters() if p.requires_grad and id(p) not in taken]
        taken.update(id(p) for p in mine)
        if mine:
            groups.append((m, mine))
    if not groups:
        raise ValueError("the module has no parameters that require gradients: nothing to train or shard")
    kinds = {(p.dtype, p.device) for _, params in groups for p in params}
    if len(kinds) > 1 or next(iter(kinds))[0] != torch.float32:
        raise ValueError(f"ZeRO flattens fp32 parameters of one device, got {sorted(map(str, kinds))}: "
                         "convert the model with .float().to(device) first")
    return groups


class ZeroDataParallel(nn.Module):
    """Data parallelism with ZeRO stage 0–3 over ``group`` (chapter 6.5; the module docstring says how).

    ``optimizer_factory(params)`` builds the optimizer over this rank's flat slices, one per unit.
    ``units`` (default: the module's children) are the submodules whose parameters are
    flattened, reduced and, in stage 3, gathered together.
    """

    def __init__(self, module: nn.Module, optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
                 stage: int, group=None, units: list[nn.Module] | None = None):
        super().__init__()
        check_zero_stage(stage)
        self.module, self.stage, self.group = module, stage, group
        groups = _group_parameters(module, units)  # checks the input before any collective
        broadcast_parameters(module, group=group)  # every rank starts from the group's first rank's weights
        self.units = [_Unit(m, params, stage, group) for m, params in groups]
        self.optimizer = optimizer_factory([u.shard for u in self.units])
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer_factory must return a torch.optim.Optimizer over the parameters it is "
                            f"given, e.g. lambda params: torch.optim.Adam(params, lr=1e-3); got "
                            f"{type(self.optimizer).__name__}")
        self._steps, self._next = 0, 0  # _next: the first unit, in backward order, not reduced yet
        self._unit_of = {id(p): u for u in self.units for p in u.params}
        for u in self.units:
            for p in u.params if stage >= 2 else []:
                p.register_post_accumulate_grad_hook(self._on_grad)
            if stage == 3:
                u.module.register_forward_pre_hook(lambda _m, _a, u=u: u.gather())
                u.module.register_forward_hook(lambda _m, _a, _o, u=u: u.free())
                u.module.register_full_backward_pre_hook(lambda _m, _g, u=u: u.gather())

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @property
    def padded_numel(self) -> int:
        """Ψ rounded up unit by unit to a multiple of N: the elements the flat buffers hold."""
        return sum(u.padded for u in self.units)

    def _on_grad(self, p: torch.Tensor) -> None:
        self._unit_of[id(p)].arrived += 1
        self._reduce_units(only_complete=True)

    def _reduce_units(self, only_complete: bool) -> None:
        # Units are reduced in backward order (the units' reverse), never out of it, so that
        # every rank issues the same collectives in turn. Stages 2 and 3 reduce a unit as soon as
        # all its gradients exist; step() reduces the rest (units with unused parameters).
        order = self.units[::-1]
        while self._next < len(order):
            unit = order[self._next]
            if only_complete and unit.arrived < len(unit.params):
                break
            unit.reduce()
            self._next += 1
        if self._next == len(order):  # a whole backward reduced: the next one starts again
            self._next = 0

    def step(self) -> None:
        """Reduce what backward has not, update this rank's slices, share them (stages 1, 2)."""
        if self.stage <= 1 or self._next or any(u.arrived for u in self.units):
            self._reduce_units(only_complete=False)
        self.optimizer.step()
        if self.stage in (1, 2):
            for u in self.units:
                u.share()
        self._steps += 1
        if self._steps == 1 and self.stage == 1 and self.held_bytes()["optim_bytes"] == 0:
            warnings.warn(f"{type(self.optimizer).__name__} keeps no state, so ZeRO stage 1 (which shards only "
                          "the optimizer state) saves no memory over plain data parallelism; stages 2 and 3 "
                          "still shard the gradients and parameters", stacklevel=2)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients this stage keeps (``set_to_none`` is ignored: the buffers are reused)."""
        for u in self.units:
            u.zero_grad()
        self._next = 0

    def held_bytes(self) -> dict[str, int]:
        """Bytes this rank holds in parameters, gradients and optimizer state (see :func:`state_bytes`)."""
        return state_bytes([*self.module.parameters(), *(u.shard for u in self.units)], self.optimizer)

    @torch.no_grad()
    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter of the module, complete, by name (a collective in stage 3: call it on every rank)."""
        names = {id(p): name for name, p in self.module.named_parameters()}
        out = {}
        for u in self.units:
            if self.stage == 3:
                u.gather()
            out.update({names[id(p)]: p.clone() for p in u.params})
            if self.stage == 3:
                u.free()
        return out


def state_bytes(params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes held in ``params``, their gradients and ``optimizer``'s state (chapter 6.5).

    Each storage is counted once (views of one flat buffer are one buffer), by its size now:
    a freed buffer counts 0; a DTensor (FSDP2) counts its local shard.
    """
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return {"param_bytes": _storage_bytes(params),
            "grad_bytes": _storage_bytes([p.grad for p in params if p.grad is not None]),
            "optim_bytes": _storage_bytes(state)}


def _storage_bytes(tensors: list[torch.Tensor]) -> int:
    sizes = {}
    for t in tensors:
        s = (t.to_local() if isinstance(t, DTensor) else t).untyped_storage()
        if s.nbytes():  # a freed buffer holds nothing
            sizes[s.data_ptr()] = s.nbytes()
    return sum(sizes.values())
