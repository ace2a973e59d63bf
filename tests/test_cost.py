"""The memory and compute models of chapter 1, checked by hand numbers and by measurement."""
import pytest
import torch

from nanopar import cost
from nanopar.bench import memory
from nanopar.models import mlp


@pytest.mark.parametrize(
    "precision, optimizer, expected",
    [
        ("fp32", "sgd", (4, 4, 0, 8)),
        ("fp32", "momentum", (4, 4, 4, 12)),
        ("fp32", "adam", (4, 4, 8, 16)),
        ("mixed", "sgd", (2, 2, 4, 8)),
        ("mixed", "momentum", (2, 2, 8, 12)),
        # ZeRO paper: 2 + 2 + 12 bytes (fp32 master weights, momentum, variance).
        ("mixed", "adam", (2, 2, 12, 16)),
    ],
)
def test_bytes_per_param(precision, optimizer, expected):
    b = cost.bytes_per_param(precision, optimizer)
    assert (b.weights, b.grads, b.optimizer, b.total) == expected
    assert b.total == b.weights + b.grads + b.optimizer


def test_training_memory_scales_with_params():
    assert cost.training_memory_bytes(1_000, "fp32", "adam") == 16_000
    # 70B parameters with Adam do not fit on one 80 GB GPU, nor in 1 TB.
    assert cost.training_memory_bytes(70e9, "mixed", "adam") > 1e12


def test_training_flops_is_6nd():
    assert cost.training_flops(1e9, 1e12) == 6e21
    # GPT-3 175B on 300B tokens: the paper's Table D.1 gives 3.14e23 FLOPs.
    assert cost.training_flops(175e9, 300e9) == pytest.approx(3.14e23, rel=0.01)


def test_training_time_and_units():
    assert cost.training_time_s(100.0, devices=4, peak_flops_per_device=5.0, utilization=0.5) == 10.0
    assert cost.training_time_s(1e6, devices=1024) == pytest.approx(cost.training_time_s(1e6) / 1024)
    assert cost.gib(3 * 2**30) == 3.0
    assert cost.days(2 * 86400) == 2.0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: cost.bytes_per_param("fp8", "adam"), "fp32, mixed"),
        (lambda: cost.bytes_per_param("fp32", "lion"), "sgd, momentum, adam"),
        (lambda: cost.training_memory_bytes(0), "n_params must be > 0"),
        (lambda: cost.training_flops(-1, 10), "n_params must be > 0"),
        (lambda: cost.training_flops(10, 0), "n_tokens must be > 0"),
        (lambda: cost.training_time_s(1e9, devices=0), "devices must be > 0"),
        (lambda: cost.training_time_s(1e9, utilization=1.5), r"\(0, 1\]"),
        (lambda: memory.measure_training_step(8, 2, 4, optimizer="lbfgs"), "sgd, momentum, adam"),
        (lambda: memory.measure_training_step(8, 2, 0), "batch must be > 0"),
        (lambda: mlp(0, 2), "width"),
    ],
)
def test_bad_input_names_the_valid_choices(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_mlp_shapes():
    model = mlp(16, 3, in_features=5, out_features=2)
    assert [m.__class__.__name__ for m in model] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert model(torch.randn(4, 5)).shape == (4, 2)
    assert len(mlp(16, 1)) == 1


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_measured_bytes_equal_the_formula(optimizer):
    m = memory.measure_training_step(width=64, depth=3, batch=8, steps=2, optimizer=optimizer)
    assert m.params == sum(p.numel() for p in mlp(64, 3).parameters())
    expected = cost.bytes_per_param("fp32", optimizer)
    assert (m.weight_bytes, m.grad_bytes, m.optimizer_bytes) == (
        m.params * expected.weights,
        m.params * expected.grads,
        m.params * expected.optimizer,
    )
    assert m.state_bytes == cost.training_memory_bytes(m.params, "fp32", optimizer)
    assert 0 < m.step_s_min <= m.step_s <= m.step_s_max and m.flops_per_s > 0


def test_reference_table():
    rows = cost.reference_table(devices=(1, 1024))
    names = [r.model for r in rows]
    assert names == ["GPT-3 XL 1.3B", "Llama 2 7B", "Chinchilla 70B", "Llama 2 70B", "GPT-3 175B"]
    for r in rows:
        assert r.memory_gib["fp32"] == r.memory_gib["mixed"] == pytest.approx(16 * r.params / 2**30)
        assert r.days[1] == pytest.approx(1024 * r.days[1024])
    big = {r.model: r for r in rows}["Llama 2 70B"]
    assert big.memory_gib["mixed"] > cost.A100_MEMORY_GIB
    text = cost.format_table(rows)
    assert all(name in text for name in names) and "days on 1024" in text


def test_describe_training_says_what_fits():
    text = cost.describe_training(params_billion=7, tokens_trillion=1, devices=8)
    assert "16 bytes per parameter" in text
    assert "104.3 GiB per device, does not fit" in text
    assert "13.0 GiB per device, fits" in text


def test_allreduce_time_by_hand():
    # Chapter 3's example: 400 MB of fp32 gradients, 8 ranks, 25 GB/s links, 10 us latency.
    S, N, alpha, beta = 400e6, 8, 10e-6, 25e9
    # ring: 2*7 = 14 latencies (0.14 ms) and 2*7/8 * 16 ms = 28 ms of bandwidth
    assert cost.allreduce_time("ring", N, S, alpha, beta) == pytest.approx(0.14e-3 + 28e-3)
    # tree: ceil(log2 8) = 3 levels up and 3 down, each a whole 16.01 ms message
    assert cost.allreduce_time("tree", N, S, alpha, beta) == pytest.approx(6 * 16.01e-3)
    # naive: 7 messages into the root, 7 back out
    assert cost.allreduce_time("naive", N, S, alpha, beta) == pytest.approx(14 * 16.01e-3)
    # 5 ranks need ceil(log2 5) = 3 tree levels; one rank has nothing to send
    assert cost.allreduce_time("tree", 5, 0, 1.0, 1.0) == 6.0
    assert all(cost.allreduce_time(a, 1, S, alpha, beta) == 0 for a in cost.ALLREDUCE_ALGORITHMS)


def test_allreduce_time_trends():
    times = {a: [cost.allreduce_time(a, n, 1e9, 1e-5, 1e10) for n in (2, 4, 8, 64)] for a in cost.ALLREDUCE_ALGORITHMS}
    # large messages: the ring's time stays under twice one message's, the others grow with N
    assert max(times["ring"]) < 2 * (1e-5 + 0.1) < times["tree"][-1] < times["naive"][-1]
    # small messages are latency-bound: the tree's log2 N latencies beat the ring's N - 1
    assert cost.allreduce_time("tree", 64, 1e3, 1e-5, 1e10) < cost.allreduce_time("ring", 64, 1e3, 1e-5, 1e10)


@pytest.mark.parametrize(
    "args, message",
    [
        (("butterfly", 4, 1e6, 1e-5, 1e9), "ring, tree, naive"),
        (("ring", 0, 1e6, 1e-5, 1e9), "positive integer"),
        (("ring", 2.5, 1e6, 1e-5, 1e9), "positive integer"),
        (("ring", 4, -1, 1e-5, 1e9), "cannot be negative"),
        (("ring", 4, 1e6, 1e-5, 0), "bandwidth_Bps must be > 0"),
    ],
)
def test_allreduce_time_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        cost.allreduce_time(*args)
