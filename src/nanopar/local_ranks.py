"""Ranks as processes on this machine: start them, watch them, collect their outcomes, stop them.

Book: chapter 2 ("Core concepts"). ``nanopar.launch.run`` uses this outside torchrun.

Each rank is a fresh Python interpreter, as with multiprocessing's ``spawn``, started
with its own environment: the caller's plus the run's thread settings and ``env=``. The
environment is handed to the new process when it starts, so the caller's ``os.environ``
never changes (two runs in two threads cannot mix their settings), and settings that a
process reads only at start (``OMP_NUM_THREADS``, glibc's ``MALLOC_*``) take effect. The
rank then prepares itself as multiprocessing does (the caller's ``sys.path``, working
directory and main module, which it imports under the name ``__mp_main__``: hence the
``if __name__ == "__main__":`` guard that a script calling ``run`` needs), loads the worker
and its arguments, and joins the process group through the caller's TCPStore.

A private temporary directory carries the job to the ranks and their outcomes back
(results may be large; the store caps values at a few MB), and holds each rank's stack
file (:mod:`nanopar.rank_stacks`), read when a rank crashes or the run times out. Ranks
are ordinary (non-daemon) processes, so they may start processes of their own (a
``DataLoader`` with workers); each leads its own process group, stopped as a whole.
"""
from __future__ import annotations

import multiprocessing.spawn
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from . import rank_stacks
from .failures import DIED, RAISED, Failure, RankError
from .rank import call_worker

_HOST = "127.0.0.1"
_PROGRESS_KEY, _STARTED_KEY = "nanopar/progress", "nanopar/started"
# The command that starts a rank: find this very nanopar, then hand over to rank_main.
_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); "
         "from nanopar.local_ranks import rank_main; rank_main(sys.argv[2], int(sys.argv[3]))")
# Collectives inside spawned ranks give up this long after the run's deadline, so that the
# caller, who sees every rank, reports a hang first (with each rank's stack).
_COLLECTIVE_GRACE_S = 10.0
_FAILURE_GRACE_S = 2.0  # after a first failure, the time the other ranks get to report theirs
_POLL_S = 0.05
_importing_main = False


def importing_main() -> bool:
    """True while this process is a spawned rank importing the caller's main module (chapter 2)."""
    return _importing_main


def spawn_and_collect(fn: Callable[..., Any], world_size: int, args: tuple, kwargs: dict, *, backend: str,
                      timeout: float, threads: int | None, progress: Any, env: dict[str, str]) -> list[Any]:
    """Run ``fn`` on ``world_size`` new processes; return their results in rank order.

    Raises :class:`RankError` when a rank fails and ``TimeoutError`` (naming where each
    unfinished rank was) after ``timeout`` seconds. Every rank is stopped before it returns.
    Book: chapter 2.
    """
    # The caller owns the rendezvous store: binding port 0 gets a free port atomically.
    store = dist.TCPStore(_HOST, 0, world_size, is_master=True, timeout=timedelta(seconds=timeout),
                          wait_for_workers=False)
    with tempfile.TemporaryDirectory(prefix="nanopar-run-") as run_dir:
        _write_job(run_dir, fn, args, kwargs, world_size=world_size, backend=backend, port=store.port,
                   timeout=timeout)
        procs: list[subprocess.Popen] = []
        try:
            _start(procs, world_size, run_dir, _rank_env(threads, env))
            return _collect(procs, run_dir, timeout, store, progress)
        finally:
            _stop(procs)


def _rank_env(threads: int | None, extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.update(extra)
    return env


def _file(run_dir: str, what: str, rank: int | None = None) -> str:
    return os.path.join(run_dir, what if rank is None else f"{what}{rank}")


def _write_job(run_dir: str, fn: Callable[..., Any], args: tuple, kwargs: dict, **settings: Any) -> None:
    prepare = multiprocessing.spawn.get_preparation_data("nanopar-rank")
    prepare.pop("authkey", None)  # the caller's key for its own multiprocessing connections stays here
    with open(_file(run_dir, "job"), "wb") as f:
        # Two pickles: the first holds plain data, read before the caller's main module is
        # imported; the worker and its arguments may need that module.
        pickle.dump({"prepare": prepare, "parent_pid": os.getpid(), **settings}, f)
        pickle.dump((fn, args, kwargs), f)


def _start(procs: list[subprocess.Popen], world_size: int, run_dir: str, env: dict[str, str]) -> None:
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for rank in range(world_size):
        try:
            procs.append(subprocess.Popen([sys.executable, "-c", _BOOT, package_root, run_dir, str(rank)],
                                          env=env, stdin=subprocess.DEVNULL, start_new_session=True))
        except Exception as e:
            _stop(procs)
            raise RuntimeError(f"could not start rank {rank} of {world_size} ({type(e).__name__}: {e}); "
                               f"the {len(procs)} rank(s) already started were stopped") from e


def _collect(procs: list[subprocess.Popen], run_dir: str, timeout: float, store: dist.TCPStore,
             progress: Any) -> list[Any]:
    results: dict[int, Any] = {}
    failures: dict[int, Failure] = {}
    # The clock starts when every rank has started: a fresh interpreter importing torch takes
    # seconds, more on a busy machine. Starting up has a bound of its own, the same length.
    start_by, deadline = time.monotonic() + timeout, None
    first_failure_seen = None
    progress_at_start = progress.n if progress is not None else 0
    while True:
        if progress is not None:
            progress.update(progress_at_start + store.add(_PROGRESS_KEY, 0) - progress.n)
        if deadline is None and store.add(_STARTED_KEY, 0) == len(procs):
            deadline = time.monotonic() + timeout
        for rank, p in enumerate(procs):
            if rank in results or rank in failures:
                continue
            exited = p.poll() is not None  # looked at first: a rank writes its outcome before it exits
            outcome = _read_outcome(run_dir, rank)
            if outcome is not None:
                ok, value = outcome
                (results if ok else failures)[rank] = value
            elif exited:
                failures[rank] = _death(run_dir, rank, p.returncode)
        everyone_done = len(results) + len(failures) == len(procs)
        if failures:
            first_failure_seen = first_failure_seen or time.monotonic()
            # The others usually fail next, as a consequence: wait briefly, to name them too.
            if everyone_done or time.monotonic() - first_failure_seen > _FAILURE_GRACE_S:
                raise RankError.from_failures(list(failures.values()))
        elif everyone_done:
            return [results[r] for r in range(len(procs))]
        if time.monotonic() > (deadline or start_by):
            raise TimeoutError(_timeout_message(procs, run_dir, timeout, sorted(results),
                                                "finish" if deadline else "start"))
        time.sleep(_POLL_S)


def _read_outcome(run_dir: str, rank: int) -> tuple[bool, Any] | None:
    path = _file(run_dir, "outcome", rank)
    if not os.path.exists(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def _death(run_dir: str, rank: int, code: int) -> Failure:
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    stack = rank_stacks.main_thread_stack(_file(run_dir, "stack", rank))  # written if it crashed
    return Failure(rank, time.time(), DIED, f"process {how} before returning",
                   stack or "(no Python traceback: the process died, e.g. killed, crashed or out of memory)")


def _timeout_message(procs: list[subprocess.Popen], run_dir: str, timeout: float, finished: list[int],
                     what: str) -> str:
    waiting = [r for r in range(len(procs)) if r not in finished]
    where = rank_stacks.ask_where({r: procs[r].pid for r in waiting if procs[r].poll() is None},
                                  {r: _file(run_dir, "stack", r) for r in waiting})
    lines = [f"ranks {waiting} did not {what} within {timeout:g} s (a hang, a deadlock in matching "
             "send/recv, or simply too little time: pass a larger timeout=). All ranks were stopped."]
    if finished:
        lines.append(f"Ranks {finished} had finished.")
    lines += [f"rank {r} {where.get(r, 'had exited')}" for r in waiting]
    return "\n".join(lines)


def _stop(procs: list[subprocess.Popen]) -> None:
    running = [p for p in procs if p.poll() is None]
    for p in running:
        _signal_group(p, signal.SIGTERM)
    for p in running:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _signal_group(p, signal.SIGKILL)
            p.wait(timeout=5)


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)  # the rank and any process it started (DataLoader workers)
    except ProcessLookupError:
        pass


def rank_main(run_dir: str, rank: int) -> None:
    """A spawned rank's life: prepare, run the worker, write the outcome, exit (chapter 2; module docstring)."""
    global _importing_main
    rank_stacks.record_stacks(_file(run_dir, "stack", rank))
    try:
        with open(_file(run_dir, "job"), "rb") as f:
            job = pickle.load(f)
            threading.Thread(target=_exit_when_orphaned, args=(job["parent_pid"],), daemon=True).start()
            _importing_main = True  # until the main module is imported: see launch.run's guard check
            multiprocessing.spawn.prepare(job["prepare"])
            _importing_main = False
            fn, args, kwargs = pickle.load(f)
        store = dist.TCPStore(_HOST, job["port"], job["world_size"], is_master=False,
                              timeout=timedelta(seconds=job["timeout"]))
        store.add(_STARTED_KEY, 1)
        out = call_worker(fn, args, kwargs, rank=rank, world_size=job["world_size"], local_rank=rank,
                          backend=job["backend"], store=store, timeout=job["timeout"] + _COLLECTIVE_GRACE_S,
                          progress=lambda n: store.add(_PROGRESS_KEY, n))
        outcome: tuple[bool, Any] = (True, out)
    except BaseException as e:  # noqa: BLE001 — every failure must reach the caller
        outcome = (False, Failure.from_exception(rank, e))
    # Report before tearing down: closing connections makes the other ranks fail too.
    _write_outcome(run_dir, rank, outcome)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(0 if outcome[0] else 1)


def _write_outcome(run_dir: str, rank: int, outcome: tuple[bool, Any]) -> None:
    path = _file(run_dir, "outcome", rank)
    try:
        torch.save(outcome, path + ".tmp")
    except Exception as e:  # noqa: BLE001 — a result that cannot be pickled is the worker's failure
        torch.save((False, Failure(rank, time.time(), RAISED,
                                   f"the worker's return value cannot be sent back: {type(e).__name__}: {e}",
                                   traceback.format_exc())), path + ".tmp")
    os.replace(path + ".tmp", path)  # the caller never reads half a file


def _exit_when_orphaned(parent_pid: int) -> None:
    # If the caller is killed, its ranks must not linger waiting on each other.
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(1)
