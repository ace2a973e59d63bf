"""nanopar.bench: implementations are compared pair by pair, and the spread is what the run saw."""
import statistics

import pytest

from nanopar import bench, devices

MiB = bench.MiB


def test_speed_ratio_is_the_median_of_the_pairs_with_their_quartiles():
    # ratios t_b / t_a: 2, 1, 0.5, 3 -> sorted 0.5 1 2 3
    r = bench.speed_ratio([1.0, 2.0, 4.0, 1.0], [2.0, 2.0, 2.0, 3.0])
    assert r == bench.PairedRatio(median=1.5, q1=0.875, q3=2.25, pairs=4)


def test_a_slow_minute_cancels_out_of_paired_ratios():
    # B is 10% slower than A throughout; half the pairs ran in a slow minute (3x), and the
    # slow minute began between the two members of one pair.
    a = [1.0] * 5 + [3.0] * 5
    b = [1.1] * 4 + [3.3] * 6
    assert bench.speed_ratio(a, b).median == pytest.approx(1.1)
    assert statistics.median(b) / statistics.median(a) == pytest.approx(1.65)  # a ratio of medians is fooled


def test_one_pair_has_no_spread():
    assert bench.speed_ratio([2.0], [3.0]) == bench.PairedRatio(1.5, 1.5, 1.5, 1)


@pytest.mark.parametrize("a, b", [([1.0], [1.0, 2.0]), ([], [])])
def test_speed_ratio_needs_pairs(a, b):
    with pytest.raises(ValueError, match="paired timings"):
        bench.speed_ratio(a, b)


def _all_reduce(impl, n, nbytes, each):
    return {"op": "all_reduce", "impl": impl, "world_size": n, "bytes": nbytes, "seconds_each": each}


def test_ring_vs_gloo_pools_the_pairs_of_large_messages_at_one_world_size():
    records = [
        _all_reduce("gloo", 2, 1 * MiB, [1.0, 1.0]), _all_reduce("ring", 2, 1 * MiB, [9.0, 9.0]),  # too small
        _all_reduce("gloo", 2, 4 * MiB, [1.0, 2.0]), _all_reduce("ring", 2, 4 * MiB, [2.0, 2.0]),  # 0.5, 1
        _all_reduce("gloo", 2, 16 * MiB, [3.0, 4.0]), _all_reduce("ring", 2, 16 * MiB, [2.0, 2.0]),  # 1.5, 2
        _all_reduce("gloo", 4, 4 * MiB, [1.0, 1.0]), _all_reduce("ring", 4, 4 * MiB, [9.0, 9.0]),  # other N
        {"op": "copy", "impl": "memcpy", "world_size": 1, "bytes": 4 * MiB, "seconds_each": [0.1, 0.1]},
    ]
    r = bench.ring_vs_gloo(records, world_size=2)
    assert r == bench.PairedRatio(median=1.25, q1=0.875, q3=1.625, pairs=4)  # of 0.5 1 1.5 2
    assert bench.ring_to_gloo_ratio(records, world_size=2) == 1.25
    assert bench.ring_vs_gloo(records, world_size=4).median == pytest.approx(1 / 9)
    with pytest.raises(ValueError, match="no ring and gloo records"):
        bench.ring_vs_gloo(records, world_size=2, min_bytes=64 * MiB)


def test_dp_speed_ratio_pairs_steps_of_one_workload_and_world_size():
    def rec(impl, n, workload, each):
        return {"impl": impl, "world_size": n, "workload": workload, "step_s_each": each}

    records = [rec("ddp", 2, "w", [0.10, 0.20, 0.10]), rec("bucketed", 2, "w", [0.10, 0.25, 0.08]),
               rec("ddp", 1, "w", [1.0, 1.0, 1.0]), rec("bucketed", 2, "other", [1.0, 1.0, 1.0])]
    r = bench.dp_speed_ratio(records, "w", 2, "bucketed", "ddp")  # 1, 0.8, 1.25
    assert r == bench.PairedRatio(median=1.0, q1=0.9, q3=1.125, pairs=3)
    assert bench.dp_ratio(records, "w", 2, "bucketed", "ddp") == 1.0


@pytest.fixture
def cpu_tier(monkeypatch):
    monkeypatch.setattr(devices, "gpu_count", lambda: 0)


def test_bench_collectives_records_every_timing_and_the_ring_to_gloo_spread(cpu_tier):
    records = bench.bench_collectives(world_sizes=(2,), sizes=[4096], quick=True)
    by_impl = {r["impl"]: r for r in records}
    for r in records:
        assert len(r["seconds_each"]) == r["iterations"] > 1
        assert r["seconds"] == statistics.median(r["seconds_each"])
    ring, gloo = by_impl["ring"], by_impl["gloo"]
    paired = bench.speed_ratio(ring["seconds_each"], gloo["seconds_each"])
    assert (ring["busbw_vs_gloo"], ring["busbw_vs_gloo_q1"], ring["busbw_vs_gloo_q3"]) == paired[:3]
    assert ring["busbw_vs_gloo_q1"] <= ring["busbw_vs_gloo"] <= ring["busbw_vs_gloo_q3"]
    assert bench.ring_vs_gloo(records, world_size=2, min_bytes=4096) == paired
