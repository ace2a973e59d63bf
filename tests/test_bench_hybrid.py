"""python -m nanopar bench hybrid (chapter 3.3): every grid of 4 ranks, bytes counted = the formulas."""
import json

import matplotlib
import pytest

from nanopar import cli, devices, plotting
from nanopar.bench import hybrid
from nanopar.grid import AXES, Topology

FIELDS = {"dp", "pp", "tp", "model", "samples_per_s", "step_s", "step_s_min", "step_s_max", "microbatches",
          "max_abs_diff_vs_single", *(f"comm_bytes_{a}{s}" for a in AXES for s in ("", "_formula")),
          *(f"wire_bytes_{a}" for a in AXES)}


@pytest.fixture(scope="module")
def records():
    with pytest.MonkeyPatch.context() as mp:
        # the same code path on a GPT small enough for seconds; the CPU tier on any machine
        mp.setattr(hybrid, "HYBRID_QUICK_MODEL", {"block_size": 16, "n_layer": 4, "n_head": 4, "n_embd": 32})
        mp.setattr(hybrid, "HYBRID_QUICK_BATCH", 8)
        mp.setattr(devices, "gpu_count", lambda: 0)
        return hybrid.bench_hybrid(quick=True, rounds=2, steps_per_round=1, timeout=240)


def test_every_shape_of_four_ranks_has_a_record_with_the_fields(records):
    assert [(r["dp"], r["pp"], r["tp"]) for r in records] == list(hybrid.HYBRID_SHAPES)
    for r in records:
        assert FIELDS <= r.keys()
        assert r["dp"] * r["pp"] * r["tp"] == 4 and r["batch"] == 8 and r["seq_len"] == 16
        assert r["microbatches"] == (1 if r["pp"] == 1 else 2 * r["pp"])
        assert 0 < r["step_s_min"] <= r["step_s"] <= r["step_s_max"]
        assert r["samples_per_s"] == pytest.approx(8 / r["step_s"])


def test_counted_bytes_equal_the_formulas_of_chapter_3_3(records):
    for r in records:
        for axis in AXES:
            assert r[f"comm_bytes_{axis}"] == r[f"comm_bytes_{axis}_formula"], (r["shape"], axis)
            assert (r[f"comm_bytes_{axis}"] > 0) == (r[axis] > 1), (r["shape"], axis)  # degree 1 moves nothing
        assert r["comm_bytes_other"] == 0


def test_wire_bytes_apply_the_ring_factor_to_all_reduces_only(records):
    for r in records:
        assert r["wire_bytes_pp"] == r["comm_bytes_pp"]  # sends go once over the wire
        for axis in ("dp", "tp"):
            n = r[axis]
            assert r[f"wire_bytes_{axis}"] == pytest.approx(r[f"comm_bytes_{axis}"] * 2 * (n - 1) / n)


def test_every_shape_trains_as_one_process_does(records):
    for r in records:
        assert r["max_abs_diff_vs_single"] < 1e-5, r["shape"]


def test_cli_writes_the_records_and_the_plot(records, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(hybrid, "bench_hybrid", lambda quick: records)  # the run above, not another one
    path, plot = tmp_path / "hybrid.json", tmp_path / "hybrid.png"
    assert cli.main(["bench", "hybrid", "--quick", "--json", str(path), "--plot", str(plot)]) == 0
    assert json.loads(path.read_text()) == records and plot.stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "equal the formulas of chapter 3.3 for every shape" in out
    assert all(r["shape"] in out for r in records)


def test_plot_hybrid_bench_stacks_the_counted_bytes_of_each_axis(records):
    fig = plotting.plot_hybrid_bench(records)
    speed, volume = fig.axes
    assert [p.get_height() for p in speed.patches] == pytest.approx([r["samples_per_s"] for r in records])
    heights = [p.get_height() * 2**20 for p in volume.patches]  # dp bars, then pp, then tp
    assert heights == pytest.approx([r[f"comm_bytes_{a}"] for a in AXES for r in records])


def test_plot_grid_draws_one_line_per_group():
    topo = Topology(2, 2, 2)
    ax = plotting.plot_grid(topo).axes[0]
    colors = {"tp": "tab:red", "dp": "tab:blue", "pp": "tab:green"}
    for axis, color in colors.items():
        lines = [line for line in ax.lines if matplotlib.colors.same_color(line.get_color(), color)]
        assert len(lines) == len(topo.groups(axis)) == 4
        assert all(len(line.get_xdata()) == 2 for line in lines)
    ax = plotting.plot_grid(Topology(1, 4, 1)).axes[0]  # degree-1 axes draw nothing
    assert len(ax.lines) == 1 and len(ax.lines[0].get_xdata()) == 4
