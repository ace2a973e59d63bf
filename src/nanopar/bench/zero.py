"""``python -m nanopar bench zero``: ZeRO stages, ours and PyTorch's, memory and speed per rank (chapter 6.5).

One GPT trains with Adam under each configuration ``(impl, stage)`` of :data:`ZERO_CONFIGS`,
inside one launch per world size, the configurations taking turns round by round (in
reversed order every other round):

* ``ddp``, stage 0: ``DistributedDataParallel`` with ``gradient_as_bucket_view=True`` (the
  gradients are views into DDP's buckets, so they are not held twice);
* ``nanopar``, stages 0–3: :class:`nanopar.zero.ZeroDataParallel`, one unit per GPT block;
* ``zero_redundancy_optimizer``, stage 1: DDP plus ``torch.distributed.optim.ZeroRedundancyOptimizer``;
  it all-reduces the full gradients (DDP), updates its share of whole parameter tensors and
  broadcasts them: 1.5× the traffic of the ZeRO-1 formula, and uneven shares;
* ``fsdp2``, stage 3: ``fully_shard`` on each block, then on the GPT, over a 1-D CPU DeviceMesh (gloo).

Per configuration the record gives the bytes of parameters, gradients and optimizer state
held by the rank that holds most, right after a step (every tensor's storage counted once,
DTensors by their local shard), beside :func:`nanopar.zero.zero_bytes_per_rank`; the bytes that
each rank sends per step, counted at the collectives (:mod:`nanopar.bench.traffic`, ring
factors; DDP's all-reduce goes through its default comm hook so that it can be counted),
beside :func:`nanopar.zero.zero_comm_bytes`; the median step (the slowest rank's); and the
largest difference of its parameters from one process training on the same global batches.

:func:`fsdp1_hybrid_shard` is the worker of chapter 6.5's lesson in checking an engine against
one process: FSDP1's ``HYBRID_SHARD`` on CPU, without and with an explicit 2-D device mesh.
"""
from __future__ import annotations

import functools
import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import models
from ..launch import RankContext, run
from ..sharding import split_batch
from ..training import TrainConfig, global_batches, make_optimizer, seeded, train_single
from ..zero import ZeroDataParallel, state_bytes, zero_bytes_per_rank, zero_comm_bytes
from .common import KEEP_FREED_MEMORY, gpt_on_text, slowest_rank, timed
from .traffic import count_traffic

ZERO_CONFIGS = (("ddp", 0), ("nanopar", 0), ("nanopar", 1), ("nanopar", 2), ("nanopar", 3),
                ("zero_redundancy_optimizer", 1), ("fsdp2", 3))
ZERO_MODEL = {"block_size": 64, "n_layer": 4, "n_head": 4, "n_embd": 128}
ZERO_QUICK_MODEL = {"block_size": 32, "n_layer": 2, "n_head": 4, "n_embd": 64}
ZERO_BATCH, ZERO_QUICK_BATCH = 16, 8  # global batches: they split over 2 and 4 ranks
LR = 1e-3


@dataclass
class _Trainer:
    """One configuration on one rank: a training step, the bytes it holds, its full parameters."""

    step: Callable[[torch.Tensor, torch.Tensor], None]
    held: Callable[[], dict[str, int]]
    params: Callable[[], dict[str, torch.Tensor]]


def zero_trainer(impl: str, stage: int, net: nn.Module, lr: float = LR) -> _Trainer:
    """``net`` (a GPT) wrapped as configuration ``(impl, stage)`` of ``bench zero``, with Adam (chapter 6.5)."""
    if (impl, stage) not in ZERO_CONFIGS:
        raise ValueError(f"unknown configuration {(impl, stage)}; choose one of {ZERO_CONFIGS}")
    adam = functools.partial(torch.optim.Adam, lr=lr)
    if impl == "nanopar":
        model = opt = ZeroDataParallel(net, adam, stage)  # it zeroes and steps as an optimizer does
        held, params = model.held_bytes, model.full_parameters
    else:
        if impl == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (dist.get_world_size(),))
            for block in net:
                fully_shard(block, mesh=mesh)
            model = fully_shard(net, mesh=mesh)
            opt = inner = adam(net.parameters())
        else:
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
            from torch.distributed.optim import ZeroRedundancyOptimizer
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(net, gradient_as_bucket_view=True)
            model.register_comm_hook(None, allreduce_hook)  # DDP's own all-reduce, through Python: countable
            if impl == "ddp":
                opt = inner = adam(net.parameters())
            else:
                opt = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=torch.optim.Adam, lr=lr)
                inner = opt.optim  # this rank's share of the optimizer

        def held() -> dict[str, int]:
            return state_bytes(list(net.parameters()), inner)

        def params() -> dict[str, torch.Tensor]:  # FSDP2's parameters are DTensors: gathered (a collective)
            return {k: (v.full_tensor() if impl == "fsdp2" else v.detach()).clone() for k, v in net.named_parameters()}

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad()
        models.gpt_loss(model(x), y).backward()
        opt.step()

    return _Trainer(step, held, params)


def zero_data(quick: bool, batch: int, steps: int,
              seed: int = 0) -> tuple[models.GPTConfig, torch.Tensor, torch.Tensor]:
    """The GPT of ``bench zero`` and ``steps`` global batches of ``batch`` windows of Shakespeare (chapter 6.5)."""
    return gpt_on_text(ZERO_QUICK_MODEL if quick else ZERO_MODEL, steps * batch, seed)


def zero_timed_steps(ctx: RankContext, configs: Sequence[tuple[str, int]], config: models.GPTConfig,
                     x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, rounds: int,
                     steps_per_round: int) -> dict[str, Any]:
    """Worker for ``bench zero``: every configuration's step times, bytes sent and held, final parameters.

    Each configuration runs one warm-up step, one counted step (bytes sent, then bytes held),
    then ``rounds`` rounds of ``steps_per_round`` timed steps (``cfg.steps`` in all), taking the
    global batches in order. Parameters come back from rank 0 only.
    """
    rank, size = dist.get_rank(), dist.get_world_size()
    trainers, sent, held = {}, {}, {}
    for impl, stage in configs:
        trainer = zero_trainer(impl, stage, seeded(functools.partial(models.gpt, config)), cfg.lr)
        batches = global_batches(x, y, cfg)

        def step(trainer=trainer, batches=batches) -> None:
            xb, yb = next(batches)
            trainer.step(split_batch(xb, rank, size), split_batch(yb, rank, size))

        step()  # DDP rebuilds its buckets, Adam creates its state: not a step like the others
        with count_traffic({}) as traffic:
            step()
        sent[(impl, stage)] = sum(traffic.wire_bytes().values())
        held[(impl, stage)] = trainer.held()
        trainers[(impl, stage)] = (trainer, step)
    times: dict[tuple, list[float]] = {c: [] for c in configs}
    for r in range(rounds):
        for c in list(configs)[:: 1 if r % 2 == 0 else -1]:
            times[c].append(timed(trainers[c][1], barrier=True, repeat=steps_per_round))
        ctx.tick()
    params = {c: trainer.params() for c, (trainer, _) in trainers.items()}  # collectives for fsdp2 and ours
    dist.barrier()
    return {"times": times, "sent": sent, "held": held, "params": params if rank == 0 else None}


def zero_batch(world_sizes: Sequence[int], quick: bool) -> int:
    """The global batch of ``bench zero``, after checking that it splits over every world size (chapter 6.5)."""
    if not world_sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in world_sizes):
        raise ValueError(f"world sizes must be whole numbers >= 2 (ZeRO shards over ranks), got {list(world_sizes)}")
    batch = ZERO_QUICK_BATCH if quick else ZERO_BATCH
    bad = [n for n in world_sizes if batch % n]
    if bad:
        raise ValueError(f"the global batch of {batch} does not split over {bad} ranks: use world sizes dividing it")
    return batch


def bench_zero(world_sizes: Sequence[int] = (2, 4), quick: bool = False, rounds: int | None = None,
               steps_per_round: int | None = None, configs: Sequence[tuple[str, int]] = ZERO_CONFIGS,
               timeout: float = 600.0, progress: Any = None) -> list[dict[str, Any]]:
    """Train the GPT under every configuration and world size; one record per pair (chapter 6.5).

    Records: ``impl, stage, world_size, model, params, batch, param_bytes, grad_bytes,
    optim_bytes, held_bytes`` (the rank holding most), ``predicted_bytes`` and
    ``held_vs_predicted`` (fp32 Adam, :func:`~nanopar.zero.zero_bytes_per_rank`), ``comm_bytes``
    (bytes sent per rank per step, mean over ranks), ``comm_bytes_predicted``, ``step_s`` (median,
    with ``step_s_min``/``step_s_max``) and ``max_abs_diff_vs_single``.
    """
    batch = zero_batch(world_sizes, quick)
    rounds = rounds or (3 if quick else 10)
    steps_per_round = steps_per_round or (2 if quick else 3)
    cfg = TrainConfig(steps=2 + rounds * steps_per_round, global_batch=batch, lr=LR, optimizer="adam")
    config, x, y = zero_data(quick, batch, cfg.steps)
    build = functools.partial(seeded, functools.partial(models.gpt, config))
    reference = train_single(build, x, y, cfg, loss_fn=models.gpt_loss)["state"]
    n_params = sum(v.numel() for v in reference.values())
    model = f"gpt {config.n_layer}x{config.n_embd}, {config.n_head} heads, {n_params / 1e6:.2f} M params"
    records = []
    for n in world_sizes:
        out = run(zero_timed_steps, n, list(configs), config, x, y, cfg, rounds, steps_per_round,
                  backend="gloo", timeout=timeout, progress=progress, env=KEEP_FREED_MEMORY)
        for impl, stage in configs:
            c = (impl, stage)
            steps = slowest_rank([rank["times"][c] for rank in out])
            most = max((rank["held"][c] for rank in out), key=lambda h: sum(h.values()))
            predicted = zero_bytes_per_rank(n_params, n, stage)["total_bytes"]
            params = out[0]["params"][c]
            records.append({
                "impl": impl, "stage": stage, "world_size": n, "model": model, "params": n_params, "batch": batch,
                **most, "held_bytes": sum(most.values()), "predicted_bytes": predicted,
                "held_vs_predicted": sum(most.values()) / predicted,
                "comm_bytes": statistics.mean(rank["sent"][c] for rank in out),
                "comm_bytes_predicted": zero_comm_bytes(n_params, n, stage),
                "step_s": statistics.median(steps), "step_s_min": min(steps), "step_s_max": max(steps),
                "rounds": rounds, "steps_per_round": steps_per_round,
                "max_abs_diff_vs_single": max((params[k] - v).abs().max().item() for k, v in reference.items())})
    return records


def fsdp1_hybrid_shard(ctx: RankContext, build: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor,
                       cfg: TrainConfig) -> list[tuple[dict[str, torch.Tensor], list[str]]]:
    """Worker: FSDP1 ``HYBRID_SHARD`` (one unit per GPT block) trains ``build()`` twice, first without a
    device mesh, then on a mesh of N/2 replicas × 2 shards (chapter 6.5).

    Returns, per run, this rank's full parameters and the warnings that mention ``NO_SHARD``. On a CPU
    (torch 2.14.1) the run without a mesh shards within a "node" of ``torch.cpu.device_count()`` = 1
    rank, switches that group of one to ``NO_SHARD`` (warning so) and reduces the gradients within it
    only: the replicas never average. The explicit mesh gives each shard group 2 ranks.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    rank, size = dist.get_rank(), dist.get_world_size()
    if size % 2:
        raise ValueError(f"a mesh of replicas × 2 shards needs an even number of ranks, got {size}: use 2, 4, …")
    out = []
    for mesh in (None, init_device_mesh("cpu", (size // 2, 2), mesh_dim_names=("replicate", "shard"))):
        net = build()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = FullyShardedDataParallel(net, sharding_strategy=ShardingStrategy.HYBRID_SHARD,
                                             auto_wrap_policy=ModuleWrapPolicy({models.Block}),
                                             device_id=torch.device("cpu"), device_mesh=mesh)
        optimizer = make_optimizer(cfg, model.parameters())
        for xb, yb in global_batches(x, y, cfg):
            optimizer.zero_grad()
            models.gpt_loss(model(split_batch(xb, rank, size)), split_batch(yb, rank, size)).backward()
            optimizer.step()
        with FullyShardedDataParallel.summon_full_params(model):
            params = {k.replace("_fsdp_wrapped_module.", ""): v.detach().clone() for k, v in net.named_parameters()}
        out.append((params, [str(w.message) for w in caught if "NO_SHARD" in str(w.message)]))
    return out
