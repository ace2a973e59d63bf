"""Data parallelism (chapters 3.1 and 4.1): every result equals the single-process one,
and our implementations equal PyTorch's DistributedDataParallel."""
import functools

import pytest
import torch
import torch.distributed as dist

from nanopar import models
from nanopar.data_parallel import BucketedDataParallel, assign_buckets
from nanopar.launch import RankError, run
from nanopar.sharding import ShardSampler, split_batch
from nanopar.training import (TrainConfig, averaged_gradients, full_batch_gradients,
                              make_classification_data, seeded, train_data_parallel, train_single)

MLP = functools.partial(models.mlp, 32, 3, in_features=12, out_features=5)
RESNET = functools.partial(models.small_resnet, 5)


def _seeded(build):
    return functools.partial(seeded, build)


def assert_states_close(a, b, **tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol, msg=lambda m: f"{k}: {m}")


# --- the gradient of N ranks equals the full-batch gradient ------------------------------

@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_averaged_mlp_gradient_equals_full_batch_gradient(world_size):
    x, y = make_classification_data(12, (12,), 5)
    torch.manual_seed(0)
    reference = full_batch_gradients(MLP, x, y)
    for impl in ("naive", "bucketed"):
        # bucket_mb small enough for several buckets
        per_rank = run(averaged_gradients, world_size, _seeded(MLP), x, y, TrainConfig(impl=impl, bucket_mb=0.002))
        for grads in per_rank:
            assert_states_close(grads, reference)


@pytest.mark.parametrize("world_size", [2, 4])
def test_resnet_gradient_needs_synchronised_batchnorm(world_size):
    x, y = make_classification_data(8, (3, 16, 16), 5)
    reference = full_batch_gradients(_seeded(RESNET), x, y)
    synced = run(averaged_gradients, world_size, _seeded(RESNET), x, y, TrainConfig(sync_batchnorm=True))
    assert_states_close(synced[0], reference, rtol=1e-4, atol=1e-5)
    # With per-rank statistics (DDP's default) the gradient is not the full-batch one.
    local = run(averaged_gradients, world_size, _seeded(RESNET), x, y, TrainConfig(sync_batchnorm=False))
    worst = max((local[0][k] - reference[k]).abs().max().item() for k in reference)
    assert worst > 1e-3


# --- training equals the single process, and DDP -----------------------------------------

@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_sgd_training_equals_single_process_and_ddp(world_size):
    x, y = make_classification_data(48, (12,), 5)
    base = TrainConfig(steps=4, global_batch=12, lr=0.2, bucket_mb=0.002)
    reference = train_single(_seeded(MLP), x, y, base)["state"]
    finals = {}
    for impl in ("naive", "bucketed", "ddp"):
        finals[impl] = run(train_data_parallel, world_size, _seeded(MLP), x, y,
                           TrainConfig(**{**base.__dict__, "impl": impl}))
        for rank_result in finals[impl]:  # every replica ends identical to the reference
            assert_states_close(rank_result["state"], reference)
    assert_states_close(finals["bucketed"][0]["state"], finals["ddp"][0]["state"])


def test_adam_training_equals_single_process_within_tolerance():
    x, y = make_classification_data(48, (12,), 5)
    cfg = TrainConfig(steps=4, global_batch=12, lr=0.01, optimizer="adam")
    reference = train_single(_seeded(MLP), x, y, cfg)["state"]
    for result in run(train_data_parallel, 3, _seeded(MLP), x, y, cfg):
        # Adam divides by sqrt(v): where gradients are near zero, summation-order
        # differences of 1e-7 grow to about 1e-5 in the parameters.
        assert_states_close(result["state"], reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["bucketed", "ddp"])
def test_accumulation_equals_one_step_on_the_larger_batch(impl):
    x, y = make_classification_data(64, (12,), 5)
    big = TrainConfig(steps=2, global_batch=32, lr=0.2, impl=impl)
    reference = train_single(_seeded(MLP), x, y, big)["state"]
    accumulated = TrainConfig(**{**big.__dict__, "accumulate": 4})  # 4 micro-steps of 8
    for result in run(train_data_parallel, 2, _seeded(MLP), x, y, accumulated):
        assert_states_close(result["state"], reference)


# --- what goes wrong is said clearly --------------------------------------------------------

def test_different_starting_parameters_are_detected():
    with pytest.raises(RankError, match="starts from different parameters than rank 0"):
        run(_different_replicas, 2, timeout=60)


def _different_replicas(ctx):
    torch.manual_seed(ctx.rank)
    BucketedDataParallel(MLP(), broadcast=False)


def test_unused_parameters_are_reported_or_zeroed():
    with pytest.raises(RankError, match="got no gradient this step.*find_unused_parameters=True"):
        run(_unused, 2, False, timeout=60)
    for grads in run(_unused, 2, True, timeout=60):
        assert torch.count_nonzero(grads["unused.weight"]) == 0
        assert torch.count_nonzero(grads["used.weight"]) > 0


class _TwoBranches(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.used(x)


def _unused(ctx, find_unused):
    torch.manual_seed(0)
    model = BucketedDataParallel(_TwoBranches(), find_unused_parameters=find_unused, bucket_mb=1e-5)
    model(torch.ones(3, 4)).sum().backward()
    model.sync_gradients()
    return {n: p.grad for n, p in model.module.named_parameters()}


@pytest.mark.parametrize("bucket_mb", [0, -1])
def test_bucket_size_must_be_positive(bucket_mb):
    with pytest.raises(RankError, match="bucket_mb must be a positive number"):
        run(_bucketed_with, 1, bucket_mb, timeout=60)


def _bucketed_with(ctx, bucket_mb):
    BucketedDataParallel(MLP(), bucket_mb=bucket_mb)


def test_buckets_fill_in_order_up_to_the_cap():
    assert assign_buckets([4, 4, 4, 10, 1], cap_bytes=8) == [[0, 1], [2], [3], [4]]
    assert assign_buckets([1, 1, 1], cap_bytes=100) == [[0, 1, 2]]
    with pytest.raises(ValueError):
        assign_buckets([1], 0)


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


def test_sync_batchnorm_matches_one_batchnorm_on_the_whole_batch():
    x = torch.randn(8, 3, 5, 5) * 3 + 1
    bn = torch.nn.BatchNorm2d(3)
    out = bn(x)
    per_rank = run(_sync_bn_forward, 2, x)
    torch.testing.assert_close(torch.cat([r["out"] for r in per_rank]), out.detach())
    for r in per_rank:
        torch.testing.assert_close(r["running_mean"], bn.running_mean)
        torch.testing.assert_close(r["running_var"], bn.running_var)


def _sync_bn_forward(ctx, x):
    from nanopar.sync_batchnorm import SyncBatchNorm

    bn = SyncBatchNorm(3)
    out = bn(split_batch(x, ctx.rank, ctx.world_size))
    return {"out": out.detach(), "running_mean": bn.running_mean, "running_var": bn.running_var}
