"""Data parallelism (chapters 3.1 and 4.1): every result equals the single-process one,
and our implementations equal PyTorch's DistributedDataParallel."""
import contextlib
import functools
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nanopar import models
from nanopar.data_parallel import BucketedDataParallel, NaiveDataParallel, check_same_parameters
from nanopar.launch import RankError, run
from nanopar.sharding import ShardSampler, split_batch
from nanopar.training import (IMPLS, TrainConfig, averaged_gradients, full_batch_gradients, global_batches,
                              make_classification_data, seeded, train_data_parallel, train_single)

MLP = functools.partial(models.mlp, 32, 3, in_features=12, out_features=5)
RESNET = functools.partial(models.small_resnet, 5)
GLOO = {"backend": "gloo", "timeout": 120}  # CPU ranks on every tier (no NCCL on a GPU machine)


def _seeded(build):
    return functools.partial(seeded, build)


def assert_states_close(a, b, **tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol, msg=lambda m: f"{k}: {m}")


def _wrapped(impl, module, find_unused=False):
    if impl == "naive":
        return NaiveDataParallel(module, find_unused_parameters=find_unused)
    return BucketedDataParallel(module, bucket_cap_mb=1e-3, find_unused_parameters=find_unused)  # several buckets


# --- the gradient of N ranks equals the full-batch gradient ------------------------------

@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_averaged_mlp_gradient_equals_full_batch_gradient(world_size):
    x, y = make_classification_data(12, (12,), 5)
    torch.manual_seed(0)
    reference = full_batch_gradients(MLP, x, y)
    for impl in ("naive", "bucketed"):
        # bucket_cap_mb small enough for several buckets
        per_rank = run(averaged_gradients, world_size, _seeded(MLP), x, y,
                       TrainConfig(impl=impl, bucket_cap_mb=0.002), **GLOO)
        for grads in per_rank:
            assert_states_close(grads, reference)


@pytest.mark.parametrize("world_size", [2, 4])
def test_resnet_gradient_needs_synchronised_batchnorm(world_size):
    x, y = make_classification_data(8, (3, 16, 16), 5)
    reference = full_batch_gradients(_seeded(RESNET), x, y)
    synced = run(averaged_gradients, world_size, _seeded(RESNET), x, y, TrainConfig(sync_batchnorm=True), **GLOO)
    assert_states_close(synced[0], reference, rtol=1e-4, atol=1e-5)
    # With per-rank statistics (DDP's default) the gradient is not the full-batch one.
    local = run(averaged_gradients, world_size, _seeded(RESNET), x, y, TrainConfig(sync_batchnorm=False), **GLOO)
    worst = max((local[0][k] - reference[k]).abs().max().item() for k in reference)
    assert worst > 1e-3


# --- training equals the single process, and DDP -----------------------------------------

@pytest.mark.parametrize("world_size", [1, 2, 3])  # 4 ranks train in test_data_parallel_groups_run_side_by_side
def test_sgd_training_equals_single_process_and_ddp(world_size):
    x, y = make_classification_data(48, (12,), 5)
    base = TrainConfig(steps=4, global_batch=12, lr=0.2, bucket_cap_mb=0.002)
    reference = train_single(_seeded(MLP), x, y, base)["state"]
    finals = {}
    for impl in IMPLS:
        finals[impl] = run(train_data_parallel, world_size, _seeded(MLP), x, y, replace(base, impl=impl), **GLOO)
        for rank_result in finals[impl]:  # every replica ends identical to the reference
            assert_states_close(rank_result["state"], reference)
    assert_states_close(finals["bucketed"][0]["state"], finals["ddp"][0]["state"])


def test_adam_training_equals_single_process_within_tolerance():
    x, y = make_classification_data(48, (12,), 5)
    cfg = TrainConfig(steps=4, global_batch=12, lr=0.01, optimizer="adam")
    reference = train_single(_seeded(MLP), x, y, cfg)["state"]
    for result in run(train_data_parallel, 3, _seeded(MLP), x, y, cfg, **GLOO):
        # Adam divides by sqrt(v): where gradients are near zero, summation-order
        # differences of 1e-7 grow to about 1e-5 in the parameters.
        assert_states_close(result["state"], reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["bucketed", "ddp"])
def test_accumulation_equals_one_step_on_the_larger_batch(impl):
    x, y = make_classification_data(64, (12,), 5)
    big = TrainConfig(steps=2, global_batch=32, lr=0.2, impl=impl)
    reference = train_single(_seeded(MLP), x, y, big)["state"]
    for result in run(train_data_parallel, 2, _seeded(MLP), x, y, replace(big, accumulate=4), **GLOO):
        assert_states_close(result["state"], reference)


# --- the rules of a step: the same in both wrappers ---------------------------------------

ACCUMULATION_PATTERNS = ("all but the last in no_sync", "all in no_sync, then sync", "none in no_sync")


@pytest.fixture(scope="module")
def accumulated():
    """Two micro-batches per rank in each pattern, both wrappers, with and without
    find_unused_parameters (one launch for several tests); and the full-batch gradient."""
    x, y = make_classification_data(8, (12,), 5)
    return run(_accumulate, 2, x, y, **GLOO)[0], full_batch_gradients(_seeded(MLP), x, y)


def _accumulate(ctx, x, y):
    micro = list(zip(split_batch(x, ctx.rank, 2).chunk(2), split_batch(y, ctx.rank, 2).chunk(2)))
    out = {}
    for impl in ("naive", "bucketed"):
        for pattern in ACCUMULATION_PATTERNS:
            for find_unused in (False, True):
                model = _wrapped(impl, _seeded(MLP)(), find_unused)
                try:
                    for i, (xm, ym) in enumerate(micro):
                        inside = pattern == ACCUMULATION_PATTERNS[1] or (pattern == ACCUMULATION_PATTERNS[0] and i == 0)
                        with model.no_sync() if inside else contextlib.nullcontext():
                            (F.cross_entropy(model(xm), ym) / len(micro)).backward()
                    model.sync_gradients()
                    out[impl, pattern, find_unused] = {n: p.grad for n, p in model.module.named_parameters()}
                except RuntimeError as e:
                    out[impl, pattern, find_unused] = str(e)
    return out


@pytest.mark.parametrize("pattern", ACCUMULATION_PATTERNS[:2])
def test_accumulated_gradients_are_averaged_whichever_backward_communicates(accumulated, pattern):
    out, reference = accumulated
    for impl in ("naive", "bucketed"):
        for find_unused in (False, True):
            got = out[impl, pattern, find_unused]
            assert isinstance(got, dict), f"{impl}, find_unused_parameters={find_unused}: {got}"
            assert_states_close(got, reference)


def test_two_backward_passes_outside_no_sync_are_an_error_in_both_wrappers(accumulated):
    out, _ = accumulated
    for impl in ("naive", "bucketed"):
        for find_unused in (False, True):
            said = out[impl, "none in no_sync", find_unused]
            assert isinstance(said, str), f"{impl} gave gradients instead of an error"
            assert "got a second gradient in one step outside no_sync()" in said
            assert "run all but the last inside `with model.no_sync():`" in said


class _SometimesSkipped(nn.Module):
    """``maybe`` is skipped where ``skip`` is set, as a data-dependent branch might be."""

    def __init__(self):
        super().__init__()
        self.used, self.maybe = nn.Linear(4, 2), nn.Linear(4, 2)
        self.skip = False

    def forward(self, x):
        out = self.used(x)
        return out if self.skip else out + self.maybe(x)


def _local_gradients(rank):
    net = _seeded(_SometimesSkipped)()
    net.skip = rank == 1
    net(torch.arange(12.0).view(3, 4) / (rank + 1)).square().sum().backward()
    return net


def _skipped_on_rank_1(ctx):
    out = {}
    for impl in ("naive", "bucketed"):
        for find_unused in (False, True):
            model = _wrapped(impl, _seeded(_SometimesSkipped)(), find_unused)
            model.module.skip = ctx.rank == 1
            model(torch.arange(12.0).view(3, 4) / (ctx.rank + 1)).square().sum().backward()
            try:
                model.sync_gradients()
                out[impl, find_unused] = {n: p.grad for n, p in model.module.named_parameters()}
            except RuntimeError as e:
                out[impl, find_unused] = str(e)
    return out


def test_unused_parameters_are_an_error_on_every_rank_or_averaged_as_zeros():
    # Only rank 1 skips `maybe`: every rank must raise at once (no rank left waiting in a
    # collective until the timeout), naming the parameters and the rank.
    per_rank = run(_skipped_on_rank_1, 2, backend="gloo", timeout=60)
    nets = [_local_gradients(rank) for rank in (0, 1)]
    reference = {n: (p.grad + (q.grad if q.grad is not None else 0)) / 2
                 for (n, p), q in zip(nets[0].named_parameters(), nets[1].parameters())}
    for out in per_rank:
        for impl in ("naive", "bucketed"):
            said = out[impl, False]
            assert isinstance(said, str), f"{impl}: no error"
            assert "rank 1: ['maybe.weight', 'maybe.bias']" in said and "find_unused_parameters=True" in said
            assert_states_close(out[impl, True], reference)


def test_bucketed_steps_without_unused_parameters_gather_nothing_extra():
    # The unused-parameter count rides in the last bucket's all-reduce: a step whose
    # parameters all got gradients issues the bucket all-reduces and nothing else.
    assert run(_gathers_per_step, 2, backend="gloo", timeout=60) == [0, 0]


def _gathers_per_step(ctx):
    import nanopar.data_parallel as dp

    gathers = []
    real = dp.all_gather_single
    dp.all_gather_single = lambda *a, **k: (gathers.append(1), real(*a, **k))[1]
    model = BucketedDataParallel(MLP(), bucket_cap_mb=0.001)
    gathers.clear()  # construction compares the replicas' fingerprints once
    for _ in range(3):
        F.cross_entropy(model(torch.randn(4, 12)), torch.randint(0, 5, (4,))).backward()
        model.sync_gradients()
    return len(gathers)


def test_different_starting_parameters_are_detected():
    with pytest.raises(RankError, match="rank 1 starts from different parameters than rank 0"):
        run(_different_replicas, 2, backend="gloo", timeout=60)


def _different_replicas(ctx):
    torch.manual_seed(ctx.rank)
    BucketedDataParallel(MLP(), broadcast=False)


# --- buckets: dtypes, layouts, order -------------------------------------------------------

class _Awkward(nn.Module):
    """A channels_last convolution, a float64 layer between float32 ones, and a zero-size
    parameter registered last (so first in the buckets' initial order)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
        self.hidden = nn.Linear(4 * 6 * 6, 16, dtype=torch.float64)
        self.head = nn.Linear(16, 5)
        self.empty = nn.Parameter(torch.zeros(0))

    def forward(self, x):
        h = self.hidden(self.conv(x).relu().flatten(1).double()).relu().float()
        return self.head(h) + self.empty.sum()


def test_mixed_dtypes_channels_last_and_empty_parameters():
    x, y = make_classification_data(16, (3, 8, 8), 5)
    cfg = TrainConfig(steps=2, global_batch=8, lr=0.1)  # 25 MB: every float32 gradient in one bucket
    reference = full_batch_gradients(_seeded(_Awkward), x[:8], y[:8])
    for grads in run(averaged_gradients, 2, _seeded(_Awkward), x[:8], y[:8], cfg, **GLOO):
        assert_states_close(grads, reference)
        assert grads["conv.weight"].stride() == reference["conv.weight"].stride() == (27, 1, 9, 3)
    trained = train_single(_seeded(_Awkward), x, y, cfg)["state"]
    for result in run(train_data_parallel, 2, _seeded(_Awkward), x, y, cfg, **GLOO):
        assert_states_close(result["state"], trained)


class _LateRegistered(nn.Module):
    """Registered a, p, q, b, first; used first, a, p and q, b: registration order is not
    the order in which gradients arrive."""

    def __init__(self):
        super().__init__()
        self.a, self.p, self.q, self.b = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.first = nn.Linear(4, 4)

    def forward(self, x):
        h = self.a(self.first(x)).relu()
        # Odd ranks add in the other order, so their p and q gradients arrive the other way round.
        odd = dist.is_initialized() and dist.get_rank() % 2 == 1
        h = self.q(h) + self.p(h) if odd else self.p(h) + self.q(h)
        return self.b(h.relu())


def _order_and_overlap(ctx, x, y, cfg):
    net = _seeded(_LateRegistered)()
    model, arrived, launched = None, [], []
    for name, p in net.named_parameters():  # registered before the wrapper's hooks: they run first
        p.register_post_accumulate_grad_hook(lambda p, name=name: arrived.append(name))
    net.first.weight.register_post_accumulate_grad_hook(
        lambda p: launched.append([bucket.launched for bucket in model.buckets]))
    model = BucketedDataParallel(net, bucket_cap_mb=1e-6)  # one tensor per bucket
    orders = [[name for bucket in model.buckets for name in bucket.names]]
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr)
    for xb, yb in global_batches(x, y, cfg):
        opt.zero_grad()
        xr, yr = split_batch(xb, ctx.rank, ctx.world_size), split_batch(yb, ctx.rank, ctx.world_size)
        F.cross_entropy(model(xr), yr).backward()
        model.sync_gradients()
        opt.step()
        orders.append([name for bucket in model.buckets for name in bucket.names])
    first_step = arrived[: len(orders[0])]
    return {"orders": orders, "arrived": first_step, "launched": launched, "state": net.state_dict()}


def test_buckets_follow_the_order_gradients_arrived_in_and_launch_during_backward():
    x, y = make_classification_data(24, (4,), 3)
    cfg = TrainConfig(steps=3, global_batch=8, lr=0.1)
    reference = train_single(_seeded(_LateRegistered), x, y, cfg)["state"]
    per_rank = run(_order_and_overlap, 2, x, y, cfg, **GLOO)
    for r in per_rank:
        assert_states_close(r["state"], reference)
    zero, one = per_rank
    initial, rebuilt = zero["orders"][0], zero["orders"][1]
    assert initial[:2] == ["first.bias", "first.weight"]  # reverse registration order
    assert rebuilt == zero["arrived"] and rebuilt[:2] != ["first.bias", "first.weight"]
    assert one["arrived"] != zero["arrived"]  # p and q the other way round on rank 1 ...
    assert one["orders"][1:] == zero["orders"][1:]  # ... yet every rank launches in rank 0's order
    j = rebuilt.index("first.weight")
    for r in per_rank:
        before, *after = r["launched"]  # which buckets were in flight when first.weight's gradient arrived
        assert not any(before[1:])  # step 1: first.* lead the initial order and hold back all the rest
        for seen in after:  # later steps: every bucket that arrived earlier is already on its way
            assert seen == [True] * j + [False] * (len(seen) - j)


# --- process groups -------------------------------------------------------------------------

def _conv_bn():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5))


def _in_groups(ctx, layout, data, cfg):
    groups = [dist.new_group(ranks) for ranks in layout]  # every rank creates every group
    g = next(i for i, ranks in enumerate(layout) if ctx.rank in ranks)
    x, y = data[g]
    return {impl: train_data_parallel(ctx, _seeded(_conv_bn), x, y, replace(cfg, impl=impl), groups[g])["state"]
            for impl in IMPLS}


@pytest.mark.parametrize("layout", [[[0, 1], [2, 3]], [[0], [1, 2]]], ids=["groups 01 and 23", "groups 0 and 12"])
def test_data_parallel_groups_run_side_by_side(layout):
    # Each group trains on its own data, with synchronised BatchNorm, at the same time as
    # the other; groups without global rank 0 must take their first member's weights.
    data = [make_classification_data(16, (3, 6, 6), 5, seed=g) for g in range(len(layout))]
    cfg = TrainConfig(steps=2, global_batch=8, lr=0.1, sync_batchnorm=True, bucket_cap_mb=1e-3)
    per_rank = run(_in_groups, sum(map(len, layout)), layout, data, cfg, **GLOO)
    for g, ranks in enumerate(layout):
        reference = train_single(_seeded(_conv_bn), *data[g], cfg)["state"]
        for rank in ranks:
            for impl in IMPLS:
                assert_states_close(per_rank[rank][impl], reference, rtol=1e-4, atol=1e-5)


# --- forgotten synchronisation --------------------------------------------------------------

class _DriftsOnRank1(nn.Module):
    """An MLP whose rank 1 nudges a bias during its second forward, as a rank-local bug would."""

    def __init__(self):
        super().__init__()
        self.net, self.calls = MLP(), 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 2 and dist.get_rank() == 1:
            with torch.no_grad():
                self.net[2].bias.add_(0.01)
        return self.net(x)


def _drifting_replicas(ctx, x, y):
    said = {}
    # A hand-written loop whose second step forgets to synchronise (left inside no_sync).
    model = NaiveDataParallel(_seeded(MLP)())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xr, yr = split_batch(x, ctx.rank, ctx.world_size), split_batch(y, ctx.rank, ctx.world_size)
    try:
        for step in (1, 2, 3):
            opt.zero_grad()
            with model.no_sync() if step == 2 else contextlib.nullcontext():
                F.cross_entropy(model(xr), yr).backward()
            if step != 2:
                model.sync_gradients()
            opt.step()
            check_same_parameters(model.module, after_step=step)
        said["loop"] = "no error"
    except ValueError as e:
        said["loop"] = str(e)
    for every in (0, 1):  # the training loop's own check, off and every step
        try:
            cfg = TrainConfig(steps=3, global_batch=8, check_every=every)
            train_data_parallel(ctx, _seeded(_DriftsOnRank1), x, y, cfg)
            said[every] = "no error"
        except ValueError as e:
            said[every] = str(e)
    return said


def test_replicas_that_drift_apart_are_caught_naming_the_first_tensor():
    x, y = make_classification_data(8, (12,), 5)
    for said in run(_drifting_replicas, 2, x, y, **GLOO):
        assert "after step 2, rank 1's replica differs from rank 0's (first: '0.weight'" in said["loop"]
        assert "Call sync_gradients() after the last backward of every step" in said["loop"]
        assert said[0] == "no error"  # off by default
        assert "after step 2, rank 1's replica differs from rank 0's (first: 'net.2.bias', 1 of 6" in said[1]


def test_check_every_must_be_a_whole_number_of_steps():
    with pytest.raises(ValueError, match=r"check_every must be a whole number of steps \(0: off\), got -1"):
        TrainConfig(check_every=-1)
    with pytest.raises(ValueError, match="got 2.5"):
        TrainConfig(check_every=2.5)


# --- sharding -------------------------------------------------------------------------------

def test_global_batch_must_split_over_the_ranks():
    with pytest.raises(ValueError, match="a global batch of 10 does not split over 4 ranks.*8 or 12"):
        split_batch(torch.zeros(10), 0, 4)
    assert split_batch(torch.arange(12), 2, 4).tolist() == [6, 7, 8]


@pytest.mark.parametrize("length, n, drop_last", [(10, 4, False), (10, 4, True), (12, 3, False), (5, 2, True)])
def test_shard_sampler_matches_distributed_sampler(length, n, drop_last):
    from torch.utils.data.distributed import DistributedSampler

    for rank in range(n):
        ours = ShardSampler(length, rank, n, seed=7, drop_last=drop_last)
        theirs = DistributedSampler(range(length), num_replicas=n, rank=rank, seed=7, drop_last=drop_last)
        for epoch in (0, 1):
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs) and len(ours) == len(theirs)
