"""Memory and speed of a training step, measured: the check of ``nanopar.cost``'s memory model (chapter 1)."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from .. import cost
from ..launch import RankContext
from ..models import mlp


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
    optimizer's state), so they can be checked against :func:`nanopar.cost.bytes_per_param`. The step
    time is the median (and range) over ``steps`` steps after one untimed warm-up step;
    achieved FLOP/s counts 6 · params · batch per median step. Runs in this process with
    torch's current thread count; :func:`measure_growth` runs it in a clean rank.
    """
    cost.check_choice("optimizer", optimizer, cost.OPTIMIZERS)
    cost.check_positive(batch=batch, steps=steps)
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
    state = [(t, p) for p in params for t in opt.state.get(p, {}).values() if torch.is_tensor(t)]
    n_params = sum(p.numel() for p in params)
    return StepMeasurement(
        width, depth, batch, optimizer, n_params,
        weight_bytes=sum(p.nbytes for p in params),
        grad_bytes=sum(p.grad.nbytes for p in params),
        optimizer_bytes=sum(t.nbytes for t, p in state if t.shape == p.shape),
        bookkeeping_bytes=sum(t.nbytes for t, p in state if t.shape != p.shape),
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
