"""Which rank to blame when several fail: the rule behind :class:`RankError`.

Book: chapter 2 ("Core concepts"), where ``nanopar.launch.run`` is introduced. When one
rank fails, its peers usually fail right after it: the rank waiting for it in a
collective loses the connection ("Connection closed by peer") or times out. Those
second failures are consequences; the caller wants to see the first cause.

Pure functions and records only: both ways of launching (spawned processes, torchrun)
collect :class:`Failure` records and ask :func:`blame` which one to raise.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass

import torch.distributed as dist

# How a rank failed. The order is the blame order (see `blame`).
RAISED = "raised"  # a Python exception of its own: a bug, bad input, out of memory
DIED = "died"  # the process ended without a Python exception (killed, crashed, os._exit)
LOST_PEER = "lost a peer"  # a communication error, the typical consequence of another rank failing
_BLAME_ORDER = {RAISED: 0, DIED: 1, LOST_PEER: 2}

# Phrases in the errors that gloo, NCCL and the store raise when the other side went away.
_PEER_LOST_WORDS = ("closed by peer", "reset by peer", "broken pipe", "timed out", "timeout",
                    "communicator was aborted", "remote worker")
_MAX_TRACEBACK_CHARS = 100_000  # a traceback travels through the rendezvous store under torchrun


@dataclass(frozen=True)
class Failure:
    """One rank's failure: when it happened (``time.time()``), what it was, and its kind."""

    rank: int
    time: float
    kind: str
    summary: str
    traceback: str

    @classmethod
    def from_exception(cls, rank: int, error: BaseException) -> Failure:
        """The record of an exception just caught on ``rank``, time-stamped now."""
        kind = LOST_PEER if lost_peer(error) else RAISED
        tb = "".join(traceback.format_exception(type(error), error, error.__traceback__))[-_MAX_TRACEBACK_CHARS:]
        return cls(rank, time.time(), kind, f"{type(error).__name__}: {error}", tb)


def lost_peer(error: BaseException) -> bool:
    """True for the errors a rank gets when a peer fails: connection lost, collective timed out."""
    if isinstance(error, (dist.DistError, ConnectionError, TimeoutError)):
        return True
    return isinstance(error, RuntimeError) and any(w in str(error).lower() for w in _PEER_LOST_WORDS)


def blame(failures: list[Failure]) -> Failure:
    """The failure to report first, by this rule:

    1. A rank that raised an exception of its own (not a lost connection or a timeout) is
       a cause. The earliest such exception is the first cause.
    2. Otherwise a rank that died without a Python exception (killed, crashed, ``os._exit``)
       is the cause: the communication errors of the others follow from its death. The
       earliest death seen comes first.
    3. Otherwise, when every failure is a communication error, the earliest one.

    Time stamps order failures of the same kind only: a death is noticed by whoever watches
    the process, usually after the exception that caused it was raised, so a death never
    takes the blame from an exception, whatever the clocks say.
    """
    if not failures:
        raise ValueError("blame needs at least one failure")
    return min(failures, key=lambda f: (_BLAME_ORDER[f.kind], f.time, f.rank))


class RankError(RuntimeError):
    """A rank raised (or died). ``rank`` is the one to blame (see :func:`blame`);
    ``traceback`` is its own; ``others`` maps every other failed rank to its summary."""

    def __init__(self, rank: int, summary: str, tb: str, others: dict[int, str] | None = None):
        self.rank, self.summary, self.traceback = rank, summary, tb
        self.others = others or {}
        also = "".join(f"\n  (rank {r} failed too: {s})" for r, s in sorted(self.others.items()))
        super().__init__(f"rank {rank} failed: {summary}{also}\n\n--- traceback from rank {rank} ---\n{tb}")

    @classmethod
    def from_failures(cls, failures: list[Failure]) -> RankError:
        """The error to raise for these failures, naming the rank that :func:`blame` picks."""
        first = blame(failures)
        return cls(first.rank, first.summary, first.traceback,
                   {f.rank: f.summary for f in failures if f.rank != first.rank})
