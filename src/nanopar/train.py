"""Train the GPT (or ResNet50) with data, pipeline and tensor parallelism from the command line (chapter 4, hybrid training).

    python -m nanopar.train --dp 2 --pp 2 --steps 40 --out runs/gpt            # 4 ranks started here
    torchrun --standalone --nproc_per_node=4 -m nanopar.train --dp 2 --pp 2 --steps 40 --out runs/gpt
    python -m nanopar.train --dp 2 --pp 2 --steps 80 --out runs/gpt --resume   # on to step 80
    # two machines of 8 GPUs each (run on both; --out on a file system they share):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        -m nanopar.train --preset 100m --pp 2 --tp 4 --batch 64 --steps 5000 --out /shared/runs/gpt100m

Outside torchrun the ranks are processes started here (``--nproc``, default dp·pp·tp);
under torchrun there is one rank per process it started, on one machine or several
(its rendezvous), and ``--dp`` defaults to what pp·tp leave of the world. gloo on CPUs,
NCCL where every local rank has a GPU. Rank 0 shows a progress bar; the last stage's
first rank prints the training and validation loss every ``--eval-every`` steps. A
checkpoint (``nanopar.checkpoint``) is written every ``--checkpoint-every`` steps and at
the end; ``--resume`` continues from it to the new ``--steps`` and ends with the
parameters an uninterrupted run would have had (bit for bit with up to two replicas; with
more, the restarted replicas lay out their gradient buckets afresh, so the all-reduce may
add in another order: equal up to rounding). Every bad setting is reported before any
rank starts.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from . import checkpoint, hybrid, models, schedules, text
from .grid import Grid, Topology
from .launch import RankContext, run, under_torchrun
from .model_split import even_split_points, resnet50_blocks
from .tensor_parallel import parallelize_gpt
from .training import TrainConfig, make_optimizer, make_pattern_images, seeded

PRESETS = {"tiny": models.GPTConfig.tiny, "100m": models.GPTConfig.gpt_100m}
RESNET_CLASSES = 10


@dataclass
class Task:
    """What a rank trains: the model's builder and cut, its loss, and its data."""

    build: Callable[..., torch.nn.Module]
    boundaries: list[int] | list[str]
    shard: hybrid.Shard | None
    loss_fn: Callable
    sample: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]  # the next global batch
    val: tuple[torch.Tensor, torch.Tensor]  # the held-out batch every evaluation uses


def _gpt_task(args: argparse.Namespace) -> tuple[Task, dict[str, Any]]:
    corpus = text.load_corpus()
    tok = text.CharTokenizer(corpus)
    train, val = text.train_val_split(tok.encode(corpus))
    config = PRESETS[args.preset](vocab_size=tok.vocab_size)
    sample = functools.partial(text.get_batch, train, args.batch, config.block_size)
    task = Task(functools.partial(seeded, functools.partial(models.gpt, config), args.seed),
                hybrid.gpt_boundaries(config, args.pp), parallelize_gpt, models.gpt_loss, sample,
                text.get_batch(val, args.batch, config.block_size, torch.Generator().manual_seed(args.seed + 1)))
    return task, {"model": "gpt", "config": asdict(config)}


def _resnet_task(args: argparse.Namespace) -> tuple[Task, dict[str, Any]]:
    if args.tp > 1:
        raise ValueError("tensor parallelism here shards the GPT's blocks only: use --tp 1 with --model resnet50")
    with torch.device("meta"):  # only its blocks are counted
        n_blocks = len(resnet50_blocks(models.resnet50(RESNET_CLASSES)))
    if args.pp > n_blocks:
        raise ValueError(f"ResNet50's {n_blocks} blocks cannot make {args.pp} pipeline stages: use --pp {n_blocks} "
                         "at most")
    x, y = make_pattern_images(max(256, 4 * args.batch), RESNET_CLASSES, size=args.image_size, seed=args.seed)

    def sample(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(x), (args.batch,), generator=gen)
        return x[idx], y[idx]

    val = make_pattern_images(args.batch, RESNET_CLASSES, size=args.image_size, seed=args.seed + 1)
    task = Task(functools.partial(seeded, functools.partial(models.resnet50, RESNET_CLASSES), args.seed),
                even_split_points(n_blocks, args.pp), None, torch.nn.functional.cross_entropy, sample, val)
    return task, {"model": "resnet50", "config": {"image_size": args.image_size, "classes": RESNET_CLASSES}}


def make_task(args: argparse.Namespace) -> tuple[Task, dict[str, Any]]:
    """The task of ``--model``, and what a checkpoint must match: model, config and optimizer."""
    task, described = (_gpt_task if args.model == "gpt" else _resnet_task)(args)
    return task, {**described, "optimizer": args.optimizer}


def topology_of(args: argparse.Namespace, world_size: int) -> Topology:
    """The grid of ``world_size`` ranks that ``--dp --pp --tp`` ask for (chapter 4, hybrid training)."""
    return Topology.for_world(world_size, args.dp, args.pp, args.tp)


def train_worker(ctx: RankContext, args: argparse.Namespace) -> dict[str, Any]:
    """Worker: train as ``args`` say, from the checkpoint with ``--resume`` (chapter 4, hybrid training).

    Returns this rank's place, the global batch's loss at each step it ran (last stage;
    None elsewhere) and the validation losses as ``(step, loss)``.
    """
    grid = Grid(topology_of(args, ctx.world_size))
    task, described = make_task(args)
    cfg = TrainConfig(steps=args.steps, global_batch=args.batch, lr=args.lr, optimizer=args.optimizer, seed=args.seed,
                      check_every=args.check_every)
    model = hybrid.build_hybrid(task.build, task.boundaries, grid, ctx.device, task.shard)
    opt = make_optimizer(cfg, model.parameters())
    data = torch.Generator().manual_seed(args.seed)
    start = 0
    if args.resume:
        shard = checkpoint.load(args.out, checkpoint.read_manifest(args.out), grid, ctx.device)
        hybrid.unwrap(model).load_state_dict(shard["model"])
        opt.load_state_dict(shard["optimizer"])
        data.set_state(shard["data_rng"].cpu())
        start = shard["step"]
    ops = schedules.make(args.schedule, grid.size("pp"), args.microbatches)
    reporter = grid.index("dp") == grid.index("tp") == 0 and grid.index("pp") == grid.size("pp") - 1
    losses, evals = [], []
    for step in range(start + 1, args.steps + 1):
        x, y = task.sample(data)
        losses.append(hybrid.hybrid_step(model, opt, grid, ops, x, y, ctx.device, task.loss_fn))
        if cfg.checks_replicas_after(step):
            hybrid.check_replicas(model, grid, step, ctx.device)
        ctx.tick()
        last = step == args.steps
        if args.eval_every and (step % args.eval_every == 0 or last):
            val = hybrid.evaluate(model, grid, ops, *task.val, ctx.device, task.loss_fn)
            recent = hybrid.replica_mean(losses[-args.eval_every:], grid)
            if val is not None:
                evals.append((step, val))
            if reporter:
                print(f"step {step}/{args.steps}: train loss {sum(recent) / len(recent):.4f} (mean of steps "
                      f"{step - len(recent) + 1}-{step}), validation loss {val:.4f}", flush=True)
        if step % args.checkpoint_every == 0 or last:
            state = {"model": hybrid.unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                     "data_rng": data.get_state()}
            checkpoint.save(args.out, step, grid, state, described)
    return {"coords": grid.coords, "losses": hybrid.replica_mean(losses, grid) if losses else None,
            "evals": evals}


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m nanopar.train``, each with its default in ``--help``."""
    examples = __doc__.split("\n\n")[1]
    parser = argparse.ArgumentParser(prog="python -m nanopar.train", description=__doc__.splitlines()[0],
                                     epilog="examples:\n" + examples,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model", choices=["gpt", "resnet50"], default="gpt", help="what to train (default: %(default)s)")
    add("--preset", choices=sorted(PRESETS), default="tiny",
        help="the GPT's size; 100m is for GPUs (default: %(default)s)")
    add("--image-size", type=int, default=32, help="ResNet50's image side; the article's is 224 (default: %(default)s)")
    add("--dp", type=int, default=None,
        help="data-parallel degree (default: what the world size leaves after pp·tp; 1 outside torchrun)")
    add("--pp", type=int, default=1, help="pipeline-parallel degree, the number of stages (default: %(default)s)")
    add("--tp", type=int, default=1, help="tensor-parallel degree (default: %(default)s)")
    add("--nproc", type=int, default=None, help="ranks to start outside torchrun (default: dp·pp·tp)")
    add("--steps", type=int, default=20,
        help="train up to this step; with --resume, from the checkpoint's step (default: %(default)s)")
    add("--batch", type=int, default=8,
        help="global batch: sequences (or images) per step, over all replicas (default: %(default)s)")
    add("--microbatches", type=int, default=2,
        help="micro-batches that each replica's slice is cut into (default: %(default)s)")
    add("--schedule", choices=sorted(schedules.SCHEDULES), default="1f1b",
        help="pipeline schedule (default: %(default)s)")
    add("--optimizer", choices=["sgd", "adam"], default="adam", help="optimizer (default: %(default)s)")
    add("--lr", type=float, default=1e-3, help="learning rate (default: %(default)s)")
    add("--seed", type=int, default=0, help="seed of the weights and of the data sampler (default: %(default)s)")
    add("--eval-every", type=int, default=10,
        help="steps between validation losses, 0 for never (default: %(default)s)")
    add("--check-every", type=int, default=0,
        help="debugging aid: every this many steps, check that the data-parallel replicas are still "
             "identical, 0 for never (default: %(default)s)")
    add("--checkpoint-every", type=int, default=50,
        help="steps between checkpoints; one is also written at the end (default: %(default)s)")
    add("--out", required=True, help="folder of the run's checkpoints, shared by all machines (required)")
    add("--resume", action="store_true",
        help="continue from the checkpoint under --out (default: start afresh; --out must hold no checkpoint)")
    add("--backend", choices=["auto", "gloo", "nccl"], default="auto",
        help="auto picks NCCL when every local rank has a GPU, else gloo (default: %(default)s)")
    add("--timeout", type=float, default=3600.0,
        help="seconds allowed for the run, and for any one collective (default: %(default)s)")
    return parser


def _check(args: argparse.Namespace) -> None:
    positive = ["pp", "tp", "steps", "batch", "microbatches", "checkpoint_every", "image_size"]
    positive += [n for n in ("dp", "nproc") if getattr(args, n) is not None]
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    for name in ("eval_every", "check_every"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be 0 (never) or a positive number of steps, "
                             f"got {getattr(args, name)}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")


def _world_size(args: argparse.Namespace) -> int:
    if under_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if args.nproc is not None and args.nproc != world:
            raise ValueError(f"--nproc {args.nproc} but torchrun started {world} ranks: drop --nproc under torchrun")
        return world
    return args.nproc or (args.dp or 1) * args.pp * args.tp


def prepare(args: argparse.Namespace) -> tuple[Topology, int]:
    """Check every setting before a rank starts; return the grid and the step training starts from."""
    _check(args)
    topology = topology_of(args, _world_size(args))
    args.dp = topology.dp
    _, described = make_task(args)
    if args.model == "gpt":
        config = models.GPTConfig(**described["config"])
        if config.n_head % args.tp:
            raise ValueError(f"tensor parallelism splits attention by heads: the {args.preset} GPT's "
                             f"{config.n_head} heads do not split over --tp {args.tp}")
    hybrid.check_batch(args.batch, topology, args.microbatches)
    if args.resume:
        return topology, checkpoint.check_resume(args.out, topology, described, args.steps)["step"]
    found = checkpoint.read_manifest(args.out)
    if found is not None:
        raise ValueError(f"{args.out!r} holds a checkpoint at step {found['step']} already: pass --resume to "
                         "continue it, or choose another --out")
    return topology, 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nanopar.train …`` (or under torchrun): train; return the exit status (chapter 4, hybrid training)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        topology, start = prepare(args)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    reporting = not under_torchrun() or os.environ["RANK"] == "0"
    with tqdm(total=args.steps, initial=start, desc=f"dp {topology.dp} × pp {topology.pp} × tp {topology.tp}",
              unit="step", disable=not reporting, file=sys.stderr, miniters=1) as bar:
        results = run(train_worker, None if under_torchrun() else topology.world_size, args,
                      backend=args.backend, timeout=args.timeout, progress=bar)
    if reporting:
        losses = next(r["losses"] for r in results if r["losses"] is not None)
        evals = next(r["evals"] for r in results if r["coords"].pp == topology.pp - 1)
        print(f"trained {args.model} steps {start + 1}-{args.steps} on dp {topology.dp} × pp {topology.pp} × "
              f"tp {topology.tp} = {topology.world_size} ranks: "
              f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"
              + (f", validation loss {evals[-1][1]:.4f}" if evals else "")
              + f"; checkpoint under {args.out}")
    return 0


if __name__ == "__main__":
    from nanopar.train import main as _main  # the importable module: ranks find its worker by name

    raise SystemExit(_main())
