"""nanopar.comm_volume: the bytes of chapter 3.3's formulas, checked against the model and a real run."""
import pytest
import torch

from nanopar import devices, models
from nanopar.bench import hybrid as bench_hybrid
from nanopar.comm_volume import PIPELINE_HEADER_BYTES, gpt_param_counts, hybrid_comm_bytes
from nanopar.grid import AXES, Topology
from nanopar.launch import run
from nanopar.training import TrainConfig

SHARDED = ("attn.qkv.", "attn.proj.weight", "mlp.fc.", "mlp.proj.weight")  # what parallelize_gpt splits


@pytest.mark.parametrize("bias", [True, False])
def test_parameter_counts_are_the_models(bias):
    config = models.GPTConfig(vocab_size=73, block_size=24, n_layer=3, n_head=4, n_embd=32, bias=bias)
    named = dict(models.gpt(config).named_parameters())
    sharded = sum(p.numel() for n, p in named.items() if any(s in n for s in SHARDED))
    assert gpt_param_counts(config) == {"replicated": sum(p.numel() for p in named.values()) - sharded,
                                        "sharded": sharded, "total": sum(p.numel() for p in named.values())}


def test_the_formulas_by_hand():
    config = models.GPTConfig(vocab_size=10, block_size=8, n_layer=2, n_head=2, n_embd=4)
    p = gpt_param_counts(config)
    act = 16 * 8 * 4 * 4  # b·s·h of the whole batch, fp32
    assert hybrid_comm_bytes(config, Topology(1, 1, 1), 16, 1) == {"dp": 0, "pp": 0, "tp": 0}
    assert hybrid_comm_bytes(config, Topology(2, 1, 1), 16, 1)["dp"] == 2 * (p["total"] + 1) * 4
    assert hybrid_comm_bytes(config, Topology(1, 2, 1), 16, 4)["pp"] == 2 * act + PIPELINE_HEADER_BYTES
    assert hybrid_comm_bytes(config, Topology(1, 1, 2), 16, 1)["tp"] == 4 * 2 * 2 * act  # 4 per layer, 2 ranks
    both = hybrid_comm_bytes(config, Topology(2, 2, 2), 16, 2)
    assert both["dp"] == 2 * (2 * p["replicated"] + p["sharded"] + 2 * 2) * 4
    # fp16 halves every payload but the pipeline's int64 headers
    half = hybrid_comm_bytes(config, Topology(2, 2, 2), 16, 2, dtype_bytes=2)
    assert half["dp"] * 2 == both["dp"] and half["tp"] * 2 == both["tp"]
    assert half["pp"] - 2 * 2 * PIPELINE_HEADER_BYTES == (both["pp"] - 2 * 2 * PIPELINE_HEADER_BYTES) // 2


def test_the_totals_do_not_depend_on_the_micro_batches_and_shrink_with_the_sequence():
    config = models.GPTConfig.tiny()
    topo = Topology(2, 2, 2)
    assert hybrid_comm_bytes(config, topo, 16, 1) == hybrid_comm_bytes(config, topo, 16, 8)
    short = hybrid_comm_bytes(config, topo, 16, 2, seq_len=config.block_size // 2)
    full = hybrid_comm_bytes(config, topo, 16, 2)
    assert short["tp"] * 2 == full["tp"] and short["dp"] == full["dp"]


@pytest.mark.parametrize("topology, kwargs, message", [
    (Topology(1, 1, 8), {}, "does not divide the model's 4 heads"),
    (Topology(4, 1, 1), {"batch": 6}, "multiple of 4"),
    (Topology(2, 1, 1), {"microbatches": 3}, "multiple of 6"),
    (Topology(1, 1, 1), {"seq_len": 33}, "block_size=32"),
])
def test_bad_input_is_named(topology, kwargs, message):
    args = {"batch": 8, "microbatches": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        hybrid_comm_bytes(models.GPTConfig.tiny(), topology, args.pop("batch"), args.pop("microbatches"), **args)


def test_counted_bytes_equal_the_formulas_without_biases_and_with_short_sequences(monkeypatch):
    # bench hybrid checks the default model; this one has no biases and sequences of 8 < block_size
    monkeypatch.setattr(devices, "gpu_count", lambda: 0)
    config = models.GPTConfig(vocab_size=73, block_size=16, n_layer=2, n_head=2, n_embd=16, bias=False)
    x = torch.randint(0, 73, (16, 8))
    cfg = TrainConfig(steps=2, global_batch=8, lr=0.1)
    shapes = [(2, 2, 1), (2, 1, 2), (1, 2, 2)]
    out = run(bench_hybrid.hybrid_timed_steps, 4, shapes, config, x, x.roll(1, 1), cfg, 0, 1, timeout=180)
    for shape in shapes:
        topo = Topology(*shape)
        formula = hybrid_comm_bytes(config, topo, 8, bench_hybrid.hybrid_microbatches(topo), seq_len=8)
        assert {a: sum(r["payload"][shape].get(a, 0) for r in out) for a in AXES} == formula, shape
