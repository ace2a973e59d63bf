"""Pipeline schedules as data: which stage runs which micro-batch's forward or backward, when.

Book: chapter 3.2 (the pipeline bubble) and chapter 4.2 (GPipe and 1F1B in practice).

A schedule is a list of :class:`Op` ``(slot, stage, microbatch, kind)`` with ``kind``
``"F"`` (forward) or ``"B"`` (backward), one time slot per op, every op taking one slot.
The same list is run by ``nanopar.pipeline`` and drawn by the plotting code, so what is
drawn is what runs. Three schedules, for p ``stages`` and m ``microbatches``:

* :func:`naive`: one micro-batch at a time through every stage, forward then backward:
  only one stage ever works (the article's two-GPU split is ``naive(2, 1)``);
* :func:`gpipe`: all forwards, then all backwards (Huang et al., 2019); every stage
  holds the activations of all ``m`` micro-batches at its peak;
* :func:`one_f_one_b`: after a warm-up, each stage alternates one forward and one
  backward (PipeDream-Flush, Narayanan et al., 2021); same bubble as GPipe, but stage
  ``s`` holds at most ``p - s`` micro-batches.

    >>> ops = gpipe(2, 3)
    >>> validate(ops, 2, 3); bubble_fraction(2, 3), speedup(2, 3)
    (0.25, 1.5)
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence


class Op(NamedTuple):
    """One unit of pipeline work: in time ``slot``, ``stage`` runs ``kind`` ("F"/"B") on ``microbatch``."""

    slot: int
    stage: int
    microbatch: int
    kind: str


def _check_sizes(stages: int, microbatches: int) -> None:
    for what, n in (("stages", stages), ("micro-batches", microbatches)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"the number of {what} must be a positive integer, got {n!r}")


def _replay(orders: list[list[tuple[str, int]]], duration: Callable[[str, int, int], float],
            latency: float) -> dict[tuple[str, int, int], tuple[float, float]]:
    """Start and end of each op when every stage runs its ops in its order, each as early as it can.

    F(s, j) needs F(s-1, j) done; B(s, j) needs B(s+1, j) done (the last stage's B needs
    its own F); a result that crosses to another stage arrives ``latency`` later.
    """
    p = len(orders)
    done: dict[tuple[str, int, int], tuple[float, float]] = {}
    nxt = [0] * p
    free = [0.0] * p  # when each stage is next idle
    while any(nxt[s] < len(orders[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            if nxt[s] == len(orders[s]):
                continue
            kind, j = orders[s][nxt[s]]
            if kind == "F" and s == 0:
                ready = 0.0
            else:
                dep = ("F", s - 1, j) if kind == "F" else ("B", s + 1, j) if s < p - 1 else ("F", s, j)
                if dep not in done:
                    continue
                ready = done[dep][1] + (latency if dep[1] != s else 0.0)
            start = max(ready, free[s])
            free[s] = start + duration(kind, s, j)
            done[(kind, s, j)] = (start, free[s])
            nxt[s] += 1
            progressed = True
        if not progressed:  # an order that waits on itself: a bug in the schedule's definition
            raise ValueError(f"the stage orders deadlock: {orders}")
    return done


def _place(orders: list[list[tuple[str, int]]]) -> list[Op]:
    """Give each stage's ops (in that stage's order) the earliest slot their inputs allow.

    Only the per-stage *order* defines a schedule; the slots follow from it, assuming
    every op takes one slot and messages take no time.
    """
    times = _replay(orders, lambda *_: 1, 0)
    return sorted((Op(int(start), s, j, k) for (k, s, j), (start, _) in times.items()),
                  key=lambda o: (o.slot, o.stage))


def naive(stages: int, microbatches: int = 1) -> list[Op]:
    """One micro-batch at a time, all the way forward and back: no two stages ever overlap.

    With one micro-batch this is the article's model-parallel ResNet50 (chapter 4.2).
    """
    _check_sizes(stages, microbatches)
    ops = []
    for j in range(microbatches):
        base = 2 * stages * j
        ops += [Op(base + s, s, j, "F") for s in range(stages)]
        ops += [Op(base + stages + (stages - 1 - s), s, j, "B") for s in range(stages)]
    return sorted(ops, key=lambda o: (o.slot, o.stage))


def gpipe(stages: int, microbatches: int) -> list[Op]:
    """GPipe: every stage runs all m forwards, then all m backwards (chapter 3.2)."""
    _check_sizes(stages, microbatches)
    m = microbatches
    return _place([[("F", j) for j in range(m)] + [("B", j) for j in range(m)] for _ in range(stages)])


def one_f_one_b(stages: int, microbatches: int) -> list[Op]:
    """1F1B: stage ``s`` warms up with p − s − 1 forwards, then alternates F and B (chapter 4.2).

    A backward frees a micro-batch's activations as soon as possible, so stage ``s``
    never holds more than p − s of them, however large m is.
    """
    _check_sizes(stages, microbatches)
    p, m = stages, microbatches
    orders = []
    for s in range(p):
        warmup = min(p - s - 1, m)
        order = [("F", j) for j in range(warmup)]
        for j in range(m - warmup):  # steady state: one forward, then the oldest backward
            order += [("F", warmup + j), ("B", j)]
        order += [("B", j) for j in range(m - warmup, m)]  # cool-down
        orders.append(order)
    return _place(orders)


SCHEDULES: dict[str, Callable[[int, int], list[Op]]] = {"naive": naive, "gpipe": gpipe, "1f1b": one_f_one_b}


def make(name: str, stages: int, microbatches: int) -> list[Op]:
    """The schedule called ``name`` ("naive", "gpipe" or "1f1b") for ``stages`` and ``microbatches``."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](stages, microbatches)


def validate(schedule: Sequence[Op], stages: int, microbatches: int) -> None:
    """Raise ``ValueError`` unless ``schedule`` is a runnable pipeline schedule.

    Every (stage, micro-batch) has exactly one F and one B, F before B; a micro-batch's
    F runs on stage s before stage s+1, its B on stage s+1 before stage s; and a stage
    runs at most one op per slot.
    """
    _check_sizes(stages, microbatches)
    p, m = stages, microbatches
    at: dict[tuple[str, int, int], int] = {}
    busy: set[tuple[int, int]] = set()
    for op in schedule:
        if op.kind not in ("F", "B") or not 0 <= op.stage < p or not 0 <= op.microbatch < m or op.slot < 0:
            raise ValueError(f"{op} is out of range for {p} stages and {m} micro-batches (kind must be 'F' or 'B')")
        key = (op.kind, op.stage, op.microbatch)
        if key in at:
            raise ValueError(f"{op.kind} of micro-batch {op.microbatch} on stage {op.stage} appears twice")
        if (op.stage, op.slot) in busy:
            raise ValueError(f"stage {op.stage} has two ops in slot {op.slot}")
        at[key] = op.slot
        busy.add((op.stage, op.slot))
    for s in range(p):
        for j in range(m):
            for kind in "FB":
                if (kind, s, j) not in at:
                    raise ValueError(f"{kind} of micro-batch {j} on stage {s} is missing")
            if at["F", s, j] >= at["B", s, j]:
                raise ValueError(f"micro-batch {j} on stage {s}: its backward must come after its forward")
            if s + 1 < p and at["F", s, j] >= at["F", s + 1, j]:
                raise ValueError(f"micro-batch {j}: forward on stage {s} must come before stage {s + 1}")
            if s + 1 < p and at["B", s + 1, j] >= at["B", s, j]:
                raise ValueError(f"micro-batch {j}: backward on stage {s + 1} must come before stage {s}")


def stage_ops(schedule: Sequence[Op], stage: int) -> list[Op]:
    """The ops one stage runs, in the order it runs them (what its rank executes)."""
    return sorted((o for o in schedule if o.stage == stage), key=lambda o: o.slot)


def bubble_fraction(stages: int, microbatches: int) -> float:
    """Idle fraction of GPipe and 1F1B with equal op times: (p − 1) / (m + p − 1) (chapter 3.2)."""
    _check_sizes(stages, microbatches)
    p, m = stages, microbatches
    return (p - 1) / (m + p - 1)


def speedup(stages: int, microbatches: int) -> float:
    """GPipe's and 1F1B's speed-up over the naive split with equal op times: p·m / (m + p − 1) (chapter 3.2).

    The naive split runs the batch's forward through one stage after another, p slots of
    m micro-batches' work; the pipeline overlaps the stages, m + p − 1 slots of one
    micro-batch's work each (and the same for the backward).
    """
    _check_sizes(stages, microbatches)
    p, m = stages, microbatches
    return p * m / (m + p - 1)


def idle_fraction(schedule: Sequence[Op], stages: int) -> float:
    """Fraction of (stage × slot) cells with no op, counted on the schedule itself."""
    slots = max(o.slot for o in schedule) + 1
    return 1 - len(schedule) / (stages * slots)


def peak_in_flight(schedule: Sequence[Op], stage: int) -> int:
    """Most micro-batches whose F ran on ``stage`` but whose B has not: activations it must keep."""
    held = peak = 0
    for op in stage_ops(schedule, stage):
        held += 1 if op.kind == "F" else -1
        peak = max(peak, held)
    return peak


def timeline(schedule: Sequence[Op], stages: int, duration: Callable[[str, int, int], float],
             latency: float = 0.0) -> dict[tuple[str, int, int], tuple[float, float]]:
    """Replay ``schedule`` with real costs: ``(kind, stage, microbatch) -> (start, end)`` (chapter 4.2).

    Each stage keeps the schedule's order but starts every op as soon as its input is
    there: op times come from ``duration(kind, stage, microbatch)``, and each activation
    or gradient reaches the next stage ``latency`` after it was produced. With unit
    durations and no latency this is the schedule itself; with the durations a rank
    measured, it is what the step would have taken had messages been instant.

    >>> t = timeline(gpipe(2, 3), 2, lambda kind, s, j: 1 if kind == "F" else 2, latency=0.5)
    >>> max(end for _, end in t.values())   # 12 units of work and the bubble, plus 2 latencies
    13.0
    """
    if latency < 0:
        raise ValueError(f"a message cannot take negative time: latency={latency!r}")
    orders = [[(o.kind, o.microbatch) for o in stage_ops(schedule, s)] for s in range(stages)]
    return _replay(orders, duration, latency)


def step_time(schedule: Sequence[Op], stages: int, duration: Callable[[str, int, int], float],
              latency: float = 0.0) -> float:
    """When the last op of ``timeline(schedule, stages, duration, latency)`` ends: the step's length."""
    return max(end for _, end in timeline(schedule, stages, duration, latency).values())
