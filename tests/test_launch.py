"""nanopar.launch: results come back, failures blame the right rank, nothing hangs or lingers.

Tests that depend on the backend pin it (backend="gloo") or fake the GPU count, so they
pass on a CPU machine, on one GPU and on several.
"""
import io
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
import types

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from nanopar import devices
from nanopar.failures import DIED, LOST_PEER, RAISED, Failure, blame
from nanopar.launch import RankError, run

TESTS = os.path.dirname(os.path.abspath(__file__))


# Workers live in this module: the ranks import them by name.
def echo(ctx, x):
    return (ctx.rank, ctx.world_size, ctx.backend, str(ctx.device), x, dist.get_rank(), torch.get_num_threads())


def fail_on(ctx, bad_rank):
    if ctx.rank == bad_rank:
        raise ValueError(f"boom from rank {ctx.rank}")
    dist.barrier()  # the healthy ranks wait for the broken one: they must be stopped
    return ctx.rank


def die_on(ctx, bad_rank):
    if ctx.rank == bad_rank:
        os._exit(3)
    dist.barrier()


def raise_then_peer_exits(ctx):
    # Rank 0's exception breaks rank 1's barrier, and rank 1 then dies without a traceback.
    if ctx.rank == 0:
        raise ValueError("the first cause")
    try:
        dist.barrier()
    except RuntimeError:
        os._exit(3)


def stuck(ctx):
    if ctx.rank == 1:
        time.sleep(3600)
    dist.barrier()


def tick_n(ctx, n):
    for _ in range(n):
        ctx.tick()


def read_env(ctx, names):
    return [os.environ.get(n) for n in names]


def with_timeout(ctx, *, timeout):
    return timeout


def loader_sum(ctx):
    # DataLoader workers are child processes of the rank.
    data = TensorDataset(torch.arange(16.0) + 100 * ctx.rank)
    total = sum(batch.sum() for (batch,) in DataLoader(data, batch_size=4, num_workers=2))
    return total.item(), os.getpid()


def _processes() -> list[tuple[int, int, int]]:
    """(pid, parent pid, session id) of every process, from /proc."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # it ended while we looked
            continue
        found.append((int(pid), int(fields[1]), int(fields[3])))
    return found


def _children() -> set[int]:
    return {pid for pid, parent, _ in _processes() if parent == os.getpid()} if os.path.isdir("/proc") else set()


@pytest.fixture(autouse=True)
def no_leftovers():
    before = _children()
    yield
    assert _children() - before == set(), "ranks were left running"


def test_results_come_back_in_rank_order_with_one_thread_per_rank():
    out = run(echo, 3, "hello", backend="gloo")
    assert out == [(r, 3, "gloo", "cpu", "hello", r, 1) for r in range(3)]


def test_one_rank():
    assert run(echo, 1, 7, backend="gloo") == [(0, 1, "gloo", "cpu", 7, 0, 1)]


def test_a_raising_rank_reaches_the_caller_with_its_traceback():
    with pytest.raises(RankError) as info:
        run(fail_on, 3, 1, backend="gloo", timeout=60)
    err = info.value
    assert err.rank == 1
    assert "ValueError: boom from rank 1" in str(err)
    assert "test_launch.py" in err.traceback and "fail_on" in err.traceback


def test_an_exception_is_blamed_before_the_death_it_caused():
    with pytest.raises(RankError) as info:
        run(raise_then_peer_exits, 2, backend="gloo", timeout=60)
    assert (info.value.rank, info.value.summary) == (0, "ValueError: the first cause")


def test_a_silent_death_is_blamed_before_the_connection_errors_it_caused():
    with pytest.raises(RankError, match="exited with code 3") as info:
        run(die_on, 3, 1, backend="gloo", timeout=60)
    assert info.value.rank == 1
    assert set(info.value.others) <= {0, 2}  # the ranks that lost their peer, when they reported in time


def test_blame_rule():
    raised = Failure(0, time=5.0, kind=RAISED, summary="ValueError", traceback="")
    died = Failure(1, time=1.0, kind=DIED, summary="exited", traceback="")
    lost = Failure(2, time=0.5, kind=LOST_PEER, summary="Connection closed by peer", traceback="")
    late_lost = Failure(3, time=0.7, kind=LOST_PEER, summary="Connection closed by peer", traceback="")
    assert blame([died, lost, raised]) is raised  # whatever the time stamps say
    assert blame([lost, died]) is died
    assert blame([late_lost, lost]) is lost
    err = RankError.from_failures([died, lost, raised])
    assert (err.rank, err.others) == (0, {1: "exited", 2: "Connection closed by peer"})


def test_a_timeout_says_where_each_rank_was():
    with pytest.raises(TimeoutError) as info:
        run(stuck, 2, backend="gloo", timeout=5)  # counted from when both ranks have started
    message = str(info.value)
    assert message.startswith("ranks [0, 1] did not finish within 5 s")
    rank0, rank1 = message.split("\nrank 0 ")[1].split("\nrank 1 ")
    assert rank0.startswith("was in barrier") and "in stuck: dist.barrier()" in rank0
    assert rank1.startswith("was in stuck") and "time.sleep(3600)" in rank1


def test_a_failed_start_stops_the_ranks_already_started(monkeypatch):
    started = []
    real_popen = subprocess.Popen

    def popen_failing_at_rank_2(*args, **kwargs):
        if len(started) == 2:
            raise OSError("no more processes")
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(subprocess, "Popen", popen_failing_at_rank_2)
    with pytest.raises(RuntimeError, match=r"could not start rank 2 of 3 \(OSError: no more processes\)"):
        run(echo, 3, None, backend="gloo", timeout=300)
    assert [p.poll() is not None for p in started] == [True, True]  # gone, not waiting for the store


def test_concurrent_runs_keep_their_environments_apart(monkeypatch):
    names = ("NANOPAR_TEST_SETTING", "OMP_NUM_THREADS")
    start, results = threading.Barrier(2), {}

    def one_run(i):
        start.wait()
        results[i] = run(read_env, 2, names, backend="gloo", env={"NANOPAR_TEST_SETTING": f"run {i}"})

    with socket.socket() as busy:  # and a stale MASTER_PORT that something else holds does not matter
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        monkeypatch.setenv("MASTER_PORT", str(busy.getsockname()[1]))
        before = dict(os.environ)
        runs = [threading.Thread(target=one_run, args=(i,)) for i in range(2)]
        for t in runs:
            t.start()
        for t in runs:
            t.join(timeout=120)
    assert results == {i: [[f"run {i}", "1"]] * 2 for i in range(2)}
    assert dict(os.environ) == before


def test_ranks_may_start_processes_of_their_own():
    per_rank = run(loader_sum, 2, backend="gloo", timeout=120)
    assert [total for total, _ in per_rank] == [(torch.arange(16.0) + 100 * r).sum().item() for r in range(2)]
    if os.path.isdir("/proc"):  # the DataLoader workers ended with their rank
        rank_sessions = {pid for _, pid in per_rank}
        assert [p for p, _, session in _processes() if session in rank_sessions] == []


def test_worker_keyword_arguments_go_through_kwargs():
    assert run(with_timeout, 1, kwargs={"timeout": 5}, backend="gloo", timeout=60) == [5]
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) lr: .*kwargs=\{'lr': ...\}"):
        run(echo, 2, None, lr=0.1)


@pytest.mark.parametrize("world_size, type_name", [(2.5, "float 2.5"), ("2", "str '2'"), (True, "bool True")])
def test_a_world_size_of_the_wrong_type_is_named(world_size, type_name):
    with pytest.raises(TypeError, match=f"world_size must be an int .*got {type_name}"):
        run(echo, world_size, None)


@pytest.mark.parametrize("timeout, type_name", [("60", "str '60'"), (True, "bool True")])
def test_a_timeout_of_the_wrong_type_is_named(timeout, type_name):
    with pytest.raises(TypeError, match=f"timeout must be a number of seconds, got {type_name}"):
        run(echo, 2, None, timeout=timeout)


def test_a_script_without_the_main_guard_is_told_to_add_it(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {TESTS!r})
        from test_launch import echo
        from nanopar.launch import run
        run(echo, 2, "x", backend="gloo", timeout=60)
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert re.search(r'RankError: rank \d failed: RuntimeError: this script calls nanopar.launch.run\(\) when it '
                     r'is imported, .*: put the call under `if __name__ == "__main__":`', proc.stderr)


def test_ranks_drive_the_callers_progress_bar():
    with tqdm(total=5, file=io.StringIO()) as bar:
        run(tick_n, 2, 5, backend="gloo", progress=bar)
        assert bar.n == 5  # rank 0's ticks only, so every rank may tick in the same loop


@pytest.mark.parametrize("n", [0, -2])
def test_world_size_below_one_is_refused(n):
    with pytest.raises(ValueError, match="world_size must be at least 1"):
        run(echo, n, None)


def test_nccl_without_enough_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(devices, "gpu_count", lambda: 1)
    with pytest.raises(ValueError, match="2 ranks asked for, 1 GPU"):
        run(echo, 2, None, backend="nccl")


def test_a_worker_defined_in_a_notebook_is_refused_with_advice(monkeypatch):
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))  # no __file__, like a kernel

    def notebook_worker(ctx):
        return ctx.rank

    notebook_worker.__module__ = "__main__"
    with pytest.raises(TypeError, match="put it in a module"):
        run(notebook_worker, 2)
    with pytest.raises(TypeError, match="put it in a module"):
        run(lambda ctx: ctx.rank, 2)


def test_under_torchrun_results_are_gathered_and_a_failure_stops_every_rank(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {TESTS!r})
        from test_launch import echo, fail_on
        from nanopar.launch import run
        if __name__ == "__main__":
            for call in ("first", "second"):  # a second run in the same processes works too
                out = run(echo, None, call, backend="gloo")
                if os.environ["RANK"] == "0":
                    print("GATHERED", out, flush=True)
            run(fail_on, None, 1, backend="gloo")  # rank 0 waits in a barrier that rank 1 never joins
    """))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
        capture_output=True, text=True, timeout=150,  # well below run's timeout of 300 s: no rank waits for it
    )
    for call in ("first", "second"):
        assert f"GATHERED {[(r, 2, 'gloo', 'cpu', call, r, 1) for r in range(2)]}" in proc.stdout
    assert proc.returncode != 0
    assert "[rank 0] stopping because rank 1 failed: ValueError: boom from rank 1" in proc.stderr
