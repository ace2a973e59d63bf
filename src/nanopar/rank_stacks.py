"""Where a spawned rank is: its Python stack, written by ``faulthandler`` into a file.

Book: chapter 2 ("Core concepts"). A rank calls :func:`record_stacks` when it starts.
From then on, a crash writes the stack of every thread into its file, and so does the
signal SIGUSR1, which the caller sends when a run times out (:func:`ask_where`): the stack
of a rank blocked in a collective names it (``in barrier``, ``in all_reduce``), even while
the rank waits inside C++. The caller reads the main thread's part of the file.
"""
from __future__ import annotations

import faulthandler
import linecache
import os
import re
import signal
import threading
import time

_WAIT_S = 2.0
_POLL_S = 0.05
_HERE = os.path.dirname(os.path.abspath(__file__))
# Frames of the launching machinery, left out of what a timeout shows.
_LAUNCHING = {os.path.join(_HERE, "local_ranks.py"), os.path.join(_HERE, "rank.py"), "<string>"}
_FRAME = re.compile(r'File "(?P<file>.*)", line (?P<line>\d+) in (?P<func>\S+)')


def record_stacks(path: str) -> None:
    """In a rank: from now on, a crash or SIGUSR1 writes every thread's stack to ``path`` (chapter 2)."""
    stack_file = open(path, "w")  # noqa: SIM115 — faulthandler writes to it until the process ends
    stack_file.write(f"main thread {threading.get_ident():#018x}\n")  # faulthandler's spelling of the id
    stack_file.flush()
    faulthandler.enable(stack_file, all_threads=True)
    faulthandler.register(signal.SIGUSR1, stack_file, all_threads=True)


def main_thread_stack(path: str, since: int = 0) -> str:
    """The main thread's stack from the dump written after byte ``since`` ("" when none)."""
    if not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        main_thread = f.readline().decode().split()[-1]
        f.seek(max(since, f.tell()))
        dump = f.read().decode(errors="replace")
    # faulthandler writes one block per thread, "Thread 0x… (most recent call first):" and its frames.
    blocks = [b for b in dump.split("\n\n") if main_thread in b.split("(most recent call first)")[0]]
    return blocks[-1].strip() if blocks else dump.strip()


def ask_where(pids: dict[int, int], paths: dict[int, str]) -> dict[int, str]:
    """Signal each running rank (rank → pid) to dump its stack; describe where each one was (chapter 2)."""
    before = {r: os.path.getsize(paths[r]) for r in pids if os.path.exists(paths[r])}
    for r in before:
        os.kill(pids[r], signal.SIGUSR1)
    give_up = time.monotonic() + _WAIT_S
    while time.monotonic() < give_up and any(os.path.getsize(paths[r]) == n for r, n in before.items()):
        time.sleep(_POLL_S)
    time.sleep(_POLL_S)  # let a dump that has begun finish
    return {r: _describe(main_thread_stack(paths[r], since=before[r])) if r in before else "had not started"
            for r in pids}


def _describe(stack: str, frames: int = 6) -> str:
    found = [m.groupdict() for m in map(_FRAME.search, stack.splitlines()) if m and m["file"] not in _LAUNCHING]
    if not found:
        return "did not say where it was (no Python stack)"
    shown = []
    for f in found[:frames]:
        source = linecache.getline(f["file"], int(f["line"])).strip()
        shown.append(f"    {f['file']}:{f['line']} in {f['func']}" + (f": {source}" if source else ""))
    return f"was in {found[0]['func']} (most recent call first):\n" + "\n".join(shown)
