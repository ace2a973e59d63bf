"""A pipeline across processes (chapter 4.2): gradients equal the unsplit model's and
torch.distributed.pipelining's; 1F1B holds fewer activations than GPipe; errors are clear."""
import functools

import pytest
import torch
from torch import nn

from nanopar import models, schedules
from nanopar.launch import RankError, run
from nanopar.model_split import even_split_points
from nanopar.bench import measured_idle_fraction, time_budget
from nanopar.pipeline import (OpTiming, check_microbatches, pipeline_step, pipeline_sweep, pipeline_train,
                              torch_pipeline_step)
from nanopar.training import TrainConfig, full_batch_gradients, make_classification_data, seeded, train_single

MLP = functools.partial(seeded, functools.partial(models.mlp, 32, 8, in_features=12, out_features=5))
N_BLOCKS = 15  # 8 Linear layers with 7 ReLUs between them
BATCH = 16
MICROBATCHES = (1, 2, 4, 8)
CONFIGS = [(name, m) for name in ("naive", "gpipe", "1f1b") for m in MICROBATCHES]


def data():
    return make_classification_data(BATCH, (12,), 5)


@pytest.fixture(scope="module")
def reference():
    x, y = data()
    model = MLP()
    loss = torch.nn.functional.cross_entropy(model(x), y).item()
    return full_batch_gradients(MLP, x, y), loss


@pytest.fixture(scope="module", params=[2, 4], ids=lambda p: f"p{p}")
def sweep(request):
    """Every schedule and micro-batch count at p stages, in one launch."""
    p = request.param
    x, y = data()
    per_rank = run(pipeline_sweep, p, MLP, even_split_points(N_BLOCKS, p), x, y, CONFIGS, timeout=120)
    return p, per_rank  # per_rank[stage][config index]


def test_gradients_and_loss_equal_the_unsplit_model(sweep, reference):
    p, per_rank = sweep
    grads, loss = reference
    for c, (name, m) in enumerate(CONFIGS):
        got = {}
        for stage in range(p):
            assert not got.keys() & per_rank[stage][c]["grads"].keys()  # each parameter on one stage
            got.update(per_rank[stage][c]["grads"])
        assert got.keys() == grads.keys()
        for k in grads:
            torch.testing.assert_close(got[k], grads[k], msg=lambda msg: f"{name}, m={m}, {k}: {msg}")
        assert per_rank[-1][c]["loss"] == pytest.approx(loss, rel=1e-5)
        assert all(per_rank[s][c]["loss"] is None for s in range(p - 1))


def test_every_op_is_timed_in_schedule_order(sweep):
    p, per_rank = sweep
    for c, (name, m) in enumerate(CONFIGS):
        for stage in range(p):
            timings = per_rank[stage][c]["timings"]
            planned = schedules.stage_ops(schedules.make(name, p, m), stage)
            assert [(t.kind, t.microbatch) for t in timings] == [(o.kind, o.microbatch) for o in planned]
            assert all(isinstance(t, OpTiming) and 0 <= t.start <= t.end and t.wait >= 0 for t in timings)
            assert all(a.end <= b.start for a, b in zip(timings, timings[1:]))  # one op at a time per rank
        step = [per_rank[s][c]["timings"] for s in range(p)]
        assert 0 <= measured_idle_fraction(step) < 1
        # One clock for all ranks: no op starts before the op whose result it receives ended.
        at = {(t.kind, s, t.microbatch): t for s in range(p) for t in step[s]}
        for (kind, s, j), t in at.items():
            before = at.get(("F", s - 1, j) if kind == "F" else ("B", s + 1, j))
            assert before is None or t.start >= before.end - 1e-3, (name, m, kind, s, j)
        assert 0 <= min(t.start for rank in step for t in rank) < 0.01  # counted from the earliest rank


def test_1f1b_holds_fewer_activations_than_gpipe(sweep):
    p, per_rank = sweep
    for key in ("peak_activation_bytes", "peak_stashed_bytes"):
        peak = {(name, m, s): per_rank[s][c][key] for c, (name, m) in enumerate(CONFIGS) for s in range(p)}
        _check_peaks(peak, p)


def _check_peaks(peak, p):
    for s in range(p):
        one = peak["naive", 8, s]  # naive holds one micro-batch at a time: one micro-batch's worth
        assert one > 0
        assert peak["gpipe", 8, s] == 8 * one  # GPipe: all m micro-batches
        assert peak["1f1b", 8, s] == (p - s) * one  # 1F1B: at most p - s of them
        assert peak["1f1b", 8, s] < peak["gpipe", 8, s]
    # with one micro-batch the three schedules are the same schedule
    assert len({peak[name, 1, 0] for name in ("naive", "gpipe", "1f1b")}) == 1


def _ours_and_torch(ctx, build, boundaries, x, y, m):
    names = ("gpipe", "1f1b")
    ours = pipeline_sweep(ctx, build, boundaries, x, y, [(name, m) for name in names])
    return ours, [torch_pipeline_step(ctx, build, boundaries, x, y, name, m) for name in names]


def test_parity_with_torch_distributed_pipelining():
    x, y = data()
    m, boundaries = 4, [8]
    per_rank = run(_ours_and_torch, 2, MLP, boundaries, x, y, m, timeout=120)
    for i, name in enumerate(("gpipe", "1f1b")):
        for stage in range(2):
            a, b = per_rank[stage][0][i], per_rank[stage][1][i]
            assert a["grads"].keys() == b["grads"].keys()
            for k in a["grads"]:
                # Same micro-batches, same order; PyTorch sums the micro-batch gradients and
                # divides by m at the end, we divide each loss by m first: equal up to rounding.
                torch.testing.assert_close(a["grads"][k], b["grads"][k], msg=lambda msg: f"{name} {k}: {msg}")
        assert per_rank[1][0][i]["loss"] == pytest.approx(per_rank[1][1][i]["loss"], rel=1e-6)


def test_pipeline_training_equals_single_process_training():
    x, y = make_classification_data(3 * BATCH, (12,), 5)
    cfg = TrainConfig(steps=4, global_batch=BATCH, lr=0.3)
    reference = train_single(MLP, x, y, cfg)
    per_rank = run(pipeline_train, 2, MLP, [8], x, y, cfg, "1f1b", 4, timeout=120)
    state = {**per_rank[0]["state"], **per_rank[1]["state"]}
    assert state.keys() == reference["state"].keys()
    for k in state:
        torch.testing.assert_close(state[k], reference["state"][k], msg=lambda msg: f"{k}: {msg}")
    assert per_rank[1]["losses"] == pytest.approx(reference["losses"], rel=1e-5)


# --- bad input: a clear error that says what to change, and nothing hangs -----------------

def test_micro_batch_count_must_divide_the_batch():
    assert check_microbatches(16, 4) == 4
    with pytest.raises(ValueError, match=r"3 micro-batches do not divide a batch of 16 evenly: use one of "
                                         r"\[1, 2, 4, 8, 16\]"):
        check_microbatches(16, 3)
    with pytest.raises(ValueError, match="32 micro-batches asked for but the batch has only 16 samples"):
        check_microbatches(16, 32)
    with pytest.raises(ValueError, match="positive integer"):
        check_microbatches(16, 0)
    x, y = data()
    with pytest.raises(RankError, match="3 micro-batches do not divide a batch of 16"):
        run(pipeline_step, 2, MLP, [8], x, y, "gpipe", 3, timeout=60)


def _bad_model():
    return nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(6, 5))


def test_mismatched_stage_shapes_and_wrong_rank_count_are_clear_errors():
    x, y = data()
    # Rank 0 is left waiting for a gradient that never comes: it must be stopped, not hang.
    with pytest.raises(RankError, match=r"rank 1 failed: ValueError: stage 1 \(blocks 2\) cannot take stage 0's "
                                        r"output, an activation of shape \(8, 8\)"):
        run(pipeline_step, 2, _bad_model, [2], x, y, "1f1b", 2, timeout=60)
    with pytest.raises(RankError, match=r"1 split points make 2 stages but 3 ranks were started"):
        run(pipeline_step, 3, MLP, [8], x, y, "1f1b", 2, timeout=60)


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
