"""Compute and time models of training, and the cost tables built on them (chapters 1 and 2).

How many FLOPs a training run needs (about 6·N·D), how long that takes on N devices, how
long an all-reduce takes in the α–β model. Memory lives in :mod:`nanopar.memory_model`;
its chapter-1 names are importable from here too, as the chapter's notebook uses them.
"""
from __future__ import annotations

from dataclasses import dataclass

# Chapter 1's notebook uses these names of the memory model through this module.
from .memory_model import (  # noqa: F401
    OPTIMIZERS,
    PRECISIONS,
    bytes_per_param,
    check_choice,
    check_positive,
    gib,
    memory_per_device,
    training_memory_bytes,
)

# NVIDIA A100 datasheet: dense bf16 tensor-core peak and the memory of the large model.
A100_PEAK_FLOPS = 312e12
A100_MEMORY_GIB = 80.0
# Model FLOPs utilization (MFU) that well-tuned large runs reach: 30-50% is typical.
DEFAULT_UTILIZATION = 0.4


def training_flops(n_params: float, n_tokens: float) -> float:
    """Floating-point operations to train ``n_params`` parameters on ``n_tokens`` tokens: 6·N·D (chapter 1).

    Per token, the forward pass does one multiply and one add per weight (2N); the
    backward pass does twice that (4N), because it computes gradients with respect to
    both the activations and the weights. Attention over the context and recomputation
    are left out; for large models they are small (Kaplan et al. 2020).
    """
    check_positive(n_params=n_params, n_tokens=n_tokens)
    return 6.0 * n_params * n_tokens


def training_time_s(
    flops: float,
    devices: int = 1,
    peak_flops_per_device: float = A100_PEAK_FLOPS,
    utilization: float = DEFAULT_UTILIZATION,
) -> float:
    """Seconds to do ``flops`` on ``devices`` devices running at ``utilization`` of their peak (chapter 1).

    Assumes the work divides perfectly among the devices: the rest of the book is about
    how close parallel training gets to that.
    """
    check_positive(flops=flops, devices=devices, peak_flops_per_device=peak_flops_per_device)
    if not 0 < utilization <= 1:
        raise ValueError(f"utilization is a fraction of peak in (0, 1], got {utilization}")
    return flops / (devices * peak_flops_per_device * utilization)


ALLREDUCE_ALGORITHMS = ("ring", "tree", "naive")


def allreduce_time(algorithm: str, ranks: int, nbytes: float, alpha_s: float, bandwidth_Bps: float) -> float:
    """Seconds to all-reduce ``nbytes`` over ``ranks`` ranks in the α–β model (chapter 2).

    One message of S bytes costs α + S/β (``alpha_s`` = α, ``bandwidth_Bps`` = β). For N ranks:

    * ``"ring"``: reduce-scatter then all-gather, 2(N−1) steps of S/N bytes:
      2(N−1)·α + 2(N−1)/N · S/β;
    * ``"tree"``: reduce up a binary tree, then broadcast down it, whole messages:
      2⌈log2 N⌉·(α + S/β);
    * ``"naive"``: every rank sends to one root, which reduces and sends the sum back to each:
      2(N−1)·(α + S/β).

    The ring's bandwidth term barely grows with N; its latency term grows linearly, which
    is why libraries use trees for small messages.
    """
    check_choice("algorithm", algorithm, ALLREDUCE_ALGORITHMS)
    if not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"ranks must be a positive integer, got {ranks!r}")
    if nbytes < 0 or alpha_s < 0:
        raise ValueError(f"nbytes and alpha_s cannot be negative, got {nbytes} and {alpha_s}")
    check_positive(bandwidth_Bps=bandwidth_Bps)
    message = alpha_s + nbytes / bandwidth_Bps
    if algorithm == "ring":
        return 2 * (ranks - 1) * alpha_s + 2 * (ranks - 1) / ranks * nbytes / bandwidth_Bps
    if algorithm == "tree":
        return 2 * (ranks - 1).bit_length() * message  # bit_length of N-1 is ⌈log2 N⌉
    return 2 * (ranks - 1) * message


def days(seconds: float) -> float:
    """Seconds in days (chapter 1)."""
    return seconds / 86400


@dataclass(frozen=True)
class ReferenceModel:
    """A published model: its parameters and training tokens (chapter 1)."""

    name: str
    params: float
    tokens: float


# Published sizes and training tokens, as the papers name them.
# GPT-3: Brown et al. 2020, "Language Models are Few-Shot Learners", Table 2.1 (every size
#   trained on 300B tokens). Llama 2: Touvron et al. 2023, "Llama 2: Open Foundation and
#   Fine-Tuned Chat Models", Table 1. Chinchilla: Hoffmann et al. 2022, "Training
#   Compute-Optimal Large Language Models", Table 1.
REFERENCE_MODELS = (
    ReferenceModel("GPT-3 XL 1.3B", 1.3e9, 300e9),
    ReferenceModel("Llama 2 7B", 7e9, 2e12),
    ReferenceModel("Chinchilla 70B", 70e9, 1.4e12),
    ReferenceModel("Llama 2 70B", 70e9, 2e12),
    ReferenceModel("GPT-3 175B", 175e9, 300e9),
)


@dataclass(frozen=True)
class CostRow:
    """One model's training cost: state memory per precision, FLOPs, days per device count (chapter 1)."""

    model: str
    params: float
    tokens: float
    memory_gib: dict[str, float]
    flops: float
    days: dict[int, float]


def reference_table(
    devices: tuple[int, ...] = (1, 1024),
    optimizer: str = "adam",
    peak_flops_per_device: float = A100_PEAK_FLOPS,
    utilization: float = DEFAULT_UTILIZATION,
    precisions: tuple[str, ...] = ("fp32", "mixed"),
) -> list[CostRow]:
    """Training cost of the :data:`REFERENCE_MODELS`, activations not counted (chapter 1)."""
    rows = []
    for m in REFERENCE_MODELS:
        flops = training_flops(m.params, m.tokens)
        rows.append(CostRow(
            model=m.name,
            params=m.params,
            tokens=m.tokens,
            memory_gib={p: gib(training_memory_bytes(m.params, p, optimizer)) for p in precisions},
            flops=flops,
            days={n: days(training_time_s(flops, n, peak_flops_per_device, utilization)) for n in devices},
        ))
    return rows


def _count(x: float) -> str:
    return f"{x / 1e12:g}T" if x >= 1e12 else f"{x / 1e9:g}B"


def _days(d: float) -> str:
    # Whole days are precise enough once a run takes months.
    return f"{d:,.0f}" if d >= 100 else f"{d:.1f}"


def format_table(rows: list[CostRow]) -> str:
    """The rows of :func:`reference_table` as a text table under 80 columns (chapter 1)."""
    counts, precisions = list(rows[0].days), list(rows[0].memory_gib)
    memory = "".join(f"{p:>7}" for p in precisions)
    widths = {n: len(f"days on {n}") + 2 for n in counts}
    header = f"{'model':<14}{'params':>7}{'tokens':>7}{memory}{'FLOPs':>9}"
    header += "".join(f"{f'days on {n}':>{widths[n]}}" for n in counts)
    lines = [f"{'':<28}{'state GiB':^{len(memory)}}".rstrip(), header, "-" * len(header)]
    for r in rows:
        line = f"{r.model:<14}{_count(r.params):>7}{_count(r.tokens):>7}"
        line += "".join(f"{r.memory_gib[p]:>7,.0f}" for p in precisions)
        line += f"{r.flops:>9.1e}" + "".join(f"{_days(r.days[n]):>{widths[n]}}" for n in counts)
        lines.append(line)
    return "\n".join(lines)


def describe_training(
    params_billion: float = 7.0,
    tokens_trillion: float = 1.0,
    precision: str = "mixed",
    optimizer: str = "adam",
    devices: int = 8,
    utilization: float = DEFAULT_UTILIZATION,
    peak_tflops: float = A100_PEAK_FLOPS / 1e12,
    device_memory_gib: float = A100_MEMORY_GIB,
) -> str:
    """What training a model costs, in words: the calculator of chapter 1.

    Memory is the training state without activations, either replicated on every device
    (plain data parallelism) or sharded evenly across them (ZeRO stage 3, FSDP).
    """
    n, d = params_billion * 1e9, tokens_trillion * 1e12
    per_param = bytes_per_param(precision, optimizer)
    state = gib(memory_per_device(n, precision, optimizer)["total"])
    sharded = gib(memory_per_device(n, precision, optimizer, zero_stage=3, dp=devices)["total"])
    flops = training_flops(n, d)
    seconds = training_time_s(flops, devices, peak_tflops * 1e12, utilization)
    fits = {True: "fits", False: "does not fit"}
    return "\n".join([
        f"{params_billion:g}B parameters, {tokens_trillion:g}T tokens, {precision} precision, {optimizer}: "
        f"{per_param.total} bytes per parameter",
        f"training state without activations: {state:,.1f} GiB",
        f"  replicated on each device (data parallel): {state:,.1f} GiB per device, "
        f"{fits[state <= device_memory_gib]} in {device_memory_gib:g} GiB",
        f"  sharded over {devices} devices (ZeRO-3 / FSDP): {sharded:,.1f} GiB per device, "
        f"{fits[sharded <= device_memory_gib]} in {device_memory_gib:g} GiB",
        f"compute: 6 x params x tokens = {flops:.2e} FLOPs",
        f"time on {devices} devices at {peak_tflops:g} TFLOP/s peak and {utilization:.0%} utilization: "
        f"{days(seconds):,.1f} days",
    ])
