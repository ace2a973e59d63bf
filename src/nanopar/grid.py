"""The grid of hybrid parallelism: each rank a point (dp, pp, tp), a process group along each axis (chapter 3.3).

A world of ``dp · pp · tp`` ranks is a three-dimensional grid. The ranks that differ only in
their ``tp`` coordinate form a tensor-parallel group, those that differ only in ``pp`` a
pipeline, those that differ only in ``dp`` the replicas of one shard of the model. Two steps,
kept apart as DeepSpeed's ``topology.py`` keeps them:

* :class:`Topology` is arithmetic: rank <-> coordinates, and the members of every group.
  It needs no processes and is tested for every order of the axes.
* :class:`Grid` is this rank's place in a topology, with the process groups created. It is
  an object passed to whatever parallelises a model, so two grids can live in one process;
  an axis of degree 1 is a group of one rank, where every technique does nothing.

The axis order says which coordinate varies fastest as the rank grows: the last one.
The default, ``("pp", "dp", "tp")``, is Megatron-LM's (``tp-cp-ep-dp-pp``, fastest first) and
torchtitan's (mesh ``pp, dp, …, tp``): a TP group is consecutive ranks, so on a machine of
8 GPUs it stays on NVLink, where its all-reduce inside every layer must be; pipelines, whose
messages are small and go only between neighbours, span the slower links between machines.

    topo = Topology(dp=2, pp=2, tp=2)
    topo.coords(5)          # Coords(dp=0, pp=1, tp=1)
    topo.groups("tp")       # [(0, 1), (2, 3), (4, 5), (6, 7)]
    grid = Grid(topo)       # on every rank, after torch.distributed is initialised
    grid.group("dp")        # this rank's data-parallel process group
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

AXES = ("dp", "pp", "tp")
DEFAULT_ORDER = ("pp", "dp", "tp")  # outermost first: TP innermost, as in Megatron-LM and torchtitan


class Coords(NamedTuple):
    """A rank's place on each axis of the grid."""

    dp: int
    pp: int
    tp: int


@dataclass(frozen=True)
class Topology:
    """Degrees along data, pipeline and tensor parallelism, and the axis order (chapter 3.3).

    ``order`` lists the axes from outermost (varies slowest) to innermost (varies fastest).
    """

    dp: int = 1
    pp: int = 1
    tp: int = 1
    order: tuple[str, str, str] = DEFAULT_ORDER

    def __post_init__(self) -> None:
        for axis in AXES:
            d = getattr(self, axis)
            if isinstance(d, bool) or not isinstance(d, int) or d < 1:
                raise ValueError(f"the degree of {axis} must be a positive integer, got {d!r}")
        if sorted(self.order) != sorted(AXES):
            raise ValueError(f"order must list each of {AXES} once (outermost first), got {self.order!r}")
        object.__setattr__(self, "order", tuple(self.order))

    @classmethod
    def for_world(cls, world_size: int, dp: int | None = None, pp: int = 1, tp: int = 1,
                  order: tuple[str, str, str] = DEFAULT_ORDER) -> Topology:
        """The topology of ``world_size`` ranks; ``dp`` defaults to what ``pp · tp`` leaves."""
        if dp is None:
            dp = world_size // (pp * tp) if pp * tp and world_size % (pp * tp) == 0 else 0
            if dp < 1:
                raise ValueError(f"pp × tp = {pp} × {tp} = {pp * tp} does not divide the world size "
                                 f"{world_size}: choose pp and tp whose product divides it")
        topo = cls(dp, pp, tp, order)
        topo.check_world(world_size)
        return topo

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp

    def check_world(self, world_size: int) -> None:
        """A clear error unless dp × pp × tp is ``world_size``."""
        if world_size != self.world_size:
            raise ValueError(f"dp × pp × tp = {self.dp} × {self.pp} × {self.tp} = {self.world_size} ranks, "
                             f"but the world has {world_size}: choose degrees whose product is {world_size}")

    def degree(self, axis: str) -> int:
        _check_axis(axis)
        return getattr(self, axis)

    def shape(self) -> tuple[int, int, int]:
        """The degrees in ``order``: the shape of the grid as a ``DeviceMesh`` sees it."""
        return tuple(self.degree(a) for a in self.order)

    def coords(self, rank: int) -> Coords:
        """The coordinates of ``rank``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the grid of {self.world_size} ranks (0 … {self.world_size - 1})")
        place = {}
        for axis in reversed(self.order):  # the innermost axis varies fastest
            place[axis], rank = rank % self.degree(axis), rank // self.degree(axis)
        return Coords(**place)

    def rank(self, dp: int = 0, pp: int = 0, tp: int = 0) -> int:
        """The rank at these coordinates."""
        place = {"dp": dp, "pp": pp, "tp": tp}
        rank = 0
        for axis in self.order:
            if not 0 <= place[axis] < self.degree(axis):
                raise ValueError(f"{axis} = {place[axis]} is outside 0 … {self.degree(axis) - 1}")
            rank = rank * self.degree(axis) + place[axis]
        return rank

    def group_of(self, rank: int, axis: str) -> tuple[int, ...]:
        """The ranks of ``rank``'s group along ``axis``, in the order of their coordinate on it."""
        _check_axis(axis)
        here = self.coords(rank)._asdict()
        return tuple(self.rank(**{**here, axis: i}) for i in range(self.degree(axis)))

    def groups(self, axis: str) -> list[tuple[int, ...]]:
        """Every group along ``axis``: they partition the ranks, and are listed by their first rank."""
        _check_axis(axis)
        others = [a for a in AXES if a != axis]
        starts = [self.rank(**dict(zip(others, c))) for c in
                  itertools.product(*(range(self.degree(a)) for a in others))]
        return sorted(self.group_of(r, axis) for r in starts)

    def mesh(self) -> list:
        """The ranks as a nested list shaped like :meth:`shape` (what ``DeviceMesh`` takes)."""
        flat = list(range(self.world_size))
        for size in reversed(self.shape()[1:]):
            flat = [flat[i:i + size] for i in range(0, len(flat), size)]
        return flat

    def describe(self) -> str:
        lines = [f"dp {self.dp} × pp {self.pp} × tp {self.tp} = {self.world_size} ranks "
                 f"(axes outermost first: {', '.join(self.order)})"]
        lines += [f"  {axis} groups: {' '.join(str(list(g)) for g in self.groups(axis))}" for axis in AXES]
        return "\n".join(lines)


def _check_axis(axis: str) -> None:
    if axis not in AXES:
        raise ValueError(f"unknown axis {axis!r}: the axes are {AXES}")


class Grid:
    """This rank's place in ``topology`` and its process groups along each axis (chapter 3.3).

    Construct it on every rank of the default group at once (creating a process group is a
    collective): every group of every axis is created on every rank, in the same order.
    """

    def __init__(self, topology: Topology) -> None:
        if not dist.is_initialized():
            raise RuntimeError("Grid needs torch.distributed to be initialised (nanopar.launch.run or torchrun)")
        topology.check_world(dist.get_world_size())
        self.topology = topology
        self.rank = dist.get_rank()
        self.coords = topology.coords(self.rank)
        self._groups: dict[str, dist.ProcessGroup] = {}
        for axis in AXES:
            for members in topology.groups(axis):
                group = dist.new_group(list(members))
                if self.rank in members:
                    self._groups[axis] = group

    def group(self, axis: str) -> dist.ProcessGroup:
        """This rank's process group along ``axis``."""
        _check_axis(axis)
        return self._groups[axis]

    def members(self, axis: str) -> tuple[int, ...]:
        """The global ranks of this rank's group along ``axis``."""
        return self.topology.group_of(self.rank, axis)

    def size(self, axis: str) -> int:
        return self.topology.degree(axis)

    def index(self, axis: str) -> int:
        """This rank's coordinate along ``axis``: its rank within that group."""
        _check_axis(axis)
        return getattr(self.coords, axis)

    def device_mesh(self, device_type: str = "cpu"):
        """PyTorch's ``DeviceMesh`` over the same ranks, dimensions named and ordered as the axes.

        Its groups have the same members as this grid's (tested); it creates its own.
        """
        from torch.distributed.device_mesh import DeviceMesh

        return DeviceMesh(device_type, torch.tensor(self.topology.mesh()), mesh_dim_names=self.topology.order)

    def __repr__(self) -> str:
        t = self.topology
        return f"Grid(rank {self.rank} at {tuple(self.coords)} of dp {t.dp} × pp {t.pp} × tp {t.tp})"
