"""``python -m nanopar bench hybrid``: every grid of 4 ranks training one GPT, side by side (chapter 3.3).

The six shapes dp × pp × tp of a world of 4 (4×1×1, 2×2×1, 2×1×2, 1×2×2, 1×4×1, 1×1×4) train
the same GPT on the same global batches, inside one launch of 4 ranks: each rank builds
its part of every shape, then the shapes take turns, round by round (in reversed order
every other round), so that a slow minute of the shared machine hurts them alike. Per
shape the record gives:

* samples per second: the global batch over the median step (the slowest rank's);
* the payload bytes of one step by axis, counted at the collectives
  (:mod:`nanopar.bench.traffic`) and summed over the ranks, beside the formulas of
  chapter 3.3 (:func:`nanopar.comm_volume.hybrid_comm_bytes`), and the ring's wire bytes;
* the largest difference of its parameters, after every step it ran, from one process
  training with the same micro-batches (``hybrid.single_process_reference``).
"""
from __future__ import annotations

import functools
import statistics
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .. import devices, models, schedules
from ..comm_volume import gpt_param_counts, hybrid_comm_bytes
from ..grid import AXES, Grid, Topology
from ..hybrid import build_hybrid, check_batch, full_parameters, gpt_boundaries, hybrid_step, \
    merge_parameters, single_process_reference
from ..launch import RankContext, run
from ..tensor_parallel import parallelize_gpt
from ..training import TrainConfig, global_batches, make_optimizer, seeded
from .common import KEEP_FREED_MEMORY, gpt_on_text, slowest_rank, timed
from .traffic import count_traffic

HYBRID_WORLD = 4
HYBRID_SHAPES = ((4, 1, 1), (2, 2, 1), (2, 1, 2), (1, 2, 2), (1, 4, 1), (1, 1, 4))  # (dp, pp, tp)
# n_layer and n_head divide by 4, so that pp = 4 and tp = 4 both fit; the vocabulary is the corpus's.
HYBRID_MODEL = {"block_size": 64, "n_layer": 4, "n_head": 4, "n_embd": 128}
HYBRID_QUICK_MODEL = {"block_size": 32, "n_layer": 4, "n_head": 4, "n_embd": 64}
HYBRID_BATCH, HYBRID_QUICK_BATCH = 32, 16
SCHEDULE = "1f1b"
MICROBATCHES_PER_STAGE = 2  # a pipeline of p stages runs 2p micro-batches: bubble (p−1)/(3p−1)
LR = 0.05


def hybrid_microbatches(topology: Topology) -> int:
    """The micro-batches per replica of ``bench hybrid``: one without a pipeline, else 2 per stage."""
    return 1 if topology.pp == 1 else MICROBATCHES_PER_STAGE * topology.pp


def _build(config: models.GPTConfig) -> Any:
    return functools.partial(seeded, functools.partial(models.gpt, config))


def hybrid_data(quick: bool, batch: int, steps: int,
                seed: int = 0) -> tuple[models.GPTConfig, torch.Tensor, torch.Tensor]:
    """The GPT of ``bench hybrid`` and ``steps`` global batches of ``batch`` windows of Shakespeare (chapter 3.3)."""
    return gpt_on_text(HYBRID_QUICK_MODEL if quick else HYBRID_MODEL, steps * batch, seed)


def hybrid_timed_steps(ctx: RankContext, shapes: Sequence[tuple[int, int, int]], config: models.GPTConfig,
                       x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, rounds: int,
                       steps_per_round: int) -> dict[str, Any]:
    """Worker for ``bench hybrid``: every shape's step times, one step's traffic, and its final parameters.

    Each shape runs one warm-up step, one counted step, then ``rounds`` rounds of
    ``steps_per_round`` timed steps (``cfg.steps`` in all), taking the global batches in order.
    Then rank r trains the one-process references of shapes r, r + N, …: on one thread
    each, where the caller's process would contend for the cores.
    """
    if cfg.steps != 2 + rounds * steps_per_round:
        raise ValueError(f"cfg.steps={cfg.steps}, but each shape runs 2 + rounds × steps_per_round = "
                         f"{2 + rounds * steps_per_round} steps: pass a TrainConfig with that many")
    runs = []
    for shape in shapes:
        topo = Topology(*shape)
        grid = Grid(topo)
        model = build_hybrid(_build(config), gpt_boundaries(config, topo.pp), grid, ctx.device,
                             shard=parallelize_gpt)
        ops = schedules.make(SCHEDULE, topo.pp, hybrid_microbatches(topo))
        batches = global_batches(x, y, cfg)
        opt = make_optimizer(cfg, model.parameters())

        def step(model=model, opt=opt, grid=grid, ops=ops, batches=batches) -> None:
            xb, yb = next(batches)
            hybrid_step(model, opt, grid, ops, xb, yb, ctx.device, models.gpt_loss)

        step()  # the first step also agrees on the order of the DP buckets: not a step like the others
        with count_traffic({grid.group(a): a for a in AXES}) as traffic:
            step()
        runs.append((shape, grid, model, step, traffic))
    times: dict[tuple, list[float]] = {shape: [] for shape in shapes}
    for r in range(rounds):
        for shape, _, _, step, _ in runs[:: 1 if r % 2 == 0 else -1]:
            times[shape].append(timed(step, barrier=True, repeat=steps_per_round))
        ctx.tick()
    dist.barrier()
    references = {shape: single_process_reference(_build(config), x, y, cfg, Topology(*shape),
                                                  hybrid_microbatches(Topology(*shape)), models.gpt_loss)["params"]
                  for shape in shapes[ctx.rank:: ctx.world_size]}
    return {"times": times, "references": references,
            "payload": {shape: traffic.payload() for shape, _, _, _, traffic in runs},
            "wire": {shape: traffic.wire_bytes() for shape, _, _, _, traffic in runs},
            "params": {shape: full_parameters(model, grid) for shape, grid, model, _, _ in runs}}


def bench_hybrid(quick: bool = False, rounds: int | None = None, steps_per_round: int | None = None,
                 shapes: Sequence[tuple[int, int, int]] = HYBRID_SHAPES, timeout: float = 600.0,
                 progress: Any = None) -> list[dict[str, Any]]:
    """Train every grid shape of 4 ranks side by side; one record per shape (chapter 3.3).

    ``quick`` (about a minute on 2 cores) takes the small GPT and batch and fewer rounds.
    Records: ``dp, pp, tp, shape, model, batch, seq_len, microbatches, samples_per_s,
    step_s`` (median, with ``step_s_min``/``step_s_max``), ``comm_bytes_{dp,pp,tp}``
    (counted payload per step, all ranks), ``comm_bytes_{dp,pp,tp}_formula``,
    ``wire_bytes_{dp,pp,tp}`` and ``max_abs_diff_vs_single``.
    """
    batch = HYBRID_QUICK_BATCH if quick else HYBRID_BATCH
    rounds = rounds or (4 if quick else 10)
    steps_per_round = steps_per_round or (2 if quick else 3)
    topologies = [Topology(*shape) for shape in shapes]
    for topo in topologies:
        topo.check_world(HYBRID_WORLD)
        check_batch(batch, topo, hybrid_microbatches(topo))
    cfg = TrainConfig(steps=2 + rounds * steps_per_round, global_batch=batch, lr=LR)
    config, x, y = hybrid_data(quick, batch, cfg.steps)
    out = run(hybrid_timed_steps, HYBRID_WORLD, list(shapes), config, x, y, cfg, rounds, steps_per_round,
              timeout=timeout, progress=progress, env=KEEP_FREED_MEMORY)
    n_params = gpt_param_counts(config)["total"]
    model = f"gpt {config.n_layer}x{config.n_embd}, {config.n_head} heads, {n_params / 1e6:.2f} M params"
    records = []
    for shape, topo in zip(shapes, topologies):
        m = hybrid_microbatches(topo)
        steps = slowest_rank([rank["times"][shape] for rank in out])
        reference = next(rank["references"][shape] for rank in out if shape in rank["references"])
        merged = merge_parameters([rank["params"][shape] for rank in out])
        formula = hybrid_comm_bytes(config, topo, batch, m)
        record = {"dp": topo.dp, "pp": topo.pp, "tp": topo.tp, "shape": f"{topo.dp}×{topo.pp}×{topo.tp}",
                  "model": model, "batch": batch, "seq_len": config.block_size, "microbatches": m,
                  "schedule": SCHEDULE, "cpu_cores": devices.cpu_cores(), "rounds": rounds,
                  "steps_per_round": steps_per_round,
                  "step_s": statistics.median(steps), "step_s_min": min(steps), "step_s_max": max(steps),
                  "samples_per_s": batch / statistics.median(steps),
                  "max_abs_diff_vs_single": max((merged[k] - v).abs().max().item() for k, v in reference.items())}
        for axis in AXES:
            record[f"comm_bytes_{axis}"] = sum(rank["payload"][shape].get(axis, 0) for rank in out)
            record[f"comm_bytes_{axis}_formula"] = formula[axis]
            record[f"wire_bytes_{axis}"] = sum(rank["wire"][shape].get(axis, 0.0) for rank in out)
        # collectives outside the grid's groups (none expected: a step talks only along its axes)
        record["comm_bytes_other"] = sum(v for rank in out for k, v in rank["payload"][shape].items() if k not in AXES)
        records.append(record)
    return records
