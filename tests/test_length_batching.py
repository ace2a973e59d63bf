"""nanopar.length_batching and bench lengths: uneven sequence lengths under data parallelism (chapter 5.3)."""
import functools
import itertools
import json
import math
import statistics

import pytest
import torch

from nanopar import cli, devices, length_batching as lb, training
from nanopar.bench import lengths as bl
from nanopar.launch import run

LENGTHS = lb.synthetic_lengths(1003, seed=3, frames_per_second=25)


@pytest.fixture
def cpu_tier(monkeypatch):
    """The ranks pick their backend with "auto": pin the CPU tier on any machine."""
    monkeypatch.setattr(devices, "gpu_count", lambda: 0)


def test_synthetic_lengths_are_clipped_log_normal_and_reproducible():
    lengths = lb.synthetic_lengths(20_000, seed=1)  # 100 frames per second
    assert lengths == lb.synthetic_lengths(20_000, seed=1) != lb.synthetic_lengths(20_000, seed=2)
    assert min(lengths) == 50 and max(lengths) == 3000  # 0.5 s and 30 s: the clipped tails are populated
    assert statistics.median(lengths) == pytest.approx(400, rel=0.03)  # median 4 s
    # Skewed as a log-normal is: the mean exceeds the median by exp(σ²/2), σ = 0.7.
    assert statistics.mean(lengths) / statistics.median(lengths) == pytest.approx(math.exp(0.7**2 / 2), rel=0.02)


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 0}, "at least 1"), ({"n": 5, "median_s": 40.0}, "median_s <= max_s"), ({"n": 5, "sigma": -1.0}, "sigma"),
])
def test_synthetic_lengths_refuse_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lb.synthetic_lengths(**kwargs)


def _check_epoch(plan, n, ranks):
    seen = [i for step in plan for share in step for i in share]
    assert sorted(seen) == list(range(n)), "every sample exactly once per epoch"
    assert all(len(step) == ranks and all(step) for step in plan), "every rank gets samples at every step"


PLANS = {
    "random": lb.random_batches,
    "bucketed": lb.length_bucketed_batches,
    "balanced": functools.partial(lb.length_bucketed_batches, balance_tokens=True),
}


@pytest.mark.parametrize("name", PLANS)
@pytest.mark.parametrize("n, batch, ranks", [(1000, 16, 2), (1000, 24, 4), (1003, 16, 2), (40, 9, 3)])
def test_plans_cover_every_sample_once_and_depend_only_on_the_seed(name, n, batch, ranks):
    make = PLANS[name]
    plan = make(LENGTHS[:n], batch, ranks, seed=5)
    _check_epoch(plan, n, ranks)
    assert [sum(map(len, step)) for step in plan[:-1]] == [batch] * (len(plan) - 1)
    assert sum(map(len, plan[-1])) == n - batch * (len(plan) - 1)  # the smaller last batch
    assert plan == make(LENGTHS[:n], batch, ranks, seed=5) != make(LENGTHS[:n], batch, ranks, seed=6)
    if name != "balanced":  # B/N samples per rank (the last batch: as even as it splits)
        assert all(max(map(len, step)) - min(map(len, step)) <= 1 for step in plan)
        assert all(len(share) == batch // ranks for step in plan[:-1] for share in step)


@pytest.mark.parametrize("name", PLANS)
def test_drop_last_drops_only_the_smaller_last_batch(name):
    plan = PLANS[name](LENGTHS[:1003], 16, 2, seed=0, drop_last=True)
    assert len(plan) == 1003 // 16 and all(sum(map(len, step)) == 16 for step in plan)
    assert len({i for step in plan for share in step for i in share}) == 1003 // 16 * 16


@pytest.mark.parametrize("args, kwargs, message", [
    ((LENGTHS, 15, 2), {}, "does not split over 2 ranks"),
    ((LENGTHS, 1, 2), {}, "does not split over 2 ranks"),
    ((LENGTHS, 16, 0), {}, "ranks must be at least 1"),
    ((LENGTHS[:10], 16, 2), {}, "fewer than one global batch"),
    ((LENGTHS[:17], 16, 2), {}, "last global batch would hold 1 samples for 2 ranks: pass drop_last=True"),
    (([5, 0, 7, 9], 2, 2), {}, "at least 1 frame"),
])
@pytest.mark.parametrize("name", PLANS)
def test_plans_refuse_bad_input_naming_the_fix(name, args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        PLANS[name](*args, **kwargs)


def test_chunk_batches_must_be_positive():
    with pytest.raises(ValueError, match="chunk_batches must be at least 1"):
        lb.length_bucketed_batches(LENGTHS, 16, 2, chunk_batches=0)


def test_bucketing_pads_little_and_keeps_the_batches_in_shuffled_order():
    random = lb.padding_stats(lb.random_batches(LENGTHS, 16, 2), LENGTHS)
    plan = lb.length_bucketed_batches(LENGTHS, 16, 2, chunk_batches=1000)  # one chunk: the epoch sorted
    bucketed = lb.padding_stats(plan, LENGTHS)
    assert random.padding_fraction > 0.4 and bucketed.padding_fraction < 0.05
    assert bucketed.idle_fraction < random.idle_fraction / 2
    # Sorted as a whole, the epoch's batches are runs of the sorted lengths ...
    batches = sorted(([i for share in step for i in share] for step in plan), key=lambda b: LENGTHS[b[0]])
    flat = [LENGTHS[i] for b in batches for i in b]
    assert flat == sorted(LENGTHS)
    # ... but they are trained in shuffled order, not shortest first.
    longest = [max(LENGTHS[i] for share in step for i in share) for step in plan]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)


def test_smaller_chunks_pad_more():
    fractions = [lb.padding_stats(lb.length_bucketed_batches(LENGTHS, 16, 2, chunk_batches=c), LENGTHS)
                 .padding_fraction for c in (1, 4, 62)]
    assert fractions == sorted(fractions, reverse=True)


def _best_split(lengths, ranks):
    """The smallest possible largest padded count over runs of the sorted lengths (exhaustive)."""
    xs = sorted(lengths)
    best = None
    for cuts in itertools.combinations(range(1, len(xs)), ranks - 1):
        bounds = (0, *cuts, len(xs))
        worst = max((b - a) * xs[b - 1] for a, b in zip(bounds, bounds[1:]))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("batch, ranks", [(8, 2), (9, 3), (12, 4)])
def test_balanced_plans_even_out_the_ranks_padded_frames_optimally(batch, ranks):
    lengths = LENGTHS[:180]
    plan = lb.length_bucketed_batches(lengths, batch, ranks, chunk_batches=2, balance_tokens=True)
    even = lb.length_bucketed_batches(lengths, batch, ranks, chunk_batches=2)
    padded, padded_even = lb.padding_stats(plan, lengths).padded, lb.padding_stats(even, lengths).padded
    for step, p, q in zip(plan, padded, padded_even):
        assert max(p) == _best_split([lengths[i] for share in step for i in share], ranks) <= max(q)
        runs = [[lengths[i] for i in share] for share in step]
        assert all(max(a) <= min(b) for a, b in zip(runs, runs[1:])), "each rank a run of the sorted batch"
    assert lb.padding_stats(plan, lengths).idle_fraction < lb.padding_stats(even, lengths).idle_fraction


def test_padding_stats_count_real_and_padded_frames():
    lengths = [3, 5, 2, 8, 4, 4]
    stats = lb.padding_stats([[[0, 1], [2, 3]], [[4], [5]]], lengths)
    assert stats.real == [[8, 10], [4, 4]] and stats.padded == [[10, 16], [4, 4]]
    assert stats.padding_fraction == pytest.approx(1 - 26 / 34)
    assert stats.slowest_frames == 16 + 4
    assert stats.idle_fraction == pytest.approx(6 / 40)  # rank 0 idles 16 - 10 of 2 × (16 + 4)


def test_collate_pads_with_zeros_and_masks_the_padding():
    samples = lb.synthetic_frames([3, 5], features=4, classes=7, seed=0)
    x, y, mask = lb.collate(samples)
    assert x.shape == (2, 5, 4) and y.shape == (2, 5) and mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    torch.testing.assert_close(x[0, :3], samples[0][0])
    torch.testing.assert_close(x[1], samples[1][0])
    assert x[0, 3:].abs().sum() == 0 and y[0, :3].tolist() == samples[0][1].tolist()
    with pytest.raises(ValueError, match="at least one sample"):
        lb.collate([])


def test_frame_loss_is_the_mean_over_real_frames_times_the_ranks():
    samples = lb.synthetic_frames([3, 5], features=4, classes=7, seed=0)
    x, y, mask = lb.collate(samples)
    logits = torch.randn(2, 5, 7)
    mean = torch.nn.functional.cross_entropy(torch.cat([logits[0, :3], logits[1]]), torch.cat([y[0, :3], y[1]]))
    torch.testing.assert_close(lb.frame_loss(logits, y, mask, global_frames=8), mean)
    torch.testing.assert_close(lb.frame_loss(logits, y, mask, global_frames=16, ranks=4), 2 * mean)


def test_the_encoder_ignores_padding():
    torch.manual_seed(0)
    model = bl.FrameEncoder(features=4, channels=8, classes=5)
    x, _ = lb.synthetic_frames([6], features=4, classes=5, seed=1)[0]
    alone = model(x[None], torch.ones(1, 6, dtype=torch.bool))
    padded = torch.cat([x, torch.zeros(9, 4)])[None]
    mask = torch.arange(15)[None] < 6
    torch.testing.assert_close(model(padded, mask)[:, :6], alone)


TINY = functools.partial(training.seeded, functools.partial(bl.FrameEncoder, features=4, channels=8, classes=5))


def both_wrappers(ctx, build, shares):
    """Worker: the step's averaged gradients with each of our data-parallel wrappers."""
    return {impl: lb.dp_step_gradients(ctx, build, shares, impl=impl) for impl in ("naive", "bucketed")}


def test_a_padded_data_parallel_step_equals_one_process_on_the_global_batch(cpu_tier):
    lengths = [7, 3, 12, 5, 9, 2, 6, 4]
    samples = lb.synthetic_frames(lengths, features=4, classes=5, seed=0)
    # Balanced over 2 ranks: 5 short utterances on rank 0, 3 long ones on rank 1, each padded to its own longest.
    [step] = lb.length_bucketed_batches(lengths, batch=8, ranks=2, balance_tokens=True)
    assert [len(share) for share in step] == [5, 3]
    shares = [[samples[i] for i in share] for share in step]
    reference = lb.single_step_gradients(TINY, samples)
    for per_impl in run(both_wrappers, 2, TINY, shares, timeout=120):
        for grads in per_impl.values():
            assert grads.keys() == reference.keys()
            for name in reference:
                torch.testing.assert_close(grads[name], reference[name])


def test_dp_step_gradients_needs_one_share_per_rank(cpu_tier):
    samples = lb.synthetic_frames([3, 4, 5], features=4, classes=5)
    with pytest.raises(Exception, match="got 3 shares of the batch for 2 ranks"):
        run(lb.dp_step_gradients, 2, TINY, [[s] for s in samples], timeout=120)


def _record(batching, step, compute, blocked, step_s, real, padded):
    return {"batching": batching, "step": step, "ranks": 2, "samples": [2, 2], "compute_s": compute,
            "allreduce_s": blocked, "wait_s": [b - min(blocked) for b in blocked], "step_s": step_s,
            "real_frames": real, "padded_frames": padded}


def test_lengths_summary_ratios():
    records = [
        _record("random", 0, [1.0, 3.0], [2.1, 0.1], 3.2, [10, 20], [20, 40]),
        _record("random", 1, [2.0, 2.0], [0.1, 0.1], 2.2, [10, 10], [20, 20]),
        _record("bucketed", 0, [1.0, 1.0], [0.1, 0.1], 1.2, [18, 20], [20, 20]),
        _record("bucketed", 1, [1.5, 1.0], [0.1, 0.6], 1.6, [10, 10], [10, 20]),
    ]
    summary = bl.lengths_summary(records, stretches=2)
    r, b = summary["random"], summary["bucketed"]
    assert r["padding_fraction"] == pytest.approx(1 - 50 / 100) and b["padding_fraction"] == pytest.approx(1 - 58 / 70)
    assert r["wait_fraction"] == pytest.approx(2.0 / (2 * 5.4)) and b["wait_fraction"] == pytest.approx(0.5 / (2 * 2.8))
    assert r["idle_predicted"] == pytest.approx(20 / 120) and b["idle_predicted"] == pytest.approx(10 / 80)
    assert b["speedup"] == pytest.approx(5.4 / 2.8) and r["speedup"] == 1.0
    low, high = 2.2 / 1.6, 3.2 / 1.2  # the two stretches' ratios
    assert (b["speedup_q1"], b["speedup_q3"]) == pytest.approx((low + (high - low) / 4, low + 3 * (high - low) / 4))
    assert b["speedup_predicted"] == pytest.approx(60 / 40)
    assert b["steps_per_s"] == pytest.approx(2 / 2.8) and b["samples_per_s"] == pytest.approx(8 / 2.8)
    with pytest.raises(ValueError, match="no records of the baseline 'sorted'"):
        bl.lengths_summary(records, baseline="sorted", stretches=2)
    with pytest.raises(ValueError, match="cannot form 3 stretches"):
        bl.lengths_summary(records, stretches=3)


def test_bench_lengths_records_one_epoch_of_each_plan_through_the_cli(tmp_path, capsys, cpu_tier, monkeypatch):
    monkeypatch.setattr(bl, "bench_lengths", functools.partial(bl.bench_lengths, channels=16))  # a smaller model
    path, plot = tmp_path / "lengths.json", tmp_path / "lengths.png"
    assert cli.main(["bench", "lengths", "--samples", "64", "--batch", "8", "--json", str(path),
                     "--plot", str(plot)]) == 0
    records = json.loads(path.read_text())
    assert plot.stat().st_size > 10_000
    assert "bucketed " in capsys.readouterr().out
    lengths = lb.synthetic_lengths(64, 0, frames_per_second=bl.FRAMES_PER_SECOND)
    for name, plan in bl.plans(lengths, 8, 2).items():
        rs = [r for r in records if r["batching"] == name]
        stats = lb.padding_stats(plan, lengths)
        assert [r["step"] for r in rs] == list(range(8))
        assert [r["real_frames"] for r in rs] == stats.real and [r["padded_frames"] for r in rs] == stats.padded
        assert [r["samples"] for r in rs] == [[len(s) for s in step] for step in plan]
        for r in rs:
            assert min(r["wait_s"]) == 0 and all(w >= 0 for w in r["wait_s"])
            assert r["step_s"] >= max(c + b for c, b in zip(r["compute_s"], r["allreduce_s"]))
    assert set(bl.lengths_summary(records)) == {"random", "bucketed", "balanced"}


@pytest.mark.parametrize("argv", [["--batch", "7"], ["--samples", "60", "--batch", "8"]])
def test_cli_bench_lengths_refuses_bad_sizes(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "lengths", *argv])
    assert info.value.code == 2 and "--batch must be even" in capsys.readouterr().err
