"""nanopar.bench.microbatching: the records and figures of chapter 4.2's micro-batch experiments."""
import functools

import pytest
from torch import nn

from nanopar import models, plotting, schedules
from nanopar.bench import microbatching
from nanopar.launch import run


def test_per_sample_times_cover_every_size():
    build = functools.partial(models.mlp, 16, 2, in_features=8, out_features=3)
    (times,) = run(microbatching.per_sample_times, 1, build, (8,), 3, [1, 4], 2, backend="gloo", timeout=120)
    assert sorted(times) == [1, 4] and all(0 < t < 1 for t in times.values())  # seconds per sample of a tiny MLP
    (line,) = plotting.plot_per_sample({"mlp": times}).axes[0].get_lines()[:1]
    assert line.get_label() == "mlp" and list(line.get_xdata()) == [1, 4]
    assert list(line.get_ydata()) == [times[1] / times[4], 1.0]  # relative to the largest batch


def test_tutorial_experiment_records(tmp_path):
    records = microbatching.tutorial_experiment(batch=4, image=64, split_sizes=(4, 2), rounds=1)
    assert [(r["setup"], r["split_size"], r["microbatches"]) for r in records] == [
        ("one device", 4, 1), ("naive split", 4, 1), ("pipelined", 2, 2)]
    assert [r["relative_to_one_device"] for r in records] == [r["step_s"] / records[0]["step_s"] for r in records]
    plotting.plot_tutorial(records, microbatching.TUTORIAL_GPU_SECONDS, path=str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").stat().st_size > 10_000


def test_split_sizes_must_divide_the_batch():
    with pytest.raises(ValueError, match="must divide the batch of 64"):
        microbatching.tutorial_experiment(split_sizes=(5,))


def _uneven_model():
    # Stage 0 is one small layer, stage 1 twenty wide ones: stage 1 does far more of the work.
    return nn.Sequential(nn.Linear(8, 256), *[nn.Linear(256, 256) for _ in range(20)], nn.Linear(256, 3))


def test_stage_times_measure_each_stage_of_each_cut():
    cuts = {"early": [1], "late": [21]}
    (times,) = run(microbatching.stage_times, 1, _uneven_model, cuts, 64, (8,), 3, 3, backend="gloo", timeout=120)
    assert list(times) == ["early", "late"] and [len(t) for t in times.values()] == [2, 2]
    assert times["early"][1] > 3 * times["early"][0]  # 21 wide layers against one narrow one
    assert times["late"][0] > 3 * times["late"][1]


def test_cut_balance_records_name_the_cuts_and_their_shares():
    records = microbatching.cut_balance(batch=2, image=64, repeats=1)
    assert [(r["cut"], r["stage_starts"]) for r in records] == [("article", ["layer2"]), ("tutorial", ["layer3"])]
    for r in records:
        assert len(r["stage_s"]) == 2 and sum(r["share"]) == pytest.approx(1.0)
    # The tutorial's first stage also runs layer2, so it does more of the work than the article's.
    assert records[1]["share"][0] > records[0]["share"][0]


@pytest.mark.parametrize("p, m", [(2, 1), (2, 4), (2, 8), (4, 6)])
def test_pipelined_fraction_of_equal_stages_is_the_inverse_speedup(p, m):
    assert microbatching.pipelined_fraction([0.5] * p, m) == pytest.approx(1 / schedules.speedup(p, m))


def test_pipelined_fraction_of_unequal_stages():
    # Stages of 1 and 3 s, 4 micro-batches: 0.25 s before the slow stage starts, then its 3 s.
    assert microbatching.pipelined_fraction([1.0, 3.0], 4) == pytest.approx(3.25 / 4)
    assert microbatching.pipelined_fraction([1.0, 3.0], 1) == 1.0


@pytest.mark.parametrize("stage_s, m, match", [([1.0, 2.0], 0, "positive whole number"),
                                               ([1.0, 2.0], 2.0, "positive whole number"),
                                               ([], 2, "one non-negative time per stage")])
def test_pipelined_fraction_refuses_bad_input(stage_s, m, match):
    with pytest.raises(ValueError, match=match):
        microbatching.pipelined_fraction(stage_s, m)
