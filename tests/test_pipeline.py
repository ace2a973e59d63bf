"""A pipeline across processes (chapter 4.2): gradients equal the unsplit model's and
torch.distributed.pipelining's, in any process group, with any loss; 1F1B holds fewer
activations than GPipe; errors blame the right thing, on every rank, without hanging.

Every launch pins gloo: the references are computed on the CPU, and NCCL ranks would
compute on GPUs (where they exist) with other rounding.
"""
import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nanopar import models, pipeline_torch, schedules
from nanopar.bench import StepRecorder, measured_idle_fraction, pipeline_sweep
from nanopar.launch import RankError, run
from nanopar.model_split import even_split_points, split
from nanopar.pipeline import (build_stage, check_microbatches, execute, pipeline_step, pipeline_train,
                              stage_grads)
from nanopar.training import TrainConfig, full_batch_gradients, make_classification_data, seeded, train_single

MLP = functools.partial(seeded, functools.partial(models.mlp, 32, 8, in_features=12, out_features=5))
N_BLOCKS = 15  # 8 Linear layers with 7 ReLUs between them
BATCH = 16
MICROBATCHES = (1, 2, 4, 8)
CONFIGS = [(name, m) for name in ("naive", "gpipe", "1f1b") for m in MICROBATCHES]
gloo = functools.partial(run, backend="gloo", timeout=120)


def data(batch=BATCH, seed=0):
    return make_classification_data(batch, (12,), 5, seed=seed)


def assert_grads_equal(got, expected, what="", **tolerance):
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], msg=lambda msg: f"{what} {k}: {msg}", **tolerance)


def merged(per_stage):
    out = {}
    for grads in per_stage:
        assert not out.keys() & grads.keys()  # each parameter on one stage
        out.update(grads)
    return out


@pytest.fixture(scope="module")
def reference():
    x, y = data()
    return full_batch_gradients(MLP, x, y), F.cross_entropy(MLP()(x), y).item()


@pytest.fixture(scope="module", params=[2, 4], ids=lambda p: f"p{p}")
def sweep(request):
    """Every schedule and micro-batch count at p stages, measured, in one launch."""
    p = request.param
    x, y = data()
    per_rank = gloo(pipeline_sweep, p, MLP, even_split_points(N_BLOCKS, p), x, y, CONFIGS)
    return p, per_rank  # per_rank[stage][config index]


def test_gradients_and_loss_equal_the_unsplit_model(sweep, reference):
    p, per_rank = sweep
    grads, loss = reference
    for c, (name, m) in enumerate(CONFIGS):
        assert_grads_equal(merged(per_rank[s][c]["grads"] for s in range(p)), grads, f"{name}, m={m}")
        assert per_rank[-1][c]["loss"] == pytest.approx(loss, rel=1e-5)
        assert all(per_rank[s][c]["loss"] is None for s in range(p - 1))


def test_every_op_is_timed_in_schedule_order(sweep):
    p, per_rank = sweep
    for c, (name, m) in enumerate(CONFIGS):
        for stage in range(p):
            timings = per_rank[stage][c]["timings"]
            planned = schedules.stage_ops(schedules.make(name, p, m), stage)
            assert [(t.kind, t.microbatch) for t in timings] == [(o.kind, o.microbatch) for o in planned]
            assert all(0 <= t.start <= t.end and t.wait >= 0 for t in timings)
            assert all(a.end <= b.start for a, b in zip(timings, timings[1:]))  # one op at a time per rank
        step = [per_rank[s][c]["timings"] for s in range(p)]
        # One clock for all ranks: no op starts before the op whose result it receives ended.
        at = {(t.kind, s, t.microbatch): t for s in range(p) for t in step[s]}
        for (kind, s, j), t in at.items():
            before = at.get(("F", s - 1, j) if kind == "F" else ("B", s + 1, j))
            assert before is None or t.start >= before.end - 1e-3, (name, m, kind, s, j)
        assert min(t.start for rank in step for t in rank) >= 0  # counted from the earliest rank's start
        if name == "naive":  # one op at a time in the whole pipeline: every stage but one idles
            assert measured_idle_fraction(step) >= 1 - 1 / p - 0.02


def test_1f1b_holds_fewer_activations_than_gpipe(sweep):
    p, per_rank = sweep
    for key in ("peak_activation_bytes", "peak_stashed_bytes"):
        peak = {(name, m, s): per_rank[s][c][key] for c, (name, m) in enumerate(CONFIGS) for s in range(p)}
        for s in range(p):
            one = peak["naive", 8, s]  # naive holds one micro-batch at a time: 2 samples' worth
            assert one == pytest.approx(peak["naive", 1, s] / 8, rel=0.02)  # an eighth of the batch's
            assert peak["gpipe", 8, s] == 8 * one  # GPipe: all m micro-batches
            assert peak["1f1b", 8, s] == (p - s) * one  # 1F1B: at most p - s of them
        # with one micro-batch the three schedules are the same schedule
        assert len({peak[name, 1, 0] for name in ("naive", "gpipe", "1f1b")}) == 1


def _ours_and_torch(ctx, build, boundaries, x, y, m):
    names = ("gpipe", "1f1b")
    return ([pipeline_step(ctx, build, boundaries, x, y, name, m) for name in names],
            [pipeline_torch.pipeline_step(ctx, build, boundaries, x, y, name, m) for name in names])


def test_parity_with_torch_distributed_pipelining():
    x, y = data()
    per_rank = gloo(_ours_and_torch, 2, MLP, [8], x, y, 4)
    for i, name in enumerate(("gpipe", "1f1b")):
        # Same micro-batches, same order; PyTorch sums the micro-batch gradients and
        # divides by m at the end, we divide each loss by m first: equal up to rounding.
        for stage in range(2):
            assert_grads_equal(per_rank[stage][0][i]["grads"], per_rank[stage][1][i]["grads"], name)
        assert per_rank[1][0][i]["loss"] == pytest.approx(per_rank[1][1][i]["loss"], rel=1e-6)


def test_pipeline_training_equals_single_process_training():
    x, y = data(3 * BATCH)
    cfg = TrainConfig(steps=4, global_batch=BATCH, lr=0.3)
    reference = train_single(MLP, x, y, cfg)
    per_rank = gloo(pipeline_train, 2, MLP, [8], x, y, cfg, "1f1b", 4)
    assert_grads_equal({**per_rank[0]["state"], **per_rank[1]["state"]}, reference["state"])
    assert per_rank[1]["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    assert per_rank[0]["losses"] is None


# --- in any process group: the group alone says who the stages are -----------------------

def _two_pipelines(ctx, build, boundaries, batches):
    # Ranks {0, 2} and {1, 3}: not contiguous, so that stage numbers and global ranks differ.
    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    pipe = ctx.rank % 2
    group, (x, y) = groups[pipe], batches[pipe]
    stage = build_stage(build, boundaries, ctx.device, group)
    rec = StepRecorder()
    loss = execute(stage, schedules.make("1f1b", 2, 4), x, y, ctx.device, group, recorder=rec)
    return {"pipe": pipe, "stage": dist.get_rank(group), "grads": stage_grads(stage),
            "loss": None if loss is None else loss.item(), "ops": len(rec.result()["timings"])}


def test_two_pipelines_in_disjoint_subgroups_run_at_once():
    batches = [data(seed=1), data(seed=2)]
    per_rank = gloo(_two_pipelines, 4, MLP, [8], batches)
    assert [(r["pipe"], r["stage"]) for r in per_rank] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    for pipe, (x, y) in enumerate(batches):
        ranks = [r for r in per_rank if r["pipe"] == pipe]
        assert_grads_equal(merged(r["grads"] for r in ranks), full_batch_gradients(MLP, x, y), f"pipeline {pipe}")
        assert ranks[1]["loss"] == pytest.approx(F.cross_entropy(MLP()(x), y).item(), rel=1e-5)
        assert [r["ops"] for r in ranks] == [8, 8]


# --- a loss of the caller's choosing, and measuring only when asked ------------------------

VOCAB, WIDTH, SEQ = 11, 8, 5


def tiny_lm():
    """Token ids (batch, sequence) in, logits (batch, sequence, vocabulary) out."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(VOCAB, WIDTH), nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, VOCAB))


def token_cross_entropy(logits, targets):
    """A language model's loss: cross-entropy over (batch × sequence, vocabulary), a mean over tokens."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def tokens(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (8, SEQ), generator=g), torch.randint(0, VOCAB, (8, SEQ), generator=g)


def _with_and_without_recorder(ctx, build, boundaries, x, y, loss_fn):
    stage = build_stage(build, boundaries, ctx.device)
    out = []
    for rec in (None, StepRecorder()):
        stage.zero_grad(set_to_none=True)
        loss = execute(stage, schedules.make("1f1b", ctx.world_size, 4), x, y, ctx.device, loss_fn=loss_fn,
                       recorder=rec)
        out.append({"grads": stage_grads(stage), "loss": loss, "ops": rec and len(rec.result()["timings"])})
    return out


def test_a_language_model_loss_with_and_without_measuring():
    x, y = tokens()
    whole = tiny_lm()
    loss = token_cross_entropy(whole(x), y)
    loss.backward()
    expected = {n: p.grad for n, p in whole.named_parameters()}
    per_rank = gloo(_with_and_without_recorder, 2, tiny_lm, [2], x, y, token_cross_entropy)
    for i, what in enumerate(("without a recorder", "with a recorder")):
        assert_grads_equal(merged(per_rank[s][i]["grads"] for s in range(2)), expected, what)
        torch.testing.assert_close(per_rank[1][i]["loss"], loss.detach())  # returned as a tensor
        assert per_rank[0][i]["loss"] is None
    assert [per_rank[s][0]["ops"] for s in range(2)] == [None, None]
    assert [per_rank[s][1]["ops"] for s in range(2)] == [8, 8]


# --- stages built alone, and stages that start in place -----------------------------------

def mlp_stage_alone(boundaries, i):
    """Stage i's blocks, refusing to build any other stage (as a rank that cannot hold the model would)."""
    if i != dist.get_rank():
        raise AssertionError(f"rank {dist.get_rank()} was asked to build stage {i}")
    return split(MLP(), boundaries)[i]


def test_each_rank_can_build_only_its_own_stage(reference):
    x, y = data()
    grads, loss = reference
    per_rank = gloo(pipeline_step, 3, functools.partial(mlp_stage_alone, [4, 10]), None, x, y, "gpipe", 4)
    assert_grads_equal(merged(r["grads"] for r in per_rank), grads)
    assert per_rank[-1]["loss"] == pytest.approx(loss, rel=1e-5)


def in_place_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(inplace=True), nn.Linear(16, 16), nn.ReLU(inplace=True),
                         nn.Linear(16, 5))


RESNET = functools.partial(seeded, functools.partial(models.small_resnet, 5))


@pytest.mark.parametrize("build, boundaries, shape, config", [
    (in_place_mlp, [1, 3], (12,), ("1f1b", 4)),  # stages 1 and 2 start with ReLU(inplace=True)
    # torchvision's stem ReLU is in place; one micro-batch, so that BatchNorm sees the whole batch
    (RESNET, ["relu"], (3, 16, 16), ("gpipe", 1)),
], ids=["mlp", "resnet"])
def test_a_stage_may_start_with_an_in_place_op(build, boundaries, shape, config):
    resnet = build is RESNET
    x, y = make_classification_data(4 if resnet else BATCH, shape, 5)
    per_rank = gloo(pipeline_step, len(boundaries) + 1, build, boundaries, x, y, *config)
    # The ranks run one thread each and this process more: convolutions then sum in another order.
    tolerance = {"rtol": 1e-3, "atol": 1e-4} if resnet else {}
    assert_grads_equal(merged(r["grads"] for r in per_rank), full_batch_gradients(build, x, y), **tolerance)


# --- bad input: a clear error that blames the right thing, and nothing hangs ----------------

def test_micro_batch_count_must_divide_the_batch():
    assert check_microbatches(16, 4) == 4
    with pytest.raises(ValueError, match=r"3 micro-batches do not divide a batch of 16 evenly: use one of "
                                         r"\[1, 2, 4, 8, 16\]"):
        check_microbatches(16, 3)
    with pytest.raises(ValueError, match="32 micro-batches asked for but the batch has only 16 samples"):
        check_microbatches(16, 32)
    with pytest.raises(ValueError, match="positive integer"):
        check_microbatches(16, 0)


def _errors_of_every_stage(ctx, x, y, microbatches):
    """Each rank's error: first with the middle stage given no batch size, then with it."""
    stage = build_stage(MLP, [4, 10], ctx.device)
    ops = schedules.make("gpipe", ctx.world_size, microbatches)
    inputs = {0: (x, None), 1: (None, None), 2: (None, y)}[ctx.rank]
    messages = []
    for batch in (None, len(x)):
        try:
            execute(stage, ops, *inputs, ctx.device, batch=batch)
        except ValueError as e:
            messages.append(str(e))
    return messages


def test_every_stage_rejects_a_bad_micro_batch_count_at_once():
    # Stages 0 and 2 fail at once; the middle stage, which gets no data, must not wait for them
    # until the timeout: every rank checks before the first message.
    x, y = data()
    per_rank = run(_errors_of_every_stage, 3, x, y, 3, backend="gloo", timeout=60)
    bad_m = "3 micro-batches do not divide a batch of 16 evenly"
    assert [bad_m in first and bad_m in second for first, second in (per_rank[0], per_rank[2])] == [True, True]
    assert "it must be told the batch size: pass batch=" in per_rank[1][0]
    assert bad_m in per_rank[1][1]


def _mismatched():
    return nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(6, 5))


class Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom: a bug inside a block")


def _boom_in_stage_one():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 8), nn.ReLU(), Boom(), nn.Linear(8, 5))


def test_a_mismatched_split_is_named_and_other_errors_pass_through():
    x, y = data()
    # Rank 0 is left waiting for a gradient that never comes: it must be stopped, not hang.
    with pytest.raises(RankError, match=r"rank 1 failed: ValueError: stage 1 \(blocks 2\) cannot take stage 0's "
                                        r"output, an activation of shape \(8, 8\) \(its first Linear layer takes 6 "
                                        r"features in the last dimension"):
        run(pipeline_step, 2, _mismatched, [2], x, y, "1f1b", 2, backend="gloo", timeout=60)
    with pytest.raises(RankError, match=r"rank 1 failed: RuntimeError: boom: a bug inside a block") as info:
        run(pipeline_step, 2, _boom_in_stage_one, [2], x, y, "1f1b", 2, backend="gloo", timeout=60)
    assert "do not fit" not in str(info.value) and "in forward" in info.value.traceback


def test_wrong_rank_count_is_a_clear_error():
    x, y = data()
    with pytest.raises(RankError, match=r"1 split points make 2 stages but the pipeline has 3 ranks"):
        run(pipeline_step, 3, MLP, [8], x, y, "1f1b", 2, backend="gloo", timeout=60)
