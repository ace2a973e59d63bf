"""nanopar.bench.microbatching: the records and figures of chapter 4.2's micro-batch experiments."""
import functools

import pytest

from nanopar import models, plotting
from nanopar.bench import microbatching
from nanopar.launch import run


def test_per_sample_times_cover_every_size():
    build = functools.partial(models.mlp, 16, 2, in_features=8, out_features=3)
    (times,) = run(microbatching.per_sample_times, 1, build, (8,), 3, [1, 4], 2)
    assert sorted(times) == [1, 4] and all(t > 0 for t in times.values())
    assert plotting.plot_per_sample({"mlp": times}) is not None


def test_tutorial_experiment_records(tmp_path):
    records = microbatching.tutorial_experiment(batch=4, image=64, split_sizes=(4, 2), rounds=1)
    assert [(r["setup"], r["split_size"], r["microbatches"]) for r in records] == [
        ("one device", 4, 1), ("naive split", 4, 1), ("pipelined", 2, 2)]
    assert records[0]["relative_to_one_device"] == 1.0
    assert all(r["step_s"] > 0 for r in records)
    plotting.plot_tutorial(records, microbatching.TUTORIAL_GPU_SECONDS, path=str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").stat().st_size > 10_000


def test_split_sizes_must_divide_the_batch():
    with pytest.raises(ValueError, match="must divide the batch of 64"):
        microbatching.tutorial_experiment(split_sizes=(5,))
