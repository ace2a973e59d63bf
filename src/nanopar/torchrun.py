"""Running a worker under torchrun: each process is one rank, and all ranks agree on the outcome.

Book: chapter 2 ("Core concepts"); the setup page shows the torchrun commands.
``nanopar.launch.run`` comes here when torchrun started the process
(``torchrun --nproc-per-node 4 script.py``): it runs the worker on this process's rank
and returns the results of all ranks.

* Threads: torchrun sets ``OMP_NUM_THREADS=1`` for its workers when it starts more than
  one per machine (unless the variable is set already), so OpenMP starts with one thread;
  ``run`` sets torch's thread count (``threads_per_rank``) before anything else it does.
* Backend: ``"auto"`` is decided from ``LOCAL_WORLD_SIZE`` and the GPU count, which are the
  same on every rank of a machine: NCCL when each local rank has a GPU of its own.
* Failures: a rank whose worker raises writes the failure into the rendezvous store and
  does not enter another collective (its peers may be blocked in a different one, which
  would never match). Ranks that finish wait for every rank's report there, then all
  raise the same :class:`RankError`; a rank still inside the worker, perhaps waiting in a
  collective that will never complete, is stopped by a watcher thread that prints that
  error first. No rank waits for the timeout.
"""
from __future__ import annotations

import itertools
import os
import pickle
import sys
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist

from .devices import resolve_backend
from .failures import Failure, RankError
from .rank import call_worker

# torchrun sets all of these; a plain `python script.py` sets none.
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Every rank calls run() in the same order, so the n-th call has the same store keys everywhere.
_calls = itertools.count()
_REPORTED, _FAILED = "reported", "failed"
_WATCH_S = 0.2


def under_torchrun() -> bool:
    """True when torchrun (or another launcher setting its variables) started this process (chapter 2)."""
    return all(v in os.environ for v in _TORCHRUN_VARS)


def torchrun_backend(requested: str, env: Mapping[str, str], gpus: int | None = None) -> str:
    """The backend of a torchrun job, the same on every rank of a machine (book: chapter 2).

    ``"auto"`` picks NCCL when each of the ``LOCAL_WORLD_SIZE`` ranks on this machine can
    have a GPU of its own; deciding from ``LOCAL_RANK`` instead would let rank 0 of two
    ranks sharing one GPU pick NCCL and rank 1 gloo.
    """
    return resolve_backend(requested, int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])), gpus)


def run_here(fn: Callable[..., Any], world_size: int | None, args: tuple, kwargs: dict, *, backend: str,
             timeout: float, threads: int | None, progress: Any) -> list[Any]:
    """Run ``fn`` on this process's rank of the torchrun job; return every rank's result (chapter 2)."""
    if threads:
        torch.set_num_threads(threads)
    env_world = int(os.environ["WORLD_SIZE"])
    if world_size is not None and world_size != env_world:
        raise ValueError(f"asked for {world_size} ranks but torchrun started {env_world}; "
                         "pass world_size=None to use torchrun's")
    if dist.is_initialized():
        raise RuntimeError("under torchrun, run() creates the process group itself: call it before "
                           "init_process_group, or after destroy_process_group")
    backend = torchrun_backend(backend, os.environ)
    store, rank, _ = next(dist.rendezvous("env://", timeout=timedelta(seconds=timeout)))
    store.set_timeout(timedelta(seconds=timeout))
    reports = dist.PrefixStore(f"nanopar/run{next(_calls)}/", store)
    watch = _PeerWatch(reports, rank, env_world)
    try:
        failure = out = None
        try:
            # The same prefix as init_process_group's own rendezvous, inside this call's keys.
            out = call_worker(fn, args, kwargs, rank=rank, world_size=env_world,
                              local_rank=int(os.environ["LOCAL_RANK"]), backend=backend,
                              store=dist.PrefixStore("default_pg", reports), timeout=timeout,
                              progress=progress.update if progress is not None else None)
        except BaseException as e:  # noqa: BLE001 — every rank must learn of it
            failure = Failure.from_exception(rank, e)
        watch.stop()
        _report(reports, rank, failure)
        failures = _wait_for_reports(reports, env_world, timeout)
        if failures:
            raise RankError.from_failures(failures)
        gathered: list[Any] = [None] * env_world
        dist.all_gather_object(gathered, out)
        return gathered
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _report(reports: dist.Store, rank: int, failure: Failure | None) -> None:
    if failure is not None:
        reports.set(f"failure/{rank}", pickle.dumps(failure))
        reports.add(_FAILED, 1)
    reports.add(_REPORTED, 1)


def _failures(reports: dist.Store, world_size: int) -> list[Failure]:
    keys = [f"failure/{r}" for r in range(world_size)]
    return [pickle.loads(reports.get(k)) for k in keys if reports.check([k])]


def _wait_for_reports(reports: dist.Store, world_size: int, timeout: float) -> list[Failure]:
    deadline = time.monotonic() + timeout
    while (n := reports.add(_REPORTED, 0)) < world_size:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {n} of {world_size} ranks finished within {timeout:g} s "
                               "(a hang, or too little time: pass a larger timeout=)")
        time.sleep(_WATCH_S / 4)
    return _failures(reports, world_size)


class _PeerWatch:
    """While this rank runs the worker, watch for another rank's failure; on one, say so and exit."""

    def __init__(self, reports: dist.Store, rank: int, world_size: int):
        self._reports, self._rank, self._world_size = reports, rank, world_size
        self._lock = threading.Lock()
        self._active = True
        threading.Thread(target=self._watch, daemon=True).start()

    def stop(self) -> None:
        """The worker returned or raised: from now on this rank reports for itself."""
        with self._lock:
            self._active = False

    def _watch(self) -> None:
        try:
            while self._reports.add(_FAILED, 0) == 0:
                time.sleep(_WATCH_S)
                if not self._active:
                    return
            with self._lock:
                if not self._active:
                    return
                error = RankError.from_failures(_failures(self._reports, self._world_size))
                _report(self._reports, self._rank, None)  # so that the failed rank does not wait for this one
                print(f"[rank {self._rank}] stopping because {error}", file=sys.stderr, flush=True)
                os._exit(1)  # the main thread may be blocked in a collective that will never complete
        except dist.DistError:
            return  # the store went away: the job is ending anyway
