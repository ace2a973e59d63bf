"""Hybrid training (chapter 4, hybrid training): DP × PP × TP on a grid equals single-process training.

Every launch pins gloo, so that ranks compute on the CPU like the references. The GPT
runs on up to 8 ranks: on a 2-core machine they are oversubscribed (slow, not wrong).
"""
import functools

import pytest
import torch
import torch.distributed as dist
from torch import nn

from nanopar import hybrid, models, schedules
from nanopar.grid import Grid, Topology
from nanopar.launch import RankError, run
from nanopar.tensor_parallel import parallelize_gpt
from nanopar.text import CharTokenizer, get_batch, load_corpus
from nanopar.training import TrainConfig, make_pattern_images, seeded

gloo = functools.partial(run, backend="gloo", timeout=180)

TOKENIZER = CharTokenizer(load_corpus())
GPT = models.GPTConfig(vocab_size=TOKENIZER.vocab_size, block_size=16, n_layer=2, n_head=4, n_embd=64)
BUILD_GPT = functools.partial(seeded, functools.partial(models.gpt, GPT))
RESNET = functools.partial(seeded, functools.partial(models.resnet50, 10))


def gpt_data(samples=16, seed=0):
    tokens = TOKENIZER.encode(load_corpus()[:20_000])
    return get_batch(tokens, samples, GPT.block_size, torch.Generator().manual_seed(seed))


def train_gpt(topo, cfg, microbatches=2, schedule="1f1b"):
    x, y = gpt_data()
    per_rank = gloo(hybrid.train_hybrid, topo.world_size, topo, BUILD_GPT, hybrid.gpt_boundaries(GPT, topo.pp),
                    x, y, cfg, kwargs={"microbatches": microbatches, "schedule": schedule,
                                       "loss_fn": models.gpt_loss, "shard": parallelize_gpt})
    reference = hybrid.single_process_reference(BUILD_GPT, x, y, cfg, topo, microbatches, loss_fn=models.gpt_loss)
    return per_rank, reference


def assert_same_training(per_rank, reference, topo, **tolerance):
    last = [r for r in per_rank if r["coords"].pp == topo.pp - 1]
    assert all(r["losses"] is None for r in per_rank if r["coords"].pp != topo.pp - 1)
    for r in last:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(reference["losses"]).float(), **tolerance)
    merged = hybrid.merge_parameters([r["params"] for r in per_rank])
    assert merged.keys() == reference["params"].keys()
    for k in merged:
        torch.testing.assert_close(merged[k], reference["params"][k], msg=lambda m, k=k: f"{k}: {m}", **tolerance)
    return merged


# --- DP × PP: the split ResNet50 -----------------------------------------------------------

def test_dp_x_pp_resnet50_equals_one_process_with_the_same_microbatches():
    # BatchNorm (training mode) normalises each micro-batch, so the reference accumulates the
    # same dp·m micro-batches in order (hybrid.single_process_reference), on one thread as the
    # ranks compute. With one micro-batch per replica both add the replicas' gradients in the
    # same order, and they agree to the last bit over several steps. (With m > 1 each replica
    # first sums its own micro-batches: one rounding of difference, which BatchNorm over a few
    # samples at 1×1, ResNet50's last layers on 32×32 images, amplifies ~10^4-fold in a step.
    # The GPT's tests cover m > 1.)
    microbatches, steps = 1, 2
    topo = Topology(dp=2, pp=2)
    x, y = make_pattern_images(16, 10, size=32)
    cfg = TrainConfig(steps=steps, global_batch=8, lr=0.002)
    per_rank = gloo(hybrid.train_hybrid, 4, topo, RESNET, ["layer2"], x, y, cfg,
                    kwargs={"microbatches": microbatches})
    [reference] = gloo(hybrid.reference_worker, 1, RESNET, x, y, cfg, topo, microbatches)
    merged = assert_same_training(per_rank, reference, topo)
    assert any(k.startswith("layer1.") for k in merged) and any(k.startswith("layer4.") for k in merged)
    stage_of = {k: r["coords"].pp for r in per_rank for k in r["params"]}
    assert stage_of["conv1.weight"] == 0 and stage_of["fc.weight"] == 1  # the article's cut


# --- the GPT on every shape of 2 and 4 ranks, and on 2 × 2 × 2 ----------------------------

SHAPES = [(2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 1, 2), (1, 2, 2), (2, 2, 1), (2, 2, 2)]


@pytest.mark.parametrize("dp,pp,tp", SHAPES, ids=lambda s: str(s))
def test_gpt_on_every_grid_equals_one_process_with_sgd(dp, pp, tp):
    topo = Topology(dp, pp, tp)
    per_rank, reference = train_gpt(topo, TrainConfig(steps=3, global_batch=8, lr=0.5))
    assert reference["losses"][-1] < reference["losses"][0]  # it learns: the comparison is not of idle weights
    assert_same_training(per_rank, reference, topo)


def test_gpt_on_a_grid_in_another_axis_order_equals_one_process():
    # DP outermost: the DP groups are strided, the pipelines pairs of neighbours.
    topo = Topology(2, 2, 1, order=("dp", "pp", "tp"))
    assert topo.groups("dp") == [(0, 2), (1, 3)] and topo.groups("pp") == [(0, 1), (2, 3)]
    per_rank, reference = train_gpt(topo, TrainConfig(steps=2, global_batch=8, lr=0.5), schedule="gpipe")
    assert_same_training(per_rank, reference, topo)


def test_gpt_with_adam_agrees_within_a_stated_tolerance():
    # Adam divides by the root of the squared gradients' average: where a gradient is near zero,
    # a rounding difference in it becomes a visible difference in the step.
    topo = Topology(2, 1, 2)
    per_rank, reference = train_gpt(topo, TrainConfig(steps=3, global_batch=8, lr=1e-3, optimizer="adam"))
    assert_same_training(per_rank, reference, topo, rtol=1e-3, atol=1e-4)


def _collectives_of_a_one_rank_grid(ctx, cfg):
    # Every group of a 1 × 1 × 1 grid has one rank: a technique that communicated anyway would
    # show up here. comm keeps its own reference to the all-gather, so it is watched too.
    from nanopar import comm
    watched = {name: getattr(dist, name) for name in ("all_reduce", "broadcast", "all_gather", "send", "isend",
                                                      "recv", "irecv", "barrier")}
    calls = []
    for name, fn in watched.items():
        setattr(dist, name, functools.partial(lambda fn, name, *a, **k: calls.append(name) or fn(*a, **k), fn, name))
    gather = comm._all_gather_single
    comm._all_gather_single = lambda *a, **k: calls.append("all_gather_single") or gather(*a, **k)
    try:
        x, y = gpt_data()
        result = hybrid.train_hybrid(ctx, Topology(), BUILD_GPT, [], x, y, cfg, microbatches=2,
                                     loss_fn=models.gpt_loss, shard=parallelize_gpt)
    finally:
        for name, fn in watched.items():
            setattr(dist, name, fn)
        comm._all_gather_single = gather
    return calls, result


def test_every_axis_of_degree_one_communicates_nothing():
    cfg = TrainConfig(steps=2, global_batch=8, lr=0.5)
    [(calls, result)] = gloo(_collectives_of_a_one_rank_grid, 1, cfg)
    assert calls == []
    reference = hybrid.single_process_reference(BUILD_GPT, *gpt_data(), cfg, Topology(), 2, loss_fn=models.gpt_loss)
    assert_same_training([result], reference, Topology())


# --- evaluation: the pipeline forward only --------------------------------------------------

def _evaluates(ctx, topo):
    grid = Grid(topo)
    model = hybrid.build_hybrid(BUILD_GPT, hybrid.gpt_boundaries(GPT, topo.pp), grid, ctx.device, parallelize_gpt)
    x, y = gpt_data(8, seed=1)
    ops = schedules.make("1f1b", topo.pp, 2)
    loss = hybrid.evaluate(model, grid, ops, x, y, ctx.device, models.gpt_loss)
    grads = [p.grad for p in model.parameters()]
    return loss, all(g is None for g in grads), hybrid.unwrap(model).training


def test_evaluation_runs_the_pipeline_forward_only_and_equals_the_whole_model():
    topo = Topology(2, 2, 1)
    x, y = gpt_data(8, seed=1)
    with torch.no_grad():
        expected = models.gpt_loss(BUILD_GPT()(x), y).item()
    for r, (loss, no_grads, training) in enumerate(gloo(_evaluates, 4, topo)):
        assert no_grads and training  # nothing for a backward; train mode restored
        if topo.coords(r).pp == 1:
            assert loss == pytest.approx(expected, rel=1e-5)
        else:
            assert loss is None


# --- bad input, and a failing rank ----------------------------------------------------------

def test_bad_shapes_are_clear_errors_before_any_rank_starts():
    with pytest.raises(ValueError, match=r"2 layers do not split evenly into 4 pipeline stages: choose pp among \[1, 2\]"):
        hybrid.gpt_boundaries(GPT, 4)
    assert hybrid.gpt_boundaries(models.GPTConfig(n_layer=4), 2) == ["h2"]
    assert hybrid.gpt_boundaries(GPT, 1) == []
    with pytest.raises(ValueError, match="a global batch of 6 does not split over dp = 4 replicas"):
        hybrid.check_batch(6, Topology(dp=4), 1)
    with pytest.raises(ValueError, match="3 micro-batches do not divide a batch of 4"):
        hybrid.check_batch(8, Topology(dp=2), 3)
    with pytest.raises(ValueError, match="2 × 2 × 2 = 8 ranks, but the world has 4"):
        Topology(2, 2, 2).check_world(4)


def test_bad_grids_fail_on_every_rank_with_the_fix():
    x, y = gpt_data()
    cfg = TrainConfig(steps=1, global_batch=8)
    with pytest.raises(RankError, match=r"2 × 2 × 2 = 8 ranks, but the world has 2"):
        gloo(hybrid.train_hybrid, 2, Topology(2, 2, 2), BUILD_GPT, ["h1"], x, y, cfg, timeout=60)
    three_heads = functools.partial(seeded, functools.partial(models.gpt, models.GPTConfig(n_head=3, n_embd=48)))
    with pytest.raises(RankError, match="has 3 heads: use a tensor-parallel degree in"):
        gloo(hybrid.train_hybrid, 2, Topology(1, 1, 2), three_heads, [], x, y, cfg,
             kwargs={"shard": parallelize_gpt}, timeout=60)
    with pytest.raises(RankError, match="tp = 2 needs a way to shard the stage: pass shard="):
        gloo(hybrid.train_hybrid, 2, Topology(1, 1, 2), BUILD_GPT, [], x, y, cfg, timeout=60)


def _fails_on_rank_3():
    if dist.get_rank() == 3:
        raise RuntimeError("rank 3 cannot build its model")
    return BUILD_GPT()


def test_a_rank_failing_alone_reaches_the_caller_without_a_hang():
    # The other ranks wait in the grid's collectives for rank 3; the caller must hear of rank 3.
    x, y = gpt_data()
    with pytest.raises(RankError, match="rank 3 cannot build its model") as info:
        gloo(hybrid.train_hybrid, 4, Topology(2, 2, 1), _fails_on_rank_3, ["h1"], x, y,
             TrainConfig(steps=1, global_batch=8), kwargs={"loss_fn": models.gpt_loss}, timeout=60)
    assert info.value.rank == 3


class _NudgedOnRank1(nn.Linear):
    """A first layer whose copy on rank 1 moves in its second forward, as a rank-local bug would."""

    calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 2 and dist.get_rank() == 1:
            with torch.no_grad():
                self.bias.add_(0.01)
        return super().forward(x)


def _drifting_mlp():
    return nn.Sequential(_NudgedOnRank1(12, 16), nn.ReLU(), nn.Linear(16, 5))


@pytest.mark.parametrize("check_every", [0, 1])
def test_replicas_that_drift_apart_stop_every_rank_of_the_grid(check_every):
    # 2 replicas x 2 stages: ranks 0 and 1 hold stage 0; rank 1's copy moves in step 2.
    x, y = torch.randn(24, 12, generator=torch.Generator().manual_seed(0)), torch.arange(24) % 5
    cfg = TrainConfig(steps=3, global_batch=8, lr=0.1, check_every=check_every)
    args = (hybrid.train_hybrid, 4, Topology(2, 2, 1), functools.partial(seeded, _drifting_mlp), [2], x, y, cfg)
    if not check_every:  # off by default: training ends, and only merging the replicas notices
        with pytest.raises(ValueError, match="rank 1's '0.bias' differs from another rank's copy"):
            hybrid.merge_parameters([r["params"] for r in gloo(*args, timeout=60)])
        return
    with pytest.raises(RankError) as info:
        gloo(*args, timeout=60)
    said = str(info.value)
    assert "after step 2, rank 1's replica differs from rank 0's (first: '0.bias', 1 of 2" in said
    # Every rank stopped with the same message: none waits for a peer that has stopped.
    assert {info.value.rank, *info.value.others} == {0, 1, 2, 3}
    assert len(set(info.value.others.values())) == 1
