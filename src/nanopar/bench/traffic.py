"""Counting the bytes that each kind of process group moves, at the collectives (chapter 3.3).

Inside one rank, ``with count_traffic({grid.group(a): a for a in AXES}) as traffic:`` wraps
the ``torch.distributed`` functions the package calls, and adds up what each call hands over,
under the name of its process group; on exit (error or not) every function is restored.

What is counted, per call and per rank (the *payload*):

* ``all_reduce`` of a tensor of n bytes counts n on every rank of the group;
* ``all_gather``/``all_gather_single``/``all_gather_into_tensor`` count this rank's input;
* ``reduce_scatter``/``reduce_scatter_single``/``reduce_scatter_tensor`` and the all-to-alls
  count this rank's whole input;
* ``broadcast`` counts the tensor on the source rank only;
* ``send``/``isend`` (also inside ``batch_isend_irecv``) count the tensor sent; receives count
  nothing (the sender counted those bytes);
* a call in a group of one rank counts nothing: it moves nothing.

:meth:`Traffic.wire_bytes` turns payload into the bytes that leave the ranks under the ring
(chain) algorithms of chapter 2, summed over the group: an all-reduce of n bytes sends
2(N−1)/N · n from each of the N ranks; an all-gather of n bytes per rank sends (N−1) · n from
each; a reduce-scatter or all-to-all of n bytes (N−1)/N · n from each; a broadcast of n bytes
(N−1) · n in all (each rank but one receives it); a send, n.

Functions are wrapped where code looks them up at call time: in ``torch.distributed``, and in
any loaded ``nanopar`` module that keeps a reference of its own (``nanopar.comm`` picks its
all-gather once, by torch version); ``dist.P2POp`` is swapped for a subclass that keeps
torch's own ``isend``, which ``batch_isend_irecv`` insists on. PyTorch's functional
collectives (DTensor) are not counted.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import threading
from collections import defaultdict
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.distributed as dist

# name in torch.distributed -> (kind, the argument holding what this rank hands over)
_COUNTED = {
    "all_reduce": ("all_reduce", "tensor"),
    "all_gather": ("all_gather", "tensor"),
    "all_gather_single": ("all_gather", "input_tensor"),
    "all_gather_into_tensor": ("all_gather", "input_tensor"),
    "reduce_scatter": ("reduce_scatter", "input_list"),
    "reduce_scatter_single": ("reduce_scatter", "input"),
    "reduce_scatter_tensor": ("reduce_scatter", "input"),
    "all_to_all_single": ("all_to_all", "input"),
    "all_to_all": ("all_to_all", "input_tensor_list"),
    "broadcast": ("broadcast", "tensor"),
    "send": ("send", "tensor"),
    "isend": ("send", "tensor"),
}
# Bytes leaving the ranks, summed over the group, per payload byte counted on one rank (N ranks).
_WIRE_FACTOR: dict[str, Callable[[int], float]] = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: n - 1,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
    "broadcast": lambda n: n - 1,
    "send": lambda n: 1,
}
_active = threading.Lock()  # one counter at a time: a second would wrap the first one's wrappers


class Traffic:
    """Calls and payload bytes per (axis, kind of call, group size), filled by :func:`count_traffic`."""

    def __init__(self, axes: Mapping[Any, str]):
        self._axes = {_canonical(g): name for g, name in axes.items()}
        self._lock = threading.Lock()  # backward may run collectives on autograd's threads
        self.counts: dict[tuple[str, str, int], list[int]] = defaultdict(lambda: [0, 0])

    def axis_of(self, group: Any) -> str:
        """The caller's name for ``group``: ``"world"`` for the default group, ``"other"`` if unnamed."""
        group = _canonical(group)
        return self._axes.get(group, "world" if group is dist.group.WORLD else "other")

    def add(self, kind: str, group: Any, nbytes: int) -> None:
        size = dist.get_world_size(group)
        if size == 1:
            return
        with self._lock:
            entry = self.counts[(self.axis_of(group), kind, size)]
            entry[0] += 1
            entry[1] += nbytes

    def payload(self) -> dict[str, int]:
        """Payload bytes by axis (see the module docstring for what one call counts)."""
        out: dict[str, int] = defaultdict(int)
        for (axis, _, _), (_, nbytes) in self.counts.items():
            out[axis] += nbytes
        return dict(out)

    def calls(self) -> dict[str, int]:
        """Number of counted calls by axis."""
        out: dict[str, int] = defaultdict(int)
        for (axis, _, _), (n, _) in self.counts.items():
            out[axis] += n
        return dict(out)

    def wire_bytes(self) -> dict[str, float]:
        """Bytes sent on the links by axis, under ring/chain algorithms (the module docstring's factors)."""
        out: dict[str, float] = defaultdict(float)
        for (axis, kind, size), (_, nbytes) in self.counts.items():
            out[axis] += _WIRE_FACTOR[kind](size) * nbytes
        return dict(out)


def _canonical(group: Any) -> Any:
    return dist.group.WORLD if group is None else group


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return sum(_nbytes(t) for t in value)


def _is_source(args: inspect.BoundArguments) -> bool:
    group, src, group_src = args.arguments["group"], args.arguments["src"], args.arguments.get("group_src")
    if group_src is not None:
        return dist.get_rank(group) == group_src
    return dist.get_rank() == src


def _counting(name: str, original: Callable, traffic: Traffic) -> Callable:
    kind, payload = _COUNTED[name]
    signature = inspect.signature(original)

    @functools.wraps(original)
    def counted(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        if kind != "broadcast" or _is_source(bound):
            traffic.add(kind, bound.arguments["group"], _nbytes(bound.arguments[payload]))
        return original(*args, **kwargs)

    counted._uncounted = original
    return counted


def _counting_batch(original: Callable, isend: Callable, traffic: Traffic) -> Callable:
    @functools.wraps(original)
    def counted(p2p_op_list: list) -> Any:
        for op in p2p_op_list:
            if op.op is isend:
                traffic.add("send", op.group, _nbytes(op.tensor))
        return original(p2p_op_list)

    return counted


def _uncounted(fn: Callable) -> Callable:
    return getattr(fn, "_uncounted", fn)


class _P2POp(dist.P2POp):
    """``dist.P2POp`` while counting: torch accepts, and tells sends from receives, only by
    identity with its own ``isend``/``irecv``, so the op keeps torch's function, not the counting one."""

    def __new__(cls, op: Callable, *args: Any, **kwargs: Any):
        return super().__new__(cls, _uncounted(op), *args, **kwargs)

    def __init__(self, op: Callable, *args: Any, **kwargs: Any) -> None:
        super().__init__(_uncounted(op), *args, **kwargs)


@contextlib.contextmanager
def count_traffic(axes: Mapping[Any, str]) -> Iterator[Traffic]:
    """Count, on this rank, the payload bytes of every collective inside the block, by group (chapter 3.3).

    ``axes`` names process groups: ``{grid.group(a): a for a in grid.topology.order}``, say
    (``None`` is the default group; groups not named are counted as ``"world"`` or ``"other"``).
    Yields a :class:`Traffic`; every wrapped function is restored on exit, also on error.
    """
    if not _active.acquire(blocking=False):
        raise RuntimeError("count_traffic is already counting in this process: nest no second counter, "
                           "read the first one's Traffic instead")
    traffic = Traffic(axes)
    # (older torch, as on Colab, lacks some names: the package then calls the others)
    originals = {name: getattr(dist, name) for name in [*_COUNTED, "batch_isend_irecv", "P2POp"] if hasattr(dist, name)}
    wrappers = {name: _counting(name, fn, traffic) for name, fn in originals.items() if name in _COUNTED}
    wrappers["batch_isend_irecv"] = _counting_batch(originals["batch_isend_irecv"], originals["isend"], traffic)
    wrappers["P2POp"] = _P2POp
    by_identity = {id(fn): name for name, fn in originals.items()}
    holders = [dist, *(m for name, m in list(sys.modules.items()) if name.split(".")[0] == "nanopar" and m)]
    replaced = []
    try:
        for module in holders:
            for attr, value in list(vars(module).items()):
                name = by_identity.get(id(value))
                if name is not None and value is originals[name]:
                    setattr(module, attr, wrappers[name])
                    replaced.append((module, attr, value))
        yield traffic
    finally:
        for module, attr, value in replaced:
            setattr(module, attr, value)
        _active.release()
