"""nanopar.bench.microbatching: the records and figures of chapter 4.2's micro-batch experiments."""
import functools

import pytest

from nanopar import models, plotting
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
