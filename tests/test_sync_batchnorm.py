"""Synchronised BatchNorm (chapters 3.1 and 4.1): the statistics of the global batch,
and a conversion that leaves the rest of the model as it was."""
import copy

import torch
from torch import nn

from nanopar.launch import run
from nanopar.sharding import split_batch
from nanopar.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm


def test_sync_batchnorm_matches_one_batchnorm_on_the_whole_batch():
    x = torch.randn(8, 3, 5, 5) * 3 + 1
    bn = torch.nn.BatchNorm2d(3)
    out = bn(x)
    per_rank = run(_sync_bn_forward, 2, x, backend="gloo", timeout=120)
    torch.testing.assert_close(torch.cat([r["out"] for r in per_rank]), out.detach())
    for r in per_rank:
        torch.testing.assert_close(r["running_mean"], bn.running_mean)
        torch.testing.assert_close(r["running_var"], bn.running_var)


def _sync_bn_forward(ctx, x):
    bn = SyncBatchNorm(3)
    out = bn(split_batch(x, ctx.rank, ctx.world_size))
    return {"out": out.detach(), "running_mean": bn.running_mean, "running_var": bn.running_var}


def _conv_bn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 2)).double()


def test_conversion_keeps_parameters_buffers_training_flag_and_dtype():
    model, reference = _conv_bn(), _conv_bn()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # built before the conversion, as users do
    weight, running_mean = model[1].weight, model[1].running_mean
    model = convert_sync_batchnorm(model)
    bn = model[1]
    assert type(bn) is SyncBatchNorm and bn.weight is weight and bn.running_mean is running_mean
    assert bn.weight.dtype == torch.float64 and bn.training
    # The optimizer still trains the converted model: one step equals the unconverted model's.
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    for m, o in ((model, opt), (reference, ref_opt)):
        m(x).square().sum().backward()
        o.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, msg=name)
    torch.testing.assert_close(bn.running_var, reference[1].running_var)
    assert not bool(torch.equal(bn.weight, _conv_bn()[1].weight))  # the step did move it


def test_conversion_keeps_eval_mode():
    model = _conv_bn().eval()
    assert not convert_sync_batchnorm(copy.deepcopy(model))[1].training


def test_one_value_per_channel_in_the_global_batch_is_an_error_on_every_rank():
    # Rank 0 holds one sample of 1×1 pixels, rank 1 none: one value per channel in all.
    messages = run(_one_value_per_channel, 2, backend="gloo", timeout=60)
    for m in messages:
        assert "Expected more than 1 value per channel when training" in m and "over 2 ranks has 1" in m


def _one_value_per_channel(ctx):
    bn = SyncBatchNorm(3)
    try:
        bn(torch.randn(1 - ctx.rank, 3, 1, 1))
    except ValueError as e:
        return str(e)
    return f"no error; running_var {bn.running_var.tolist()}"
