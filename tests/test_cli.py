"""python -m nanopar: info and bench collectives write what the book promises."""
import json
import statistics
import subprocess
import sys

import pytest

from nanopar import bench, cli, devices

FIELDS = {"op", "impl", "world_size", "bytes", "seconds", "algbw_gbps", "busbw_gbps"}


def test_info_prints_the_tier_and_versions():
    out = subprocess.run([sys.executable, "-m", "nanopar", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("tier: ") and "torch" in out.stdout and "gloo" in out.stdout


@pytest.fixture
def cpu_tier(monkeypatch):
    """The benchmarks' ranks pick their backend with "auto": pin the CPU tier on any machine."""
    monkeypatch.setattr(devices, "gpu_count", lambda: 0)


def test_bench_collectives_writes_records_and_a_plot(tmp_path, capsys, cpu_tier):
    path, plot = tmp_path / "out.json", tmp_path / "out.png"
    assert cli.main(["bench", "collectives", "--quick", "--world-sizes", "2", "--sizes", "4096", "4194304",
                     "--json", str(path), "--plot", str(plot)]) == 0
    records = json.loads(path.read_text())
    assert plot.stat().st_size > 10_000
    assert {(r["impl"], r["world_size"], r["bytes"]) for r in records} == {
        (impl, n, b) for impl, n in (("memcpy", 1), ("gloo", 2), ("ring", 2)) for b in (4096, 4194304)}
    for r in records:
        assert FIELDS <= r.keys() and r["seconds"] > 0
        assert r["algbw_gbps"] == pytest.approx(r["bytes"] / r["seconds"] / 1e9)
        n = r["world_size"]
        assert r["busbw_gbps"] == pytest.approx(r["algbw_gbps"] * (2 * (n - 1) / n if n > 1 else 1))
    assert "ring / gloo bus bandwidth" in capsys.readouterr().out


def test_bus_bandwidth_follows_nccl_tests():
    assert bench.bus_bandwidth(1.0, 2) == 1.0
    assert bench.bus_bandwidth(1.0, 4) == 1.5


@pytest.mark.parametrize("argv, message", [
    (["bench", "collectives", "--world-sizes", "1"], "at least 2"),
    (["bench", "collectives", "--sizes", "6"], "multiples of 4"),
])
def test_bad_bench_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


DP_FIELDS = {"impl", "model", "world_size", "per_rank_batch", "samples_per_s", "step_s", "comm_s", "scaling_efficiency"}


def test_bench_dp_records(cpu_tier):
    records = bench.bench_dp(world_sizes=(1, 2), quick=True, workloads={"tiny": 4}, round_s=0.01)  # 3 steps a round
    assert {(r["impl"], r["world_size"]) for r in records} == {
        ("single", 1), *((impl, n) for impl in ("naive", "bucketed", "ddp") for n in (1, 2))}
    single = next(r for r in records if r["impl"] == "single")
    for r in records:
        assert DP_FIELDS <= r.keys()
        assert r["samples_per_s"] == pytest.approx(r["world_size"] * r["per_rank_batch"] / r["step_s"])
        assert r["scaling_efficiency"] == pytest.approx(r["samples_per_s"] / (r["world_size"] * single["samples_per_s"]))
        assert (r["comm_s"] is None) == (r["impl"] in ("single", "ddp"))
    steps = {r["impl"]: r["step_s_each"] for r in records if r["world_size"] == 2}  # paired step by step
    assert bench.dp_ratio(records, "tiny", 2, "bucketed", "ddp") == pytest.approx(
        statistics.median(ddp / ours for ours, ddp in zip(steps["bucketed"], steps["ddp"])))


def test_bench_dp_needs_the_one_process_reference(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "dp", "--world-sizes", "2", "4"])
    assert "must include 1" in capsys.readouterr().err


def test_train_subcommand_is_nanopar_train(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--dp" in out and "--resume" in out
