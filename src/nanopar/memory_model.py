"""Memory of training per device: the training state, the activations, and how ZeRO and a grid divide them.

Book: chapter 1 (bytes per parameter), chapter 3.3 (a dp × tp × pp grid) and chapter 6
(ZeRO; the notebook "Memory per parameter, measured", which checks this model against the
bytes a GPT really holds). :func:`memory_per_device` is the one function behind all of them,
and behind the memory calculator of the rendered book (``book/_static/calculators/memory.js``
mirrors it line for line; ``tests/test_calculators.py`` checks that the two agree).

Sources disagree on the bytes per parameter of mixed precision (16, 18 or 20 with Adam)
because they keep different copies; :data:`PRECISIONS` names each layout for what it keeps.
"""
from __future__ import annotations

from dataclasses import dataclass

PRECISIONS = ("fp32", "mixed", "mixed_fp32_grads", "mixed_fp32_grad_copy", "autocast")
OPTIMIZERS = ("sgd", "momentum", "adam")
ZERO_STAGES = (0, 1, 2, 3)
ATTENTION = ("materialized", "fused")
MEMORY_KINDS = ("weights", "grads", "optimizer", "activations")

# fp32 tensors per parameter that each optimizer keeps (momentum buffer; Adam's m and v).
_OPTIMIZER_STATES = {"sgd": 0, "momentum": 1, "adam": 2}
# Bytes per parameter by precision: weights, gradients, and the optimizer's bytes before its states.
#   mixed                 Micikevicius et al. 2018, the ZeRO paper: 16-bit weights and gradients,
#                         fp32 master weights in the optimizer (Adam: 2 + 2 + 12 = 16);
#   mixed_fp32_grads      16-bit weights, gradients accumulated in fp32 (Megatron-LM with bf16: 18);
#   mixed_fp32_grad_copy  16-bit gradients plus an fp32 copy for the optimizer (Megatron-LM fp16: 20);
#   autocast              torch.autocast: fp32 weights, gradients and states, plus the 16-bit copy
#                         of the weights that the forward pass makes and backward keeps (18).
_LAYOUTS = {
    "fp32": (4, 4, 0),
    "mixed": (2, 2, 4),
    "mixed_fp32_grads": (2, 4, 4),
    "mixed_fp32_grad_copy": (2, 2, 8),
    "autocast": (6, 4, 0),
}
# Bytes of one saved activation: (inputs and outputs of the matrix products, the residual stream
# that LayerNorm reads). Autocast runs LayerNorm and keeps the residual stream in fp32.
_ACTIVATION_BYTES = {"fp32": (4, 4), "mixed": (2, 2), "mixed_fp32_grads": (2, 2),
                     "mixed_fp32_grad_copy": (2, 2), "autocast": (2, 4)}


def check_choice(name: str, value: str, choices: tuple) -> None:
    """A clear error when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of: {', '.join(map(str, choices))}")


def check_positive(**values: float) -> None:
    """A clear error naming each value that is not positive."""
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def check_count(**values: int) -> None:
    """A clear error naming each value that is not a whole number >= 1 (degrees, sizes)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_zero_stage(stage: object) -> None:
    """A clear error unless ``stage`` is a ZeRO stage, 0 to 3 (chapter 6)."""
    if isinstance(stage, bool) or stage not in ZERO_STAGES:
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3 (0: plain data parallelism; 1: shard the "
                         f"optimizer state; 2: also the gradients; 3: also the parameters), got {stage!r}")


@dataclass(frozen=True)
class BytesPerParam:
    """Bytes of training state per parameter, by kind (chapter 1)."""

    weights: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        """Weights + gradients + optimizer state."""
        return self.weights + self.grads + self.optimizer


def bytes_per_param(precision: str = "fp32", optimizer: str = "adam") -> BytesPerParam:
    """Bytes per parameter of weights, gradients and optimizer state (chapters 1 and 6).

    The optimizer's part is the ZeRO paper's K: its fp32 states (4 bytes each) plus, in the
    ``mixed*`` layouts, the fp32 master weights (and the fp32 gradient copy). With Adam:
    ``fp32`` 4 + 4 + 8 = 16; ``mixed`` 2 + 2 + 12 = 16; ``mixed_fp32_grads`` 2 + 4 + 12 = 18;
    ``mixed_fp32_grad_copy`` 2 + 2 + 16 = 20; ``autocast`` (4 + 2) + 4 + 8 = 18.
    Activations come on top (:func:`activation_bytes`).
    """
    check_choice("precision", precision, PRECISIONS)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    weights, grads, extra = _LAYOUTS[precision]
    return BytesPerParam(weights, grads, extra + 4 * _OPTIMIZER_STATES[optimizer])


def training_memory_bytes(n_params: float, precision: str = "fp32", optimizer: str = "adam") -> float:
    """Bytes of training state (weights, gradients, optimizer) for a model, without activations (chapter 1)."""
    check_positive(n_params=n_params)
    return n_params * bytes_per_param(precision, optimizer).total


@dataclass(frozen=True)
class ActivationSpec:
    """The shape of a transformer whose activations are counted (chapter 6).

    ``batch`` is the micro-batch one replica runs at a time, ``seq`` its sequence length,
    ``hidden`` the width, ``layers`` and ``heads`` the depth and the attention heads.
    ``checkpointing``: keep only each layer's input and recompute the rest in backward.
    ``attention``: ``"materialized"`` keeps the heads' s × s score matrices, as Korthikanti et
    al. 2022 count them; ``"fused"`` (FlashAttention, PyTorch's ``scaled_dot_product_attention``)
    keeps one fp32 number per head and token instead. ``dropout``: the model has dropout
    layers, whose 1-byte masks are kept. The defaults give Korthikanti et al.'s count.
    """

    batch: int
    seq: int
    hidden: int
    layers: int
    heads: int
    checkpointing: bool = False
    attention: str = "materialized"
    dropout: bool = True

    def __post_init__(self):
        check_count(batch=self.batch, seq=self.seq, hidden=self.hidden, layers=self.layers, heads=self.heads)
        check_choice("attention", self.attention, ATTENTION)

    @classmethod
    def of_gpt(cls, config, batch: int, checkpointing: bool = False) -> ActivationSpec:
        """The spec of a :func:`nanopar.models.gpt` (fused attention, no dropout) at full context."""
        return cls(batch, config.block_size, config.n_embd, config.n_layer, config.n_head,
                   checkpointing=checkpointing, attention="fused", dropout=False)


def layer_activation_bytes(spec: ActivationSpec, precision: str = "mixed", tp: int = 1) -> float:
    """Bytes one transformer layer saves for backward on one micro-batch, per tensor-parallel rank (chapter 6).

    Korthikanti et al. 2022 count s·b·h·(34 + 5·a·s/h) bytes in 16-bit, with a heads: per
    token, the two LayerNorms' inputs (2 + 2 bytes per element of h), the inputs of the QKV and
    MLP-up products (2 + 2), Q, K, V (6), the attention output (2), the MLP's 4h-wide GELU input
    and output (8 + 8), and two 1-byte dropout masks; per head and pair of tokens, the softmax
    output (2), its dropout mask (1) and the dropped-out scores (2). Tensor parallelism without
    sequence parallelism splits the 24 bytes inside the column-then-row regions and the scores
    by ``tp`` and keeps the 10 bytes around them whole: s·b·h·(10 + 24/t + 5·a·s/(h·t)).
    """
    check_count(tp=tp)
    if spec.heads % tp:
        raise ValueError(f"heads={spec.heads} do not split over tp={tp} tensor-parallel ranks: "
                         "choose tp dividing the number of heads")
    check_choice("precision", precision, PRECISIONS)
    matmul, residual = _ACTIVATION_BYTES[precision]
    tokens = spec.seq * spec.batch
    whole = tokens * spec.hidden * (2 * residual + 2 * matmul + (2 if spec.dropout else 0))
    split = tokens * spec.hidden * 12 * matmul
    if spec.attention == "materialized":
        split += spec.heads * spec.seq * tokens * (matmul + (1 + matmul if spec.dropout else 0))
    else:  # fused kernels recompute the scores; they keep the softmax's log-sum-exp in fp32
        split += spec.heads * tokens * 4
    return whole + split / tp


def activation_bytes(spec: ActivationSpec, precision: str = "mixed", tp: int = 1, pp: int = 1) -> float:
    """Bytes of activations one device holds at its peak, on the first stage of a 1F1B pipeline (chapter 6).

    Each of the ``pp`` stages has layers/pp layers, and the first stage holds ``pp`` micro-batches
    in flight: layers × one layer's activations, whatever ``pp`` (Korthikanti et al. 2022). With
    checkpointing, only the layers' inputs (the residual stream, whole on every tensor-parallel
    rank) are kept, plus one layer's activations while backward recomputes it.
    """
    check_count(pp=pp)
    if spec.layers % pp:
        raise ValueError(f"layers={spec.layers} do not split evenly into pp={pp} pipeline stages: "
                         "choose pp dividing the number of layers")
    layer = layer_activation_bytes(spec, precision, tp)
    if not spec.checkpointing:
        return spec.layers * layer
    residual = _ACTIVATION_BYTES[precision][1]
    return spec.layers * spec.seq * spec.batch * spec.hidden * residual + layer


def memory_per_device(params: float, precision: str = "mixed", optimizer: str = "adam", zero_stage: int = 0,
                      dp: int = 1, tp: int = 1, pp: int = 1,
                      activations: ActivationSpec | None = None) -> dict[str, float]:
    """Bytes one device holds, by kind (:data:`MEMORY_KINDS`) and in ``"total"`` (chapters 1, 3.3 and 6).

    ``params`` (Ψ) parameters split evenly over ``tp`` × ``pp`` model-parallel ranks, replicated
    ``dp`` times. ZeRO shards the replicas' state over dp: stage 1 the optimizer state, stage 2
    also the gradients, stage 3 also the weights; with K optimizer bytes per parameter,
    mixed precision keeps (2 + 2 + K)Ψ, 2Ψ + 2Ψ + KΨ/N, 2Ψ + (2Ψ + KΨ)/N, (4Ψ + KΨ)/N per
    device for N = dp (and Ψ/(tp·pp) for Ψ when the model is split). Activations, counted
    when ``activations`` describes the model, are :func:`activation_bytes`.
    """
    check_positive(params=params)
    check_zero_stage(zero_stage)
    check_count(dp=dp, tp=tp, pp=pp)
    per = bytes_per_param(precision, optimizer)
    shard = params / (tp * pp)
    out = {"weights": per.weights * shard / (dp if zero_stage >= 3 else 1),
           "grads": per.grads * shard / (dp if zero_stage >= 2 else 1),
           "optimizer": per.optimizer * shard / (dp if zero_stage >= 1 else 1),
           "activations": 0.0 if activations is None else activation_bytes(activations, precision, tp, pp)}
    out["total"] = out["weights"] + out["grads"] + out["optimizer"] + out["activations"]
    return out


def gib(n_bytes: float) -> float:
    """Bytes in GiB (2**30 bytes), the unit GPU memory is quoted in (chapter 1)."""
    return n_bytes / 2**30
