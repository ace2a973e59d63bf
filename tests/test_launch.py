"""nanopar.launch: results come back, failures reach the caller, nothing hangs or lingers."""
import io
import multiprocessing
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import types

import pytest
import torch.distributed as dist
from tqdm import tqdm

from nanopar.launch import RankError, run


# Workers live in this module: spawned ranks import them by name.
def echo(ctx, x):
    return (ctx.rank, ctx.world_size, ctx.backend, str(ctx.device), x, dist.get_rank())


def fail_on(ctx, bad_rank):
    if ctx.rank == bad_rank:
        raise ValueError(f"boom from rank {ctx.rank}")
    dist.barrier()  # the healthy ranks wait for the broken one: they must be stopped
    return ctx.rank


def hang_on(ctx, bad_rank):
    if ctx.rank == bad_rank:
        time.sleep(3600)
    return ctx.rank


def die_on(ctx, bad_rank):
    if ctx.rank == bad_rank:
        os._exit(3)
    dist.barrier()


def tick_n(ctx, n):
    for _ in range(n):
        ctx.tick()


@pytest.fixture(autouse=True)
def no_leftovers():
    yield
    assert multiprocessing.active_children() == [], "ranks were left running"


def test_results_come_back_in_rank_order():
    out = run(echo, 3, "hello")
    assert out == [(r, 3, "gloo", "cpu", "hello", r) for r in range(3)]


def test_one_rank():
    assert run(echo, 1, 7) == [(0, 1, "gloo", "cpu", 7, 0)]


def test_a_raising_rank_reaches_the_caller_with_its_traceback():
    with pytest.raises(RankError) as info:
        run(fail_on, 3, 1, timeout=60)
    err = info.value
    assert err.rank == 1
    assert "ValueError: boom from rank 1" in str(err)
    assert "test_launch.py" in err.traceback and "fail_on" in err.traceback


def test_a_hung_rank_times_out_and_is_stopped():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[1\] did not finish within 6 s"):
        run(hang_on, 2, 1, timeout=6)
    assert time.monotonic() - t0 < 30


def test_a_rank_that_dies_is_reported_with_its_exit_code():
    with pytest.raises(RankError, match="exited with code 3") as info:
        run(die_on, 2, 1, timeout=60)
    assert info.value.rank == 1


def test_a_busy_port_does_not_break_a_run(monkeypatch):
    # A stale MASTER_PORT that something else holds must not matter: each run binds its own.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        monkeypatch.setenv("MASTER_PORT", str(busy.getsockname()[1]))
        results = []
        runs = [threading.Thread(target=lambda i=i: results.append(run(echo, 2, i))) for i in range(2)]
        for t in runs:
            t.start()
        for t in runs:
            t.join(timeout=120)
    assert sorted(r[0][4] for r in results) == [0, 1]


def test_ranks_drive_the_callers_progress_bar():
    with tqdm(total=5, file=io.StringIO()) as bar:
        run(tick_n, 2, 5, progress=bar)
        assert bar.n == 5  # rank 0's ticks only, so every rank may tick in the same loop


@pytest.mark.parametrize("n", [0, -2])
def test_world_size_below_one_is_refused(n):
    with pytest.raises(ValueError, match="world_size must be at least 1"):
        run(echo, n, None)


def test_nccl_without_enough_gpus_is_refused():
    with pytest.raises(ValueError, match="NCCL needs one GPU per rank"):
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


def test_the_same_worker_runs_under_torchrun(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_launch import echo
        from nanopar.launch import run
        out = run(echo, None, "x")
        if out[0][0] == 0 and __import__("os").environ["RANK"] == "0":
            print("GATHERED", out)
    """))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GATHERED [(0, 2, 'gloo', 'cpu', 'x', 0), (1, 2, 'gloo', 'cpu', 'x', 1)]" in proc.stdout


def read_env(ctx, name):
    return os.environ.get(name)


def test_env_reaches_the_ranks_and_the_callers_environment_is_restored(monkeypatch):
    monkeypatch.delenv("NANOPAR_TEST_SETTING", raising=False)
    assert run(read_env, 2, "NANOPAR_TEST_SETTING", env={"NANOPAR_TEST_SETTING": "on"}) == ["on", "on"]
    assert run(read_env, 1, "OMP_NUM_THREADS") == ["1"]
    assert "NANOPAR_TEST_SETTING" not in os.environ
