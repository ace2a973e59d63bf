"""The memory model (nanopar.memory_model) by hand, against its sources, and against the bytes a GPT holds."""
import dataclasses

import pytest
import torch.distributed as dist

from nanopar import cost, launch, memory_model, schedules
from nanopar.bench import memory
from nanopar.memory_model import ActivationSpec, activation_bytes, layer_activation_bytes, memory_per_device
from nanopar.models import GPTConfig, gpt

# GPT-3 175B's shape (Brown et al. 2020) at one sequence per micro-batch.
GPT3 = ActivationSpec(batch=1, seq=2048, hidden=12288, layers=96, heads=96)


@pytest.mark.parametrize("precision, optimizer, expected", [
    ("fp32", "sgd", (4, 4, 0)), ("fp32", "momentum", (4, 4, 4)), ("fp32", "adam", (4, 4, 8)),
    ("mixed", "sgd", (2, 2, 4)), ("mixed", "adam", (2, 2, 12)),  # ZeRO paper: K = 12
    ("mixed_fp32_grads", "adam", (2, 4, 12)),  # Megatron-LM, bf16 weights and fp32 gradients: 18
    ("mixed_fp32_grad_copy", "adam", (2, 2, 16)),  # Megatron-LM, fp16 gradients and an fp32 copy: 20
    ("autocast", "adam", (6, 4, 8)),  # Hugging Face's count: fp32 + 16-bit weights, fp32 gradients: 18
    ("autocast", "momentum", (6, 4, 4)),
])
def test_bytes_per_param_by_layout(precision, optimizer, expected):
    b = memory_model.bytes_per_param(precision, optimizer)
    assert (b.weights, b.grads, b.optimizer) == expected


def test_mixed_precision_is_16_18_or_20_bytes_with_adam():
    totals = {p: memory_model.bytes_per_param(p, "adam").total for p in memory_model.PRECISIONS}
    assert totals == {"fp32": 16, "mixed": 16, "mixed_fp32_grads": 18, "mixed_fp32_grad_copy": 20, "autocast": 18}


@pytest.mark.parametrize("precision, megatron", [
    # Megatron-LM's distributed optimizer (ZeRO stage 1), bytes per parameter on d ranks:
    # fp32 8 + 8/d; bf16 weights, fp32 gradients 6 + 12/d; fp16 weights and gradients 4 + 16/d.
    ("fp32", (8, 8)), ("mixed_fp32_grads", (6, 12)), ("mixed_fp32_grad_copy", (4, 16)),
])
def test_zero_stage_1_equals_megatron_distributed_optimizer(precision, megatron):
    for d in (1, 2, 8, 64):
        per_param = memory_per_device(1e6, precision, "adam", zero_stage=1, dp=d)["total"] / 1e6
        assert per_param == pytest.approx(megatron[0] + megatron[1] / d, rel=1e-12)


@pytest.mark.parametrize("optimizer", memory_model.OPTIMIZERS)
@pytest.mark.parametrize("precision", ["mixed", "fp32"])
def test_zero_stages_by_the_formulas(precision, optimizer):
    psi, n = 3e9, 16
    w, g = (2, 2) if precision == "mixed" else (4, 4)
    k = memory_model.bytes_per_param(precision, optimizer).optimizer
    expected = [(w + g + k) * psi, w * psi + g * psi + k * psi / n, w * psi + (g * psi + k * psi) / n,
                (w * psi + g * psi + k * psi) / n]
    got = [memory_per_device(psi, precision, optimizer, zero_stage=s, dp=n)["total"] for s in memory_model.ZERO_STAGES]
    assert got == pytest.approx(expected, rel=1e-12)


def test_zero_paper_example():
    # Rajbhandari et al. 2020, Figure 1: Ψ = 7.5B, N = 64, K = 12: 120, 31.4, 16.6 and 1.9 GB per device.
    gb = [memory_per_device(7.5e9, "mixed", "adam", zero_stage=s, dp=64)["total"] / 1e9 for s in range(4)]
    assert [round(x, 1) for x in gb] == [120.0, 31.4, 16.6, 1.9]


def test_zero_bytes_per_rank_is_the_memory_model():
    from nanopar import zero
    for precision in ("fp32", "mixed"):
        for stage in zero.STAGES:
            theirs = zero.zero_bytes_per_rank(1e9, 8, stage, precision)
            ours = memory_per_device(1e9, precision, "adam", zero_stage=stage, dp=8)
            assert [theirs[k] for k in ("param_bytes", "grad_bytes", "optim_bytes", "total_bytes")] == pytest.approx(
                [ours[k] for k in ("weights", "grads", "optimizer", "total")], rel=1e-12)


def test_model_parallelism_divides_the_state_and_plain_dp_does_not():
    one = memory_per_device(7e9, "mixed", "adam")
    assert memory_per_device(7e9, "mixed", "adam", dp=8) == one
    split = memory_per_device(7e9, "mixed", "adam", tp=4, pp=2)
    for kind in ("weights", "grads", "optimizer", "total"):
        assert split[kind] == pytest.approx(one[kind] / 8, rel=1e-12)


def test_korthikanti_activations_per_layer():
    s, b, h, a = GPT3.seq, GPT3.batch, GPT3.hidden, GPT3.heads
    # Korthikanti et al. 2022, eq. 1 and 2: sbh(34 + 5as/h), and with t-way tensor parallelism
    # (no sequence parallelism) sbh(10 + 24/t + 5as/(ht)), bytes in 16-bit.
    assert layer_activation_bytes(GPT3, "mixed") == s * b * h * (34 + 5 * a * s / h)
    for t in (2, 8):
        expected = s * b * h * (10 + 24 / t + 5 * a * s / (h * t))
        assert layer_activation_bytes(GPT3, "mixed", tp=t) == pytest.approx(expected)
    # fp32 doubles the 2-byte tensors and keeps the 1-byte masks: 64 + 2 and 8as/h + as/h.
    assert layer_activation_bytes(GPT3, "fp32") == s * b * h * (66 + 9 * a * s / h)
    # No dropout: no masks, and the softmax output is the only s×s tensor.
    no_dropout = dataclasses.replace(GPT3, dropout=False)
    assert layer_activation_bytes(no_dropout, "mixed") == s * b * h * (32 + 2 * a * s / h)
    # Fused attention keeps Q, K, V and the output, plus one fp32 log-sum-exp per head and token.
    fused = dataclasses.replace(GPT3, dropout=False, attention="fused")
    assert layer_activation_bytes(fused, "mixed") == s * b * h * 32 + 4 * a * s * b


def test_checkpointing_keeps_the_layer_inputs_and_one_layer():
    s, b, h, layers = GPT3.seq, GPT3.batch, GPT3.hidden, GPT3.layers
    full = activation_bytes(GPT3, "mixed")
    kept = activation_bytes(dataclasses.replace(GPT3, checkpointing=True), "mixed")
    assert full == layers * layer_activation_bytes(GPT3, "mixed")
    assert kept == 2 * s * b * h * layers + layer_activation_bytes(GPT3, "mixed")
    assert kept < full / 20
    # Autocast keeps the residual stream, the checkpointed inputs, in fp32.
    assert activation_bytes(dataclasses.replace(GPT3, checkpointing=True, layers=1), "autocast") == pytest.approx(
        4 * s * b * h + layer_activation_bytes(GPT3, "autocast"))


@pytest.mark.parametrize("pp", [2, 4, 8])
def test_pipeline_first_stage_holds_pp_microbatches_of_its_layers(pp):
    in_flight = schedules.peak_in_flight(schedules.make("1f1b", pp, 2 * pp), 0)
    assert in_flight == pp
    layers_per_stage = GPT3.layers // pp
    layer = layer_activation_bytes(GPT3, "mixed")
    assert activation_bytes(GPT3, "mixed", pp=pp) == layers_per_stage * in_flight * layer
    with_tp = memory_per_device(175e9, "mixed", "adam", zero_stage=1, dp=4, tp=8, pp=pp, activations=GPT3)
    assert with_tp["activations"] == activation_bytes(GPT3, "mixed", tp=8, pp=pp) < activation_bytes(GPT3, "mixed")


def test_describe_training_shards_with_the_memory_model():
    text = cost.describe_training(params_billion=7, tokens_trillion=1, precision="mixed_fp32_grad_copy", devices=8)
    sharded = memory_model.gib(memory_per_device(7e9, "mixed_fp32_grad_copy", "adam", zero_stage=3, dp=8)["total"])
    assert "20 bytes per parameter" in text and f"{sharded:,.1f} GiB per device, fits" in text


# --- measured ------------------------------------------------------------------------------
# The model leaves out LayerNorm's statistics, an fp32 mean and 1/σ per token for each of a
# layer's two LayerNorms: 16·s·b bytes, about 1/(4h) of a layer's activations. Measured, that
# is all that this GPT's CPU kernels save beyond the model, so the tests allow exactly that.
SHAPES = [GPTConfig(vocab_size=65, block_size=32, n_layer=1, n_head=4, n_embd=64),
          GPTConfig(vocab_size=65, block_size=48, n_layer=1, n_head=6, n_embd=96)]


def _modelled_layer(config: GPTConfig, batch: int, mode: str, tp: int = 1) -> float:
    precision, checkpointing = memory.MODES[mode]
    one = ActivationSpec.of_gpt(dataclasses.replace(config, n_layer=1), batch, checkpointing)
    two = dataclasses.replace(one, layers=2)
    return activation_bytes(two, precision, tp) - activation_bytes(one, precision, tp)


def _layer_norm_stats(config: GPTConfig, batch: int) -> int:
    return 2 * 2 * 4 * config.block_size * batch


def _linear_weights_per_block(config: GPTConfig) -> int:
    block = gpt(dataclasses.replace(config, n_layer=1)).h0
    return sum(m.weight.numel() for m in block.modules() if m.__class__.__name__ == "Linear")


@pytest.mark.parametrize("config", SHAPES, ids=lambda c: f"h{c.n_embd}")
@pytest.mark.parametrize("mode", list(memory.MODES))
def test_measured_layer_activations_match_the_model(config, mode):
    measured = memory.layer_saved_bytes(config, 2, mode)
    modelled = _modelled_layer(config, 2, mode)
    assert modelled <= measured.activations <= modelled + _layer_norm_stats(config, 2)
    # Autocast saves a 16-bit copy of each matrix weight for backward: 2 bytes per weight,
    # unless checkpointing recomputes it; fp32 saves no weights beside the parameters.
    copies = 2 * _linear_weights_per_block(config) if mode == "autocast" else 0
    assert measured.weight_copies == copies


def test_korthikanti_count_overstates_this_gpt():
    # Its 34 + 5as/h assumes dropout and materialized attention scores; the GPT has neither.
    config, batch = SHAPES[0], 2
    korthikanti = layer_activation_bytes(dataclasses.replace(ActivationSpec.of_gpt(config, batch), dropout=True,
                                                             attention="materialized"), "fp32")
    assert memory.layer_saved_bytes(config, batch, "fp32").activations < 0.8 * korthikanti


def _tp_layer_bytes(ctx, config, batch, mode):
    return memory.layer_saved_bytes(config, batch, mode, tp_group=dist.group.WORLD)


@pytest.mark.parametrize("mode", ["fp32", "autocast"])
def test_tensor_parallel_layer_activations_match_the_model(mode):
    config = SHAPES[0]
    per_rank = launch.run(_tp_layer_bytes, 2, config, 2, mode, backend="gloo", timeout=120)
    assert per_rank[0] == per_rank[1]
    modelled = _modelled_layer(config, 2, mode, tp=2)
    assert modelled <= per_rank[0].activations <= modelled + _layer_norm_stats(config, 2)
    assert per_rank[0].activations < 0.7 * memory.layer_saved_bytes(config, 2, mode).activations


def test_measured_step_state_is_exact_and_peaks_follow_the_model():
    config, batch = GPTConfig(vocab_size=65, block_size=64, n_layer=3, n_head=4, n_embd=64), 4
    steps = {s.mode: s for s in launch.run(memory.gpt_steps, 1, [config], batch, list(memory.MODES), 1,
                                           backend="gloo", timeout=180)[0]}
    fp32 = memory_model.bytes_per_param("fp32", "adam")
    for s in steps.values():
        # Autocast's parameters, gradients and Adam state stay fp32; its weight copies are activations.
        assert (s.weight_bytes, s.grad_bytes, s.optimizer_bytes) == (
            fp32.weights * s.params, fp32.grads * s.params, fp32.optimizer * s.params)
        assert s.cuda_peak_bytes is None and len(s.step_s) == 1
        precision, checkpointing = memory.MODES[s.mode]
        modelled = memory_per_device(s.params, precision, "adam",
                                     activations=ActivationSpec.of_gpt(config, batch, checkpointing))["total"]
        # The peak also holds the embedding's, the head's and the loss's activations and
        # Adam's temporaries, which the model leaves out; autocast's weight copies, which it
        # counts, are recomputed under checkpointing: measured, these stay within 15%.
        assert s.peak_bytes == pytest.approx(modelled, rel=0.15), s.mode
    peaks = {mode: s.peak_bytes for mode, s in steps.items()}
    assert peaks["autocast+checkpoint"] < peaks["checkpoint"] < peaks["fp32"]
    assert peaks["autocast+checkpoint"] < peaks["autocast"] < peaks["fp32"]


@pytest.mark.parametrize("call, message", [
    (lambda: memory_per_device(0), "params must be > 0"),
    (lambda: memory_per_device(1e9, "fp8"), "choose one of: fp32, mixed, mixed_fp32_grads"),
    (lambda: memory_per_device(1e9, zero_stage=4), "ZeRO stage must be 0, 1, 2 or 3"),
    (lambda: memory_per_device(1e9, zero_stage=True), "ZeRO stage must be 0, 1, 2 or 3"),
    (lambda: memory_per_device(1e9, dp=0), "dp must be a positive integer, got 0"),
    (lambda: memory_per_device(1e9, tp=2.0), "tp must be a positive integer, got 2.0"),
    (lambda: memory_per_device(1e9, tp=8, activations=dataclasses.replace(GPT3, heads=12)), "choose tp dividing"),
    (lambda: memory_per_device(1e9, pp=5, activations=GPT3), "choose pp dividing the number of layers"),
    (lambda: ActivationSpec(batch=0, seq=1, hidden=1, layers=1, heads=1), "batch must be a positive integer"),
    (lambda: dataclasses.replace(GPT3, attention="flash"), "choose one of: materialized, fused"),
    (lambda: memory.gpt_saved_bytes(SHAPES[0], 2, "fp16"), "choose one of: fp32, autocast, checkpoint"),
    (lambda: memory.gpt_saved_bytes(SHAPES[0], 0), "batch must be a positive integer"),
])
def test_bad_input_says_what_to_do(call, message):
    with pytest.raises(ValueError, match=message):
        call()
