"""Run an importable function on N ranks and get every rank's return value back.

Book: chapter 2 ("Core concepts") introduces ranks and process groups with it; every
multi-rank notebook after that uses it.

    from nanopar.launch import run
    results = run(my_module.worker, 4, arg)      # results[r] is what rank r returned

``worker(ctx, *args, **kwargs)`` receives a :class:`RankContext` (rank, world size,
device, backend) with the default process group already initialised. The same call
works three ways:

* in a notebook or script: ``run`` spawns the ranks as processes on this machine;
* under ``torchrun`` (``torchrun --nproc-per-node 4 script.py``): ``run`` sees the
  environment torchrun set, runs the worker on this process's rank only, and returns the
  results of all ranks (gathered with ``all_gather_object``);
* with ``world_size=1``: one spawned rank, handy for clean single-thread timings.

Guarantees: a free port per run (the rendezvous store binds port 0, so there is no race
with other programs); one CPU thread per rank by default, so that speed-ups measured on a
small machine are real; every wait has a timeout; when a rank raises, the caller gets a
:class:`RankError` naming the rank and carrying its traceback; no process is left behind.
"""
from __future__ import annotations

import io
import os
import pickle
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import devices

DEFAULT_TIMEOUT_S = 300.0
_HOST = "127.0.0.1"
# torchrun sets all of these; a plain `python script.py` sets none.
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_PROGRESS_KEY = "nanopar/progress"


@dataclass(frozen=True)
class RankContext:
    """What a worker knows about itself. The default process group is initialised."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    _progress: Any = field(default=None, repr=False, compare=False)

    def tick(self, n: int = 1) -> None:
        """Advance the caller's progress bar (``run(..., progress=bar)``) by ``n``.

        Only rank 0's ticks count, so every rank may call it in the same loop.
        """
        if self._progress is not None and self.rank == 0:
            self._progress(n)


class RankError(RuntimeError):
    """A rank raised (or died). ``rank`` is the first one that failed; ``traceback`` is its own."""

    def __init__(self, rank: int, summary: str, tb: str, others: dict[int, str] | None = None):
        self.rank, self.summary, self.traceback = rank, summary, tb
        self.others = others or {}
        also = "".join(f"\n  (rank {r} then failed too: {s})" for r, s in sorted(self.others.items()))
        super().__init__(f"rank {rank} failed: {summary}{also}\n\n--- traceback from rank {rank} ---\n{tb}")


def resolve_backend(backend: str, world_size: int, gpus: int | None = None) -> str:
    """``"auto"`` → NCCL when every rank can have its own GPU, else gloo on the CPU."""
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    gpus = devices.gpu_count() if gpus is None else gpus
    if backend == "auto":
        return "nccl" if gpus >= world_size and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        if gpus < world_size:
            raise ValueError(
                f"NCCL needs one GPU per rank: {world_size} ranks asked for, {gpus} GPU(s) visible. "
                "Use backend='gloo' (CPU ranks) or at most as many ranks as GPUs."
            )
        return backend
    if backend == "gloo":
        return backend
    raise ValueError(f"unknown backend {backend!r}; choose 'auto', 'gloo' or 'nccl'")


def rank_device(backend: str, local_rank: int) -> torch.device:
    """NCCL ranks own cuda:<local_rank>; gloo ranks compute on the CPU."""
    return torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")


def under_torchrun() -> bool:
    """True when this process was started by torchrun (or another launcher setting its env)."""
    return all(v in os.environ for v in _TORCHRUN_VARS)


def run(
    fn: Callable[..., Any],
    world_size: int | None,
    *args: Any,
    backend: str = "auto",
    timeout: float = DEFAULT_TIMEOUT_S,
    threads_per_rank: int | None = 1,
    progress: Any = None,
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(ctx, *args, **kwargs)`` on ``world_size`` ranks; return ``[result of rank 0, …]``.

    ``timeout`` (seconds) bounds the whole run and every collective inside it. Under
    torchrun, ``world_size`` may be ``None`` (take torchrun's) and must otherwise match it.
    ``threads_per_rank=None`` leaves torch's thread count alone. ``progress`` is a tqdm
    bar that the ranks advance with ``ctx.tick()``. ``env`` adds environment variables
    for the spawned ranks, set before they start (for settings a process reads only at
    start, such as the allocator's; under torchrun the launcher owns the environment). Results travel back through
    ``torch.save``, so tensors arrive on the CPU. Book: chapter 2.
    """
    if under_torchrun():
        return _run_here_under_torchrun(fn, world_size, args, kwargs, backend, timeout, threads_per_rank,
                                        progress)
    if world_size is None:
        raise ValueError("world_size is required outside torchrun")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive seconds, got {timeout}")
    backend = resolve_backend(backend, world_size)
    _check_picklable(fn, args, kwargs)
    return _spawn_and_collect(fn, world_size, args, kwargs, backend, timeout, threads_per_rank, progress, env)


def _check_picklable(fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    main = sys.modules.get("__main__")
    defined_interactively = getattr(fn, "__module__", None) == "__main__" and not hasattr(main, "__file__")
    try:
        if defined_interactively:
            raise pickle.PicklingError("defined in an interactive session")
        pickle.dumps(fn)
    except Exception as e:
        name = getattr(fn, "__qualname__", repr(fn))
        raise TypeError(
            f"the worker {name!r} cannot be sent to other processes ({e}). Under 'spawn', each rank "
            "imports the worker by name, so functions defined in a notebook, lambdas and nested "
            "functions cannot be used: put it in a module (a .py file, or nanopar) and import it."
        ) from None
    try:
        pickle.dumps((args, kwargs))
    except Exception as e:
        raise TypeError(f"the worker's arguments cannot be pickled for the ranks: {e}") from None


def _spawn_and_collect(fn, world_size, args, kwargs, backend, timeout, threads, progress, env) -> list[Any]:
    ctx = mp.get_context("spawn")
    # The parent owns the rendezvous store: binding port 0 gets a free port atomically.
    store = dist.TCPStore(_HOST, 0, world_size, is_master=True, timeout=timedelta(seconds=timeout),
                          wait_for_workers=False)
    results_q = ctx.Queue()
    procs = []
    # Children read these at start (OpenMP's thread count before any torch code runs):
    # they are set while the ranks start, then the caller's environment is restored.
    child_env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}
    child_env.update(env or {})
    saved_env = {k: os.environ.get(k) for k in child_env}
    try:
        os.environ.update(child_env)
        for rank in range(world_size):
            p = ctx.Process(
                target=_child,
                args=(fn, rank, world_size, backend, store.port, timeout, threads, args, kwargs,
                      results_q, os.getpid()),
                name=f"nanopar-rank{rank}",
                daemon=True,
            )
            p.start()
            procs.append(p)
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        follow = None
        if progress is not None:
            start = progress.n
            follow = lambda: progress.update(start + store.add(_PROGRESS_KEY, 0) - progress.n)  # noqa: E731
        return _collect(procs, results_q, timeout, follow)
    finally:
        _stop(procs)
        results_q.close()
        del store


def _collect(procs, results_q, timeout: float, follow_progress: Callable[[], None] | None) -> list[Any]:
    world_size = len(procs)
    results: dict[int, Any] = {}
    errors: dict[int, tuple[float, str, str]] = {}
    deadline = time.monotonic() + timeout
    while len(results) < world_size and not errors:
        if follow_progress:
            follow_progress()
        try:
            _store(*results_q.get(timeout=0.05), results, errors)
        except queue.Empty:
            if any(p.exitcode is not None for r, p in enumerate(procs) if r not in results):
                time.sleep(0.5)  # let a message still in flight arrive before blaming the exit
                _drain(results_q, results, errors)
                _blame_silent_deaths(procs, results, errors)
            elif time.monotonic() > deadline:
                missing = sorted(set(range(world_size)) - set(results))
                raise TimeoutError(
                    f"ranks {missing} did not finish within {timeout:g} s (a hang, a deadlock in "
                    "matching send/recv, or simply too little time: pass a larger timeout=). "
                    "All ranks were stopped.")
    if errors:
        time.sleep(0.5)  # the other ranks usually fail next, as a consequence; name them briefly
        _drain(results_q, results, errors)
        _blame_silent_deaths(procs, results, errors)
        first = min(errors, key=lambda r: errors[r][0])
        _, summary, tb = errors.pop(first)
        raise RankError(first, summary, tb, {r: s for r, (_, s, _) in errors.items()})
    if follow_progress:
        follow_progress()
    return [results[r] for r in range(world_size)]


def _blame_silent_deaths(procs, results, errors) -> None:
    # A rank that died without a word (killed, segfault, os._exit) is the likely first cause:
    # the others' connection errors follow from it. Time stamp 0 sorts it first.
    for r, p in enumerate(procs):
        if p.exitcode is not None and r not in results and r not in errors:
            errors[r] = (0.0, f"process exited with code {p.exitcode} before returning",
                         "(no Python traceback: the process died, e.g. killed, crashed or out of memory)")


def _drain(results_q, results, errors) -> None:
    while True:
        try:
            _store(*results_q.get_nowait(), results, errors)
        except queue.Empty:
            return


def _store(rank, ok, payload, results, errors) -> None:
    if ok:
        results[rank] = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
    else:
        errors.setdefault(rank, payload)


def _stop(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def _child(fn, rank, world_size, backend, port, timeout, threads, args, kwargs, results_q, parent_pid):
    if threads:
        torch.set_num_threads(threads)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    try:
        device = rank_device(backend, rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        store = dist.TCPStore(_HOST, port, world_size, is_master=False, timeout=timedelta(seconds=timeout))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout),
                                **({"device_id": device} if device.type == "cuda" else {}))
        tick = lambda n: store.add(_PROGRESS_KEY, n)  # noqa: E731
        out = fn(RankContext(rank, world_size, rank, device, backend, tick), *args, **kwargs)
        buf = io.BytesIO()
        torch.save(out, buf)
        message = (rank, True, buf.getvalue())
    except BaseException as e:  # noqa: BLE001 — every failure must reach the caller
        # The time stamp lets the caller tell the first failure from its consequences.
        message = (rank, False, (time.time(), f"{type(e).__name__}: {e}", traceback.format_exc()))
    # Report before tearing down: closing connections makes the other ranks fail too.
    results_q.put(message)
    results_q.close()
    results_q.join_thread()
    if dist.is_initialized():
        dist.destroy_process_group()


def _exit_when_orphaned(parent_pid: int) -> None:
    # If the caller is killed, its ranks must not linger waiting on each other.
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(1)


def _run_here_under_torchrun(fn, world_size, args, kwargs, backend, timeout, threads, progress) -> list[Any]:
    env_world = int(os.environ["WORLD_SIZE"])
    if world_size is not None and world_size != env_world:
        raise ValueError(f"asked for {world_size} ranks but torchrun started {env_world}; "
                         "pass world_size=None to use torchrun's")
    local_rank = int(os.environ["LOCAL_RANK"])
    gpus_here = devices.gpu_count()
    if backend == "auto":
        backend = "nccl" if gpus_here > local_rank and dist.is_nccl_available() else "gloo"
    if threads:
        torch.set_num_threads(threads)
    device = rank_device(backend, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    try:
        rank = dist.get_rank()
        ctx = RankContext(rank, env_world, local_rank, device, backend,
                          progress.update if progress is not None and rank == 0 else None)
        out = fn(ctx, *args, **kwargs)
        gathered: list[Any] = [None] * env_world
        dist.all_gather_object(gathered, out)
        return gathered
    finally:
        if owns_group:
            dist.destroy_process_group()
