"""Memory and speed of training steps, measured: the check of ``nanopar.memory_model`` (chapters 1 and 6).

Chapter 1 trains an MLP and counts its training state. Chapter 6 ("Memory per parameter,
measured") does the same for the GPT of ``nanopar.models`` at several sizes, and counts its
activations too: the tensors autograd saves for backward (:func:`saved_activation_bytes`),
and the peak of all tensors alive during a step (:class:`PeakTracker` on any device,
``torch.cuda.max_memory_allocated`` on a GPU), in fp32, under bf16 autocast and with
activation checkpointing (:data:`MODES`), with the step time of each, alternated.
"""
from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint

from .. import memory_model
from ..launch import RankContext
from ..models import Block, GPTConfig, gpt, gpt_loss, mlp
from ..tensor_parallel import parallelize_gpt
from ..training import seeded

# A step's mode: (the memory model's precision, whether each transformer layer is checkpointed).
MODES = {"fp32": ("fp32", False), "autocast": ("autocast", False), "checkpoint": ("fp32", True),
         "autocast+checkpoint": ("autocast", True)}


def _state_bytes(params: list[nn.Parameter], opt: torch.optim.Optimizer) -> tuple[int, int, int, int]:
    # Weights, gradients, optimizer state shaped like the parameters, and the rest of the
    # optimizer's state (Adam's scalar step counters), which does not grow with the model.
    state = [(t, p) for p in params for t in opt.state.get(p, {}).values() if torch.is_tensor(t)]
    return (sum(p.nbytes for p in params), sum(p.grad.nbytes for p in params if p.grad is not None),
            sum(t.nbytes for t, p in state if t.shape == p.shape),
            sum(t.nbytes for t, p in state if t.shape != p.shape))


@dataclass(frozen=True)
class StepMeasurement:
    """Measured training state and speed of one model (chapter 1)."""

    width: int
    depth: int
    batch: int
    optimizer: str
    params: int
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    # Optimizer state that is not per parameter, e.g. Adam's scalar step counter per tensor.
    bookkeeping_bytes: int
    # Median, fastest and slowest step: the range shows how noisy the machine was.
    step_s: float
    step_s_min: float
    step_s_max: float
    flops_per_s: float

    @property
    def state_bytes(self) -> int:
        """Weights + gradients + per-parameter optimizer state, comparable with the formula."""
        return self.weight_bytes + self.grad_bytes + self.optimizer_bytes


def measure_training_step(
    width: int, depth: int, batch: int, steps: int = 5, optimizer: str = "adam"
) -> StepMeasurement:
    """Train an fp32 :func:`~nanopar.models.mlp` for a few steps on random data and measure it (chapter 1).

    Bytes are summed from the tensors themselves (parameters, their ``.grad``, the
    optimizer's state), so they can be checked against :func:`nanopar.memory_model.bytes_per_param`. The step
    time is the median (and range) over ``steps`` steps after one untimed warm-up step;
    achieved FLOP/s counts 6 · params · batch per median step. Runs in this process with
    torch's current thread count; :func:`measure_growth` runs it in a clean rank.
    """
    memory_model.check_choice("optimizer", optimizer, memory_model.OPTIMIZERS)
    memory_model.check_positive(batch=batch, steps=steps)
    model = mlp(width, depth)
    params = list(model.parameters())
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=1e-3)
    else:
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9 if optimizer == "momentum" else 0.0)
    x, y = torch.randn(batch, width), torch.randn(batch, width)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    # The first step allocates gradients and optimizer state, so it is not timed.
    times = times[1:]
    step_s = statistics.median(times)
    n_params = sum(p.numel() for p in params)
    return StepMeasurement(
        width, depth, batch, optimizer, n_params, *_state_bytes(params, opt),
        step_s=step_s,
        step_s_min=min(times),
        step_s_max=max(times),
        flops_per_s=6 * n_params * batch / step_s,
    )


def measure_growth(ctx: RankContext, widths: list[int], depth: int, batch: int, steps: int = 5) -> list[StepMeasurement]:
    """Worker: :func:`measure_training_step` for each width, in one single-thread rank (chapter 1).

    Run it as ``launch.run(measure_growth, 1, …)``: a fresh process with one thread
    times more steadily than a notebook kernel whose threads share the machine.
    """
    runs = []
    for width in widths:
        runs.append(measure_training_step(width, depth, batch, steps))
        ctx.tick()
    return runs


def saved_activation_bytes(model: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> int:
    """Bytes autograd saves for backward while ``loss_fn()`` runs ``model`` forward, once each (chapters 5.2, 6).

    A saved view holds its whole storage, so storages are counted, once each. The model's
    parameters (which a layer's backward saves too) are not activations; every other saved
    tensor is, including the 16-bit copies of the weights that autocast makes. Runs the
    backward pass afterwards, which frees them.
    """
    held: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            held[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    return sum(held.values())


class PeakTracker(TorchDispatchMode):
    """The most bytes that tensors created inside ``with PeakTracker() as t:`` held at once, in ``t.peak`` (chapter 6).

    What an allocator must provide on top of the tensors that existed before: the CPU's
    counterpart of ``torch.cuda.max_memory_allocated``, seen op by op. An op's output that
    shares an input's storage (a view, an in-place op) allocates nothing.
    """

    def __init__(self):
        super().__init__()
        self.peak = 0
        self._live = 0
        self._alive: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key, (ref, nbytes) in list(self._alive.items()):
            if ref.expired():
                del self._alive[key]
                self._live -= nbytes
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:
                storage = t.untyped_storage()
                if storage._cdata not in self._alive:
                    self._alive[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
                    self._live += storage.nbytes()
        self.peak = max(self.peak, self._live)
        return out


def _gpt_loss(model: nn.Sequential, idx: torch.Tensor, targets: torch.Tensor, mode: str) -> torch.Tensor:
    precision, checkpointing = MODES[mode]
    with torch.autocast(idx.device.type, dtype=torch.bfloat16, enabled=precision == "autocast"):
        x = idx
        for block in model:  # checkpointed layers keep their input and recompute the rest in backward
            x = checkpoint(block, x, use_reentrant=False) if checkpointing and isinstance(block, Block) else block(x)
        return gpt_loss(x, targets)


def _gpt_and_batch(config: GPTConfig, batch: int, device: torch.device | str,
                   tp_group=None) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    memory_model.check_count(batch=batch)
    g = torch.Generator().manual_seed(0)  # the same batch on every rank, as tensor parallelism needs
    data = torch.randint(0, config.vocab_size, (2, batch, config.block_size), generator=g).to(device)
    model = seeded(functools.partial(gpt, config)).to(device)
    return (model if tp_group is None else parallelize_gpt(model, tp_group)), data[0], data[1]


def gpt_saved_bytes(config: GPTConfig, batch: int, mode: str = "fp32", device: torch.device | str = "cpu",
                    tp_group=None) -> int:
    """Activation bytes a :func:`~nanopar.models.gpt` saves for backward on ``batch`` full-length sequences (chapter 6).

    With ``tp_group``, the GPT is sharded by tensor parallelism over that group (every rank
    of it calls this) and the bytes are this rank's.
    """
    memory_model.check_choice("mode", mode, tuple(MODES))
    model, idx, targets = _gpt_and_batch(config, batch, device, tp_group)
    return saved_activation_bytes(model, lambda: _gpt_loss(model, idx, targets, mode))


class LayerBytes(NamedTuple):
    """What one more transformer layer saves for backward, measured (chapter 6)."""

    activations: int  # grows with the batch: compare with memory_model.activation_bytes
    weight_copies: int  # does not: autocast's 16-bit copies of the layer's weights


def layer_saved_bytes(config: GPTConfig, batch: int, mode: str = "fp32", tp_group=None) -> LayerBytes:
    """The bytes one transformer layer adds to :func:`gpt_saved_bytes`, split by what they grow with (chapter 6).

    Measured with 1 and 2 layers, at ``batch`` and twice that: the differences cancel the
    embedding, the head and the loss, and separate the activations (proportional to the
    batch) from the bytes that do not depend on it. ``tp_group``: as in :func:`gpt_saved_bytes`.
    """
    saved = {(layers, k): gpt_saved_bytes(replace(config, n_layer=layers), k * batch, mode, tp_group=tp_group)
             for layers in (1, 2) for k in (1, 2)}
    one, two = saved[2, 1] - saved[1, 1], saved[2, 2] - saved[1, 2]
    return LayerBytes(activations=two - one, weight_copies=2 * one - two)


@dataclass(frozen=True)
class GPTStep:
    """A GPT training step in one mode of :data:`MODES`: its memory and its time (chapter 6)."""

    config: GPTConfig
    batch: int
    mode: str
    params: int
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    bookkeeping_bytes: int  # Adam's step counters: not per parameter
    saved_bytes: int  # activations saved for backward, whole model (saved_activation_bytes)
    peak_bytes: int  # state held before the step + the peak of the tensors the step creates
    cuda_peak_bytes: int | None  # torch.cuda.max_memory_allocated during the step, on a GPU
    step_s: list[float]

    @property
    def state_bytes(self) -> int:
        """Weights + gradients + per-parameter optimizer state, comparable with the model."""
        return self.weight_bytes + self.grad_bytes + self.optimizer_bytes


def _steps_of_one_gpt(ctx: RankContext, config: GPTConfig, batch: int, modes: list[str],
                      rounds: int) -> list[GPTStep]:
    model, idx, targets = _gpt_and_batch(config, batch, ctx.device)
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    cuda = ctx.device.type == "cuda"

    def step(mode: str) -> None:
        opt.zero_grad(set_to_none=True)
        _gpt_loss(model, idx, targets, mode).backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize(ctx.device)

    for mode in modes:
        step(mode)
    memory = {}
    for mode in modes:
        opt.zero_grad(set_to_none=True)
        held = sum(_state_bytes(params, opt))
        if cuda:
            torch.cuda.reset_peak_memory_stats(ctx.device)
        with PeakTracker() as tracker:
            step(mode)
        state = _state_bytes(params, opt)
        saved = saved_activation_bytes(model, lambda mode=mode: _gpt_loss(model, idx, targets, mode))
        cuda_peak = torch.cuda.max_memory_allocated(ctx.device) if cuda else None
        memory[mode] = (*state, saved, held + tracker.peak, cuda_peak)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(rounds):
        for mode in modes:
            start = time.perf_counter()
            step(mode)
            times[mode].append(time.perf_counter() - start)
    n_params = sum(p.numel() for p in params)
    return [GPTStep(config, batch, mode, n_params, *memory[mode], step_s=times[mode]) for mode in modes]


def gpt_steps(ctx: RankContext, configs: list[GPTConfig], batch: int, modes: list[str],
              rounds: int = 5) -> list[GPTStep]:
    """Worker: Adam steps of each GPT in each mode: memory measured once per mode, times alternated (chapter 6).

    Per GPT, after a warm-up step per mode (which creates Adam's state), each mode runs one
    step under :class:`PeakTracker` (and the GPU's peak counter) and one forward that counts
    the saved activations; then ``rounds`` rounds time one step of each mode in turn
    (A B C A B C …), so that a busy machine slows all modes alike. Ticks once per GPT.
    """
    for mode in modes:
        memory_model.check_choice("mode", mode, tuple(MODES))
    memory_model.check_count(batch=batch)
    steps = []
    for config in configs:
        steps += _steps_of_one_gpt(ctx, config, batch, modes, rounds)
        ctx.tick()
    return steps
