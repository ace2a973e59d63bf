"""Tensor parallelism (chapter 3.3): a sharded GPT computes what the unsharded one does, on any
group of ranks, and agrees with PyTorch's own tensor parallelism (DTensor)."""
import functools

import pytest
import torch
import torch.distributed as dist

from nanopar import models
from nanopar.comm import all_reduce_with_grad
from nanopar.launch import run
from nanopar.model_split import split
from nanopar.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tp,
    full_grads,
    full_state_dict,
    load_full_state_dict,
    parallelize_gpt,
    reduce_from_tp,
)
from nanopar.training import seeded

CONFIG = models.GPTConfig(vocab_size=20, block_size=16, n_layer=2, n_head=4, n_embd=32)
BUILD = functools.partial(seeded, functools.partial(models.gpt, CONFIG))
TIMEOUT = 180


def gloo(fn, n, *args):
    return run(fn, n, *args, backend="gloo", timeout=TIMEOUT)


def batch(seed=0, b=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, CONFIG.vocab_size, (b, CONFIG.block_size), generator=g),
            torch.randint(0, CONFIG.vocab_size, (b, CONFIG.block_size), generator=g),
            torch.randn(b, CONFIG.block_size, CONFIG.n_embd, generator=g))


# What gets sharded: a whole GPT (token ids in), one Block (activations in) and the last
# pipeline stage of a GPT cut before h1 (activations in, logits out).
TARGETS = {"gpt": lambda: BUILD(), "block": lambda: BUILD().h0, "stage": lambda: split(BUILD(), ["h1"])[1]}


def forward_backward(model, x, y, grads):
    """The output, loss and gradients (as ``grads(model)`` names them) of a model, sharded or not."""
    out = model(x)
    loss = models.gpt_loss(out, y) if y is not None else out.square().mean()
    loss.backward()
    return {"out": out.detach(), "loss": loss.detach(), "grads": grads(model),
            "local": {n: p.grad.clone() for n, p in model.named_parameters()}}


def own_grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


def inputs(x, y, h):
    """Each target's input and targets (None: a Block's loss is its output's mean square)."""
    return {"gpt": (x, y), "block": (h, None), "stage": (h, y)}


def reference(x, y, h):
    """Single process: each target unsharded."""
    return {t: forward_backward(build(), *inputs(x, y, h)[t], own_grads) for t, build in TARGETS.items()}


def assert_matches(got, expected):
    torch.testing.assert_close(got["out"], expected["out"])
    torch.testing.assert_close(got["loss"], expected["loss"])
    assert got["grads"].keys() == expected["grads"].keys()
    for name, g in expected["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, msg=lambda m, name=name: f"{name}: {m}")


def _my_group(partition, rank):
    mine = None
    for ranks in partition:  # every rank creates every group, in the same order
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine


def _sharded(ctx, x, y, h, partition=None):
    group = None if partition is None else _my_group(partition, ctx.rank)
    sharded = {t: parallelize_gpt(build(), group) for t, build in TARGETS.items()}
    results = {t: forward_backward(m, *inputs(x, y, h)[t], lambda m: full_grads(m, group))
               for t, m in sharded.items()}
    return {**results, "state": full_state_dict(sharded["gpt"], group),
            "sharded": any(isinstance(m, ColumnParallelLinear) for m in sharded["gpt"].modules())}


@pytest.mark.parametrize("tp", [2, 4])
def test_sharded_gpt_block_and_stage_equal_the_unsharded_ones(tp):
    x, y, h = batch()
    expected = reference(x, y, h)
    per_rank = gloo(_sharded, tp, x, y, h)
    for got in per_rank:
        assert got["sharded"]
        for target in TARGETS:
            assert_matches(got[target], expected[target])
        for name, value in BUILD().state_dict().items():  # the sharded weights are the seeded model's
            torch.testing.assert_close(got["state"][name], value, rtol=0, atol=0)
    # Replicated parameters (embeddings, LayerNorms, head, row-parallel biases) get the same
    # gradient on every rank, bit for bit, so that their SGD steps never drift apart.
    some_replicated = {"gpt": {"embed.wte.weight", "h0.ln1.weight", "h1.mlp.proj.bias", "head.ln_f.weight"},
                       "block": {"ln1.weight", "ln2.bias", "attn.proj.bias"},
                       "stage": {"h1.ln1.bias", "head.lm_head.weight"}}
    for target, names in some_replicated.items():
        ranks = [got[target]["local"] for got in per_rank]
        replicated = {n for n, g in ranks[0].items() if g.shape == expected[target]["grads"][n].shape}
        assert names <= replicated
        for name in replicated:
            for other in ranks[1:]:
                torch.testing.assert_close(other[name], ranks[0][name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("partition", [[[0, 1], [2, 3]], [[0], [1, 2], [3]]], ids=["two-pairs", "middle-pair"])
def test_tensor_parallel_groups_run_side_by_side_and_excluding_rank_0(partition):
    # Each group works on its own batch, so that a message crossing groups would show.
    data = {g: batch(seed=g) for g in range(len(partition))}
    per_rank = run(_per_group, 4, partition, data, backend="gloo", timeout=TIMEOUT)
    for g, ranks in enumerate(partition):
        expected = reference(*data[g])
        for rank in ranks:
            got = per_rank[rank]
            assert got["sharded"] == (len(ranks) > 1)  # a group of one rank leaves the model as it is
            for target in TARGETS:
                assert_matches(got[target], expected[target])


def _per_group(ctx, partition, data):
    g = next(i for i, ranks in enumerate(partition) if ctx.rank in ranks)
    return _sharded(ctx, *data[g], partition=partition)


def _sgd(model, batches, lr):
    """The losses of SGD steps on ``batches``, training ``model`` in place."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = models.gpt_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _train(ctx, batches, lr):
    model = parallelize_gpt(BUILD(), None)
    losses = _sgd(model, batches, lr)
    trained = full_state_dict(model, None)
    other = seeded(functools.partial(models.gpt, CONFIG), seed=1).state_dict()
    load_full_state_dict(model, other, None)
    return {"losses": losses, "state": trained, "reloaded": full_state_dict(model, None)}


def test_sgd_steps_equal_single_process_training_and_the_state_round_trips():
    batches = [batch(seed=0)[:2]] * 3 + [batch(seed=1)[:2]]
    model = BUILD()
    losses = _sgd(model, batches, 0.5)
    assert losses[2] < losses[0] - 0.05  # it did learn: the steps were not zero
    for got in gloo(_train, 2, batches, 0.5):
        assert got["losses"] == pytest.approx(losses, rel=1e-5)
        for name, value in model.state_dict().items():
            torch.testing.assert_close(got["state"][name], value, msg=name)
        other = seeded(functools.partial(models.gpt, CONFIG), seed=1).state_dict()
        for name, value in other.items():
            torch.testing.assert_close(got["reloaded"][name], value, rtol=0, atol=0, msg=name)


def _conjugate_operators(ctx):
    r = ctx.rank
    x = ((r + 1) * torch.arange(3.0)).requires_grad_()
    w = torch.tensor([1.0, 10.0, 100.0]) * (r + 1)  # a different upstream gradient on each rank
    results = {}
    for name, op in (("f", lambda t: copy_to_tp(t, None)), ("g", lambda t: reduce_from_tp(t, None)),
                     ("g(f)", lambda t: reduce_from_tp(copy_to_tp(t, None), None)),
                     ("all_reduce_with_grad", all_reduce_with_grad)):
        x.grad = None
        y = op(x)
        (y * w).sum().backward()
        results[name] = (y.detach(), x.grad.clone())
    return results


def test_copy_and_reduce_are_conjugate():
    per_rank = gloo(_conjugate_operators, 2)
    xs = [(r + 1) * torch.arange(3.0) for r in range(2)]
    ws = [torch.tensor([1.0, 10.0, 100.0]) * (r + 1) for r in range(2)]
    for r, got in enumerate(per_rank):
        torch.testing.assert_close(got["f"][0], xs[r])          # f: identity forward,
        torch.testing.assert_close(got["f"][1], ws[0] + ws[1])  # summed gradient backward
        torch.testing.assert_close(got["g"][0], xs[0] + xs[1])  # g: summed forward,
        torch.testing.assert_close(got["g"][1], ws[r])          # identity backward
        for out, grad in (got["g(f)"], got["all_reduce_with_grad"]):
            torch.testing.assert_close(out, xs[0] + xs[1])
            torch.testing.assert_close(grad, ws[0] + ws[1])


def _parity_with_dtensor(ctx, x, y):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    ours = forward_backward(parallelize_gpt(BUILD(), None), x, y, lambda m: full_grads(m, None))
    mesh = DeviceMesh("cpu", list(range(ctx.world_size)))
    plan = {}
    for i in range(CONFIG.n_layer):  # qkv's rows are head-major, so Colwise's row blocks are whole heads
        plan |= {f"h{i}.attn.qkv": ColwiseParallel(), f"h{i}.attn.proj": RowwiseParallel(),
                 f"h{i}.mlp.fc": ColwiseParallel(), f"h{i}.mlp.proj": RowwiseParallel()}
    model = parallelize_module(BUILD(), mesh, plan)
    out = model(x)
    loss = models.gpt_loss(out, y)
    loss.backward()
    grads = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
             for n, p in model.named_parameters()}
    return {"ours": ours, "torch": {"out": out.detach(), "loss": loss.detach(), "grads": grads}}


def test_parity_with_torch_tensor_parallel():
    x, y, h = batch()
    expected = reference(x, y, h)["gpt"]
    for got in gloo(_parity_with_dtensor, 2, x, y):
        assert_matches(got["ours"], got["torch"])
        assert_matches(got["torch"], expected)


def _errors(ctx):
    messages = {}
    three_heads = models.GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=3, n_embd=48)
    mixed = torch.nn.Sequential(BUILD().h0, seeded(functools.partial(models.gpt, three_heads)).h0)
    for name, call in (
        ("heads", lambda: parallelize_gpt(mixed, None)),
        ("column", lambda: ColumnParallelLinear.from_linear(torch.nn.Linear(4, 5), None)),
        ("row", lambda: RowParallelLinear.from_linear(torch.nn.Linear(5, 4), None)),
        ("twice", lambda: parallelize_gpt(parallelize_gpt(BUILD(), None), None)),
        ("state", lambda: load_full_state_dict(parallelize_gpt(BUILD(), None), {"embed.wte.weight": None}, None)),
    ):
        try:
            call()
        except ValueError as e:
            messages[name] = str(e)
    messages["untouched"] = all(type(b.attn.qkv) is torch.nn.Linear for b in mixed)  # not even block 0
    return messages


def test_bad_sizes_are_clear_errors():
    got = gloo(_errors, 2)[1]
    assert "block 1 has 3 heads" in got["heads"] and "degree in [1, 3]" in got["heads"]
    assert "n_head is a multiple of 2" in got["heads"] and got["untouched"]
    assert "Linear(4, 5) has 5 features" in got["column"] and "degree that divides 5" in got["column"]
    assert "input of Linear(5, 4)" in got["row"]
    assert "already sharded" in got["twice"]
    assert "missing ['embed.wpe.weight'" in got["state"]
