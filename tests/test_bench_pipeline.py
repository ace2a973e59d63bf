"""python -m nanopar bench pipeline (chapter 4.2): the right records, the theory columns, the plots."""
import json

import matplotlib
import pytest

from nanopar import bench, cli, plotting, schedules
from nanopar.bench import OpTiming, measured_idle_fraction, time_budget

FIELDS = {"impl", "schedule", "stages", "microbatches", "step_s", "step_s_min", "step_s_max", "speedup_vs_naive",
          "bubble_measured", "bubble_theory", "speedup_theory", "peak_activation_bytes", "messages_s", "slow_ops_s"}
MS = (1, 2, 4)


def tiny(mp):
    # The same code path on a model small enough to take seconds (sizes are read at launch).
    for name, value in {"PIPE_BLOCKS": 4, "PIPE_CHANNELS": 4, "PIPE_SIZE": 4, "PIPE_BATCH": 8}.items():
        mp.setattr(bench, name, value)


@pytest.fixture(scope="module")
def records():
    with pytest.MonkeyPatch.context() as mp:
        tiny(mp)
        return bench.bench_pipeline(stages=(2,), microbatches=MS, rounds=2)


def test_configs_alternate_every_schedule_and_skip_what_torch_refuses():
    assert bench.pipeline_configs(2, MS, single=True) == [
        ("single", "naive", 1),
        ("nanopar", "naive", 1), *(("nanopar", "gpipe", m) for m in MS), *(("nanopar", "1f1b", m) for m in MS),
        ("torch", "naive", 1), *(("torch", "gpipe", m) for m in MS), ("torch", "1f1b", 2), ("torch", "1f1b", 4)]
    four = bench.pipeline_configs(4, (1, 2, 4, 8))
    assert [m for impl, s, m in four if (impl, s) == ("torch", "1f1b")] == [4, 8]  # Schedule1F1B needs m >= p
    assert [m for impl, s, m in four if (impl, s) == ("nanopar", "1f1b")] == [1, 2, 4, 8]
    assert not any(impl == "single" for impl, _, _ in four)


def test_records_have_the_fields_and_combinations(records):
    assert [(r["impl"], r["schedule"], r["microbatches"]) for r in records] == bench.pipeline_configs(2, MS, True)
    for r in records:
        assert FIELDS <= r.keys()
        assert r["stages"] == (1 if r["impl"] == "single" else 2) and r["rounds"] == 2
        assert 0 < r["step_s_min"] <= r["step_s"] <= r["step_s_max"]
        ours = r["impl"] == "nanopar"
        for field in ("bubble_measured", "peak_activation_bytes", "messages_s", "slow_ops_s"):
            assert (r[field] is not None) == ours, field
        if ours:
            # replaying the measured ops can only be as fast as the step, or faster
            assert r["messages_s"] >= -1e-9 and r["messages_s"] + r["slow_ops_s"] <= r["step_s"]
        if ours and r["schedule"] == "naive":  # one op at a time: one of the two stages idles
            assert r["bubble_measured"] >= 0.5 - 0.02


def test_theory_columns_and_ratios(records):
    naive = {r["impl"]: r["step_s"] for r in records if r["schedule"] == "naive"}
    for r in records:
        p, m = r["stages"], r["microbatches"]
        assert r["bubble_theory"] == pytest.approx((p - 1) / (m + p - 1))
        if r["schedule"] == "naive":
            assert r["speedup_theory"] == 1.0
        else:
            assert r["speedup_theory"] == pytest.approx(p * m / (m + p - 1))
        # "single" is compared with our naive split; the others with their own
        ref = naive["nanopar" if r["impl"] == "single" else r["impl"]]
        assert r["speedup_vs_naive"] == pytest.approx(ref / r["step_s"])
    assert all(r["speedup_vs_naive"] == 1.0 for r in records if r["schedule"] == "naive" and r["impl"] != "single")


def test_1f1b_holds_fewer_activations_than_gpipe(records):
    peak = {(r["schedule"], r["microbatches"]): r["peak_activation_bytes"] for r in records if r["impl"] == "nanopar"}
    # 1F1B's stage 0 holds p = 2 micro-batches, a shrinking share of the batch; GPipe holds all m
    assert peak["1f1b", 4] < peak["gpipe", 4]
    assert peak["1f1b", 4] < peak["1f1b", 1] and peak["gpipe", 1] == peak["naive", 1]


def test_headline(records):
    head = bench.pipeline_headline(records, stages=2, microbatches=4)
    at = {(r["impl"], r["schedule"], r["microbatches"]): r for r in records}
    assert head == {
        "gpipe_speedup": at["nanopar", "gpipe", 4]["speedup_vs_naive"],
        "1f1b_speedup": at["nanopar", "1f1b", 4]["speedup_vs_naive"],
        "gpipe_nanopar_over_torch": at["nanopar", "gpipe", 4]["step_s"] / at["torch", "gpipe", 4]["step_s"],
        "1f1b_nanopar_over_torch": at["nanopar", "1f1b", 4]["step_s"] / at["torch", "1f1b", 4]["step_s"],
        "max_bubble_error": max(abs(r["bubble_measured"] - r["bubble_theory"]) for r in records
                                if r["impl"] == "nanopar")}


def test_cli_writes_records_a_plot_and_the_headline(tmp_path, monkeypatch, capsys):
    tiny(monkeypatch)
    path, plot = tmp_path / "pipe.json", tmp_path / "pipe.png"
    assert cli.main(["bench", "pipeline", "--quick", "--microbatches", "2", "4",
                     "--json", str(path), "--plot", str(plot)]) == 0
    records = json.loads(path.read_text())
    assert {r["stages"] for r in records} == {1, 2}  # --quick: 2 stages, and the one process
    assert plot.stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "2 stages, m=4: speed-up over the naive split: GPipe" in out and "nanopar / torch" in out


@pytest.mark.parametrize("argv, message", [
    (["--stages", "1"], "at least 2"),
    (["--stages", "3"], "divide the model's 8 blocks"),
    (["--microbatches"], "expected at least one argument"),
    (["--microbatches", "3"], "divide the batch of 128"),
    (["--microbatches", "0", "2"], "must be positive"),
])
def test_bad_arguments_are_parser_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "pipeline", *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_schedule_and_measured_gantt_are_figures(tmp_path):
    ops = schedules.make("1f1b", 4, 8)
    fig = plotting.plot_schedule(ops, stages=4, microbatches=8, path=tmp_path / "plan.png")
    assert isinstance(fig, matplotlib.figure.Figure) and (tmp_path / "plan.png").stat().st_size > 5_000
    assert fig.axes[0].get_title() == "4 stages, 8 micro-batches: idle 27% of stage-time"  # 3 / 11
    # A made-up measurement of the same schedule: one ms per slot, B slightly longer.
    timings = [[OpTiming(o.kind, o.microbatch, o.slot * 1e-3, (o.slot + (0.9 if o.kind == "F" else 1.0)) * 1e-3, 0.0)
                for o in schedules.stage_ops(ops, s)] for s in range(4)]
    fig = plotting.plot_gantt(timings, path=tmp_path / "gantt.png")
    assert isinstance(fig, matplotlib.figure.Figure) and (tmp_path / "gantt.png").stat().st_size > 5_000
    # 32 forwards of 0.9 ms and 32 backwards of 1 ms on 4 stages over 22 ms: idle 1 - 60.8 / 88
    assert fig.axes[0].get_title() == "measured: idle 31% of stage-time"


def test_bench_plot(records, tmp_path):
    fig = plotting.plot_pipeline_bench(records, path=tmp_path / "bench.png")
    assert isinstance(fig, matplotlib.figure.Figure) and len(fig.axes) == 2
    assert (tmp_path / "bench.png").stat().st_size > 10_000


def test_handoff_cost_plot_starts_at_one_and_1f1b_grows_faster(tmp_path):
    fig = plotting.plot_handoff_cost(stages=2, microbatches=(8,), path=tmp_path / "handoff.png")
    lines = {line.get_label(): line.get_ydata() for line in fig.axes[0].get_lines()}
    assert set(lines) == {"gpipe, m = 8", "1f1b, m = 8"}
    assert lines["gpipe, m = 8"][0] == lines["1f1b, m = 8"][0] == 1.0
    assert lines["1f1b, m = 8"][-1] > lines["gpipe, m = 8"][-1] > 1.0
    assert (tmp_path / "handoff.png").stat().st_size > 10_000


def test_bench_plot_caps_oversubscribed_stages_at_the_core_count(records):
    shared = [dict(r, stages=4, cpu_cores=2) for r in records if r["impl"] != "single"]
    fig = plotting.plot_pipeline_bench(shared)
    assert "2 cores: at most 2x" in [line.get_label() for line in fig.axes[0].get_lines()]
    assert "4 ranks share 2 cores" in fig.axes[0].get_title()


def test_measured_idle_fraction_of_a_made_up_step():
    # Stage 0 works 0-2 ms, stage 1 works 1-4 ms: busy 5 of 2 × 4 ms.
    timings = [[OpTiming("F", 0, 0.0, 2e-3, 0.0)], [OpTiming("F", 0, 1e-3, 4e-3, 0.0)]]
    assert measured_idle_fraction(timings) == pytest.approx(1 - 5 / 8)


def test_time_budget_splits_a_step_into_ops_messages_and_slow_ops():
    # A made-up measurement: forward 1, backward 2, one slow backward, messages taking 0.5.
    ops = schedules.make("1f1b", 2, 3)
    cost = lambda kind, s, j: (1.0 if kind == "F" else 2.0) + (1.0 if (kind, s, j) == ("B", 1, 0) else 0.0)  # noqa: E731
    span = lambda c, f: schedules.step_time(ops, 2, f, c)  # noqa: E731
    times = schedules.timeline(ops, 2, cost, latency=0.5)
    measured = [[OpTiming(o.kind, o.microbatch, *times[o.kind, s, o.microbatch], 0.0) for o in schedules.stage_ops(ops, s)]
                for s in range(2)]
    budget = time_budget(measured)
    assert budget["span"] == pytest.approx(span(0.5, cost))
    assert budget["instant_messages"] == pytest.approx(span(0.0, cost))
    assert budget["steady_ops"] == pytest.approx(span(0.0, lambda kind, s, j: 1.0 if kind == "F" else 2.0))
    assert budget["span"] > budget["instant_messages"] > budget["steady_ops"]
