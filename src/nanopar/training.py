"""Training loops shared by chapter 3.1, chapter 4.1, the tests and ``bench dp``.

The same data, seed and configuration run two ways, so that the results can be
compared: :func:`train_single` in one process on the whole global batch (the reference),
and :func:`train_data_parallel`, a worker for ``nanopar.launch.run`` in which each rank
trains on its shard with one of the data-parallel implementations:

* ``"naive"`` / ``"bucketed"``: ours (``nanopar.data_parallel``);
* ``"ddp"``: PyTorch's ``DistributedDataParallel``.

Both take an optional process group (a data-parallel group of a larger grid); the
shards are then split over that group's ranks.

Models are passed as *builders* (an importable function or a ``functools.partial`` of
one), because each rank must build its own copy.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .buckets import bucket_cap_bytes
from .data_parallel import BucketedDataParallel, NaiveDataParallel, check_same_parameters
from .launch import RankContext
from .sharding import split_batch
from .sync_batchnorm import convert_sync_batchnorm

IMPLS = ("naive", "bucketed", "ddp")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``global_batch`` samples per optimizer step, over all ranks;
    with ``accumulate`` = k, each step is k micro-batches of ``global_batch / k``.

    ``check_every`` = k > 0 is a debugging aid: every k steps, the data-parallel loop
    checks that the replicas are still identical (a fingerprint of the parameters, one
    small all-gather) and raises on every rank, naming the first tensor that differs,
    if a step's gradients were not synchronised. 0 (the default) turns it off.
    """

    steps: int = 3
    global_batch: int = 16
    lr: float = 0.1
    optimizer: str = "sgd"
    accumulate: int = 1
    impl: str = "bucketed"
    bucket_cap_mb: float = 25.0
    sync_batchnorm: bool = False
    find_unused_parameters: bool = False
    seed: int = 0
    check_every: int = 0

    def __post_init__(self):
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if self.accumulate < 1 or self.global_batch % self.accumulate:
            raise ValueError(f"accumulate={self.accumulate} must divide global_batch={self.global_batch}")
        bucket_cap_bytes(self.bucket_cap_mb)
        if isinstance(self.check_every, bool) or not isinstance(self.check_every, int) or self.check_every < 0:
            raise ValueError(f"check_every must be a whole number of steps (0: off), got {self.check_every!r}")

    def checks_replicas_after(self, step: int) -> bool:
        """Whether the loop compares the replicas after ``step`` (counted from 1)."""
        return bool(self.check_every) and step % self.check_every == 0


def seeded(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """``build()`` under a fixed seed: the same weights in every process that calls it.

    Use ``functools.partial(seeded, build)`` to hand ranks a builder of identical models.
    """
    torch.manual_seed(seed)
    return build()


def make_classification_data(samples: int, shape: tuple[int, ...], classes: int, seed: int = 0):
    """Random inputs and labels: enough to check that parallel training is exact."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(samples, *shape, generator=g), torch.randint(0, classes, (samples,), generator=g)


def make_pattern_images(samples: int, classes: int, size: int = 32, noise: float = 1.0, seed: int = 0):
    """Images that can be learned: each class is a fixed random pattern plus noise.

    A stand-in for a real data set (none is downloaded here); a model that learns shows
    a falling loss within a few dozen steps.
    """
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(classes, 3, size, size, generator=g)
    y = torch.randint(0, classes, (samples,), generator=g)
    return patterns[y] + noise * torch.randn(samples, 3, size, size, generator=g), y


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """The optimizer that ``cfg`` names, over ``params`` (one place, so every loop agrees)."""
    return torch.optim.SGD(params, lr=cfg.lr) if cfg.optimizer == "sgd" else torch.optim.Adam(params, lr=cfg.lr)


def global_batches(x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig):
    """The ``cfg.steps`` global batches every loop trains on, cycling through the data in order."""
    if x.shape[0] < cfg.global_batch:
        raise ValueError(f"the data has {x.shape[0]} samples, fewer than one global batch of {cfg.global_batch}")
    per_epoch = x.shape[0] // cfg.global_batch
    for step in range(cfg.steps):
        i = step % per_epoch * cfg.global_batch
        yield x[i: i + cfg.global_batch], y[i: i + cfg.global_batch]


def _micro_batches(x: torch.Tensor, y: torch.Tensor, k: int):
    return zip(x.chunk(k), y.chunk(k))


def train_single(build: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy) -> dict[str, Any]:
    """The reference: one process, the whole global batch per step (chapter 3.1).

    ``loss_fn(output, target)`` is a micro-batch's mean loss (``models.gpt_loss`` for a language model).
    """
    torch.manual_seed(cfg.seed)
    model = build()
    opt = make_optimizer(cfg, model.parameters())
    losses = []
    for xb, yb in global_batches(x, y, cfg):
        opt.zero_grad()
        total = 0.0
        for xm, ym in _micro_batches(xb, yb, cfg.accumulate):
            loss = loss_fn(model(xm), ym) / cfg.accumulate
            loss.backward()
            total += loss.item()
        losses.append(total)
        opt.step()
    return {"state": model.state_dict(), "losses": losses}


def wrap(model: nn.Module, cfg: TrainConfig, group=None) -> tuple[nn.Module, Callable[[], None]]:
    """The model wrapped for data parallelism over ``group``, and what to call after backward (chapter 4.1)."""
    if cfg.sync_batchnorm:
        model = convert_sync_batchnorm(model, group)
    if cfg.impl == "ddp":
        ddp = DistributedDataParallel(model, process_group=group, bucket_cap_mb=cfg.bucket_cap_mb,
                                      find_unused_parameters=cfg.find_unused_parameters, **_ddp_buffers_at_init_only())
        return ddp, lambda: None  # DDP synchronises inside backward
    cls = NaiveDataParallel if cfg.impl == "naive" else BucketedDataParallel
    kwargs = {"bucket_cap_mb": cfg.bucket_cap_mb} if cfg.impl == "bucketed" else {}
    dp = cls(model, group=group, find_unused_parameters=cfg.find_unused_parameters, **kwargs)
    return dp, dp.sync_gradients


def _ddp_buffers_at_init_only() -> dict[str, bool]:
    # Like our wrappers: buffers (BatchNorm statistics) are synchronised once, at the
    # start, then stay per rank. torch 2.14 renamed the option and warns on the old name.
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def train_data_parallel(ctx: RankContext, build: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor,
                        cfg: TrainConfig, group=None) -> dict[str, Any]:
    """Worker: train on this rank's shard of every global batch; return the final state (chapter 4.1).

    Each of the N ranks of ``group`` (default: all) gets ``global_batch / N`` samples per
    step (split evenly, or an error). The losses returned are this rank's; the global
    loss is their mean over ranks.
    """
    torch.manual_seed(cfg.seed + ctx.rank)  # deliberately different: the broadcast must fix it
    model, sync = wrap(build().to(ctx.device), cfg, group)
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    opt = make_optimizer(cfg, model.parameters())
    losses = []
    for step, (xb, yb) in enumerate(global_batches(x, y, cfg), start=1):
        xr = split_batch(xb, rank, size).to(ctx.device)
        yr = split_batch(yb, rank, size).to(ctx.device)
        opt.zero_grad()
        total = 0.0
        micro = list(_micro_batches(xr, yr, cfg.accumulate))
        for i, (xm, ym) in enumerate(micro):
            last = i == len(micro) - 1
            with (model.no_sync() if not last else contextlib.nullcontext()):
                loss = F.cross_entropy(model(xm), ym) / cfg.accumulate
                loss.backward()
            total += loss.item()
        sync()
        losses.append(total)
        opt.step()
        if cfg.checks_replicas_after(step):
            check_same_parameters(model.module, group, after_step=step)
        ctx.tick()
    inner = model.module
    return {"state": {k: v.cpu() for k, v in inner.state_dict().items()}, "losses": losses}


def averaged_gradients(ctx: RankContext, build: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor,
                       cfg: TrainConfig, group=None) -> dict[str, torch.Tensor]:
    """Worker: one backward on this rank's shard, then the gradient averaged over ``group`` (chapter 3.1)."""
    model, sync = wrap(build().to(ctx.device), replace(cfg, steps=1), group)
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    xr, yr = split_batch(x, rank, size), split_batch(y, rank, size)
    F.cross_entropy(model(xr.to(ctx.device)), yr.to(ctx.device)).backward()
    sync()
    return {n: p.grad.cpu() for n, p in model.module.named_parameters()}


def full_batch_gradients(build: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reference gradient: one process, the whole batch (chapter 3.1)."""
    model = build()
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad for n, p in model.named_parameters()}
