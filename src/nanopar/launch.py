"""Run an importable function on N ranks and get every rank's return value back.

Book: chapter 2 ("Core concepts") introduces ranks and process groups with it; every
multi-rank notebook after that uses it.

    from nanopar.launch import run
    results = run(my_module.worker, 4, arg)      # results[r] is what rank r returned

``worker(ctx, *args, **kwargs)`` receives a :class:`RankContext` (rank, world size,
device, backend) with the default process group already initialised. Its keyword
arguments go through ``kwargs={...}``, apart from ``run``'s own options. The same call
works three ways:

* in a notebook or script: ``run`` starts the ranks as processes on this machine
  (:mod:`nanopar.local_ranks`). Each rank imports the caller's main module, as
  multiprocessing's ``spawn`` does, so a script must call ``run`` under
  ``if __name__ == "__main__":`` (a notebook needs nothing);
* under ``torchrun`` (``torchrun --nproc-per-node 4 script.py``): ``run`` sees the
  environment torchrun set, runs the worker on this process's rank only, and returns the
  results of all ranks (:mod:`nanopar.torchrun`);
* with ``world_size=1``: one spawned rank, handy for clean single-thread timings.

Guarantees: a free port per run (the rendezvous store binds port 0, so there is no race
with other programs); one CPU thread per rank by default, set when the rank's process
starts, so that speed-ups measured on a small machine are real; the caller's environment
is never modified; every wait has a timeout, and a timeout says where each unfinished
rank was; when a rank raises, the caller gets a :class:`RankError` naming the rank that
caused the failure (:mod:`nanopar.failures`) and carrying its traceback; no process is
left behind.
"""
from __future__ import annotations

import numbers
import pickle
import sys
from typing import Any, Callable

from . import local_ranks, torchrun
from .devices import resolve_backend
from .failures import RankError
from .rank import RankContext, rank_device
from .torchrun import under_torchrun

__all__ = ["run", "RankContext", "RankError", "resolve_backend", "rank_device", "under_torchrun",
           "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 300.0
_GUARD = 'if __name__ == "__main__":'


def run(
    fn: Callable[..., Any],
    world_size: int | None,
    *args: Any,
    kwargs: dict[str, Any] | None = None,
    backend: str = "auto",
    timeout: float = DEFAULT_TIMEOUT_S,
    threads_per_rank: int | None = 1,
    progress: Any = None,
    env: dict[str, str] | None = None,
    **misplaced: Any,
) -> list[Any]:
    """Run ``fn(ctx, *args, **kwargs)`` on ``world_size`` ranks; return ``[result of rank 0, …]``.

    ``kwargs`` holds the worker's keyword arguments, kept apart from ``run``'s own
    (a worker may have a ``timeout`` of its own). ``timeout`` (seconds) bounds the run,
    counted from the moment every rank has started, and every collective inside it; the
    start-up of the ranks has a bound of the same length. Under torchrun, ``world_size`` may be ``None``
    (take torchrun's) and must otherwise match it. ``threads_per_rank=None`` leaves the
    thread count alone. ``progress`` is a tqdm bar that the ranks advance with
    ``ctx.tick()``. ``env`` adds environment variables for the spawned ranks, in place when
    their processes start (for settings read only at start, such as the allocator's; under
    torchrun the launcher owns the environment). Results travel back through
    ``torch.save``, so tensors arrive on the CPU. Book: chapter 2.
    """
    if misplaced:
        names = sorted(misplaced)
        raise TypeError(f"run() got unexpected keyword argument(s) {', '.join(names)}: pass the worker's "
                        f"keyword arguments as kwargs={{{', '.join(f'{n!r}: ...' for n in names)}}}")
    if local_ranks.importing_main():
        raise RuntimeError(
            "this script calls nanopar.launch.run() when it is imported, and each rank imports the script "
            f"again (as multiprocessing's spawn does): put the call under `{_GUARD}`")
    kwargs = {} if kwargs is None else kwargs
    _check_types(world_size, kwargs, backend, timeout, threads_per_rank, env)
    if under_torchrun():
        return torchrun.run_here(fn, world_size, args, kwargs, backend=backend, timeout=timeout,
                                 threads=threads_per_rank, progress=progress)
    if world_size is None:
        raise ValueError("world_size is required outside torchrun")
    backend = resolve_backend(backend, world_size)
    _check_picklable(fn, args, kwargs)
    return local_ranks.spawn_and_collect(fn, world_size, args, kwargs, backend=backend, timeout=timeout,
                                         threads=threads_per_rank, progress=progress, env=env or {})


def _check_types(world_size: Any, kwargs: Any, backend: Any, timeout: Any, threads: Any, env: Any) -> None:
    def is_int(x: Any) -> bool:  # bool is an int subclass, but True ranks is a mistake
        return isinstance(x, numbers.Integral) and not isinstance(x, bool)

    def kind(x: Any) -> str:
        return f"{type(x).__name__} {x!r}"

    if world_size is not None and not is_int(world_size):
        raise TypeError(f"world_size must be an int (the number of ranks), got {kind(world_size)}")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise TypeError(f"kwargs must be a dict of the worker's keyword arguments, got {kind(kwargs)}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str ('auto', 'gloo' or 'nccl'), got {kind(backend)}")
    if not isinstance(timeout, numbers.Real) or isinstance(timeout, bool):
        raise TypeError(f"timeout must be a number of seconds, got {kind(timeout)}")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive seconds, got {timeout}")
    if threads is not None and not is_int(threads):
        raise TypeError(f"threads_per_rank must be an int or None, got {kind(threads)}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads_per_rank must be at least 1 (or None to leave it alone), got {threads}")
    if env is not None and not (isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                              for k, v in env.items())):
        raise TypeError(f"env must be a dict of str to str (environment variables), got {kind(env)}")


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
            f"the worker {name!r} cannot be sent to other processes ({e}). Each rank "
            "imports the worker by name, so functions defined in a notebook, lambdas and nested "
            "functions cannot be used: put it in a module (a .py file, or nanopar) and import it."
        ) from None
    try:
        pickle.dumps((args, kwargs))
    except Exception as e:
        raise TypeError(f"the worker's arguments cannot be pickled for the ranks: {e}") from None
