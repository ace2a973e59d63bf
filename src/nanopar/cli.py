"""The command line: ``python -m nanopar info | bench … | train …``.

    python -m nanopar info
    python -m nanopar train --nproc 4 --dp 2 --pp 2 --steps 20 --out runs/gpt   (= python -m nanopar.train …)
    python -m nanopar bench collectives --quick --json out.json --plot out.png
    python -m nanopar bench dp --quick --json dp.json --plot dp.png
    python -m nanopar bench pipeline --quick --json pipe.json --plot pipe.png
    python -m nanopar bench lengths --quick --json lengths.json --plot lengths.png
    python -m nanopar bench hybrid --quick --json hybrid.json --plot hybrid.png
    python -m nanopar bench zero --quick --json zero.json --plot zero.png

Book: "Setting up" (info), chapter 2 (bench collectives), chapter 4.1 (bench dp),
chapter 4.2 (bench pipeline), chapter 5.3 (bench lengths), chapter 3.3 (bench hybrid),
chapter 6.5 (bench zero), chapter 4's hybrid training (train).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


def _info(args: argparse.Namespace) -> int:
    from . import devices

    print(devices.describe())
    for key, value in devices.info().items():
        print(f"  {key:<10} {value}")
    return 0


def _bench_collectives(args: argparse.Namespace) -> int:
    from . import bench

    records = bench.bench_collectives(world_sizes=args.world_sizes, sizes=args.sizes, quick=args.quick)
    _write(records, args)
    print("ring / gloo bus bandwidth, pair by pair: median (quartiles)")
    for r in records:
        if r["impl"] == "ring":
            print(f"  {r['world_size']} ranks {r['bytes']:>11} bytes  {r['busbw_vs_gloo']:.2f}"
                  f" ({r['busbw_vs_gloo_q1']:.2f}-{r['busbw_vs_gloo_q3']:.2f})")
    n = min(args.world_sizes)
    if max(r["bytes"] for r in records) >= 4 * bench.MiB:
        ratio = bench.ring_vs_gloo(records, world_size=n)
        print(f"ring / gloo bus bandwidth, messages >= 4 MiB, {n} ranks: {ratio.median:.2f}x"
              f" (quartiles {ratio.q1:.2f}-{ratio.q3:.2f} over {ratio.pairs} pairs)")
    return 0


def _bench_dp(args: argparse.Namespace) -> int:
    from . import bench

    records = bench.bench_dp(world_sizes=args.world_sizes, quick=args.quick, bucket_cap_mb=args.bucket_cap_mb)
    _write(records, args, "dp")
    for rec in records:
        comm = f"{rec['comm_s'] * 1e3:7.1f}" if rec["comm_s"] is not None else "      -"
        vs = (f"  / DDP {rec['throughput_vs_ddp']:.2f} ({rec['throughput_vs_ddp_q1']:.2f}-"
              f"{rec['throughput_vs_ddp_q3']:.2f})" if "throughput_vs_ddp" in rec else "")
        print(f"{rec['workload']:<20} {rec['impl']:<9} N={rec['world_size']}  {rec['samples_per_s']:9.1f} samples/s"
              f"  step {rec['step_s'] * 1e3:7.1f} ms  comm {comm} ms  efficiency {rec['scaling_efficiency']:.2f}{vs}")
    if 2 in args.world_sizes:
        for workload in bench.DP_WORKLOADS:
            for impl in ("bucketed", "naive"):
                ratio = bench.dp_speed_ratio(records, workload, 2, impl, "ddp")
                print(f"{workload}: {impl} / DDP throughput at 2 ranks: {ratio.median:.2f}x"
                      f" (quartiles {ratio.q1:.2f}-{ratio.q3:.2f} over {ratio.pairs} pairs of steps)")
    return 0


def _bench_pipeline(args: argparse.Namespace) -> int:
    from . import bench, schedules

    records = bench.bench_pipeline(stages=args.stages, microbatches=args.microbatches, quick=args.quick)
    _write(records, args, "pipeline")
    for r in records:
        ours = r["bubble_measured"] is not None
        bubble = f"{r['bubble_measured']:.3f}" if ours else "    -"
        lost = f"  messages {r['messages_s'] * 1e3:4.1f} ms, slow ops {r['slow_ops_s'] * 1e3:4.1f} ms" if ours else ""
        print(f"p={r['stages']} {r['impl']:<8} {r['schedule']:<6} m={r['microbatches']:<3}"
              f" step {r['step_s'] * 1e3:7.1f} ms  x{r['speedup_vs_naive']:.2f} vs naive"
              f" (theory x{r['speedup_theory']:.2f})"
              f"  bubble {bubble} (theory {r['bubble_theory']:.3f}){lost}")
    p = min(args.stages)
    m = 8 if 8 in args.microbatches else max(args.microbatches)
    head = bench.pipeline_headline(records, p, m)
    print(f"{p} stages, m={m}: speed-up over the naive split: GPipe {head['gpipe_speedup']:.2f}x, "
          f"1F1B {head['1f1b_speedup']:.2f}x (theory {schedules.speedup(p, m):.2f}x)")
    for s in ("gpipe", "1f1b"):
        if f"{s}_nanopar_over_torch" in head:
            print(f"{p} stages, m={m}, {s}: nanopar / torch.distributed.pipelining step time: "
                  f"{head[f'{s}_nanopar_over_torch']:.2f}")
    print(f"{p} stages: largest |measured - theory| bubble (ours): {head['max_bubble_error']:.3f}")
    return 0


def _bench_lengths(args: argparse.Namespace) -> int:
    from .bench import lengths

    records = lengths.bench_lengths(samples=args.samples, batch=args.batch, quick=args.quick)
    _write(records, args, "lengths")
    for name, s in lengths.lengths_summary(records).items():
        print(f"{name:<9} padding {s['padding_fraction']:4.0%}  straggler wait {s['wait_fraction']:4.0%}  "
              f"{s['steps_per_s']:5.1f} steps/s  x{s['speedup']:.2f} vs random"
              f" (stretches {s['speedup_q1']:.2f}-{s['speedup_q3']:.2f};"
              f" padded frames predict x{s['speedup_predicted']:.2f})")
    return 0


def _bench_hybrid(args: argparse.Namespace) -> int:
    from .bench.hybrid import bench_hybrid

    records = bench_hybrid(quick=args.quick)
    _write(records, args, "hybrid")
    print("bytes handed to the collectives of each axis per step, all ranks together:")
    print(f"{'dp×pp×tp':<9} {'samples/s':>9}  " + " ".join(f"{a + ' bytes':>10}" for a in ("dp", "pp", "tp"))
          + "   max |diff| vs one process")
    for r in records:
        sizes = " ".join(f"{r[f'comm_bytes_{a}']:>10}" for a in ("dp", "pp", "tp"))
        print(f"{r['shape']:<9} {r['samples_per_s']:9.1f}  {sizes}   {r['max_abs_diff_vs_single']:.1e}")
    off = [f"{r['shape']} {a}" for r in records for a in ("dp", "pp", "tp")
           if r[f"comm_bytes_{a}"] != r[f"comm_bytes_{a}_formula"]]
    print("counted bytes " + (f"differ from the formulas of chapter 3.3: {', '.join(off)}" if off
                              else "equal the formulas of chapter 3.3 for every shape and axis"))
    return 0


def _bench_zero(args: argparse.Namespace) -> int:
    from .bench import zero

    records = zero.bench_zero(world_sizes=args.world_sizes, quick=args.quick)
    _write(records, args, "zero")
    print(f"{'impl':<26} {'stage':>5} {'N':>2} {'held MiB':>9} {'formula':>8} {'ratio':>6}"
          f" {'sent MiB':>9} {'theory':>7} {'step ms':>8}  max |diff| vs one process")
    for r in records:
        print(f"{r['impl']:<26} {r['stage']:>5} {r['world_size']:>2} {r['held_bytes'] / 2**20:9.3f}"
              f" {r['predicted_bytes'] / 2**20:8.3f} {r['held_vs_predicted']:6.3f} {r['comm_bytes'] / 2**20:9.3f}"
              f" {r['comm_bytes_predicted'] / 2**20:7.3f} {r['step_s'] * 1e3:8.1f}  {r['max_abs_diff_vs_single']:.1e}")
    return 0


def _write(records: list[dict], args: argparse.Namespace, kind: str = "collectives") -> None:
    text = json.dumps(records, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
        print(f"wrote {len(records)} records to {args.json}")
    else:
        print(text)
    if args.plot:
        from . import plotting

        draw = {"collectives": plotting.plot_bandwidth, "dp": plotting.plot_dp_scaling,
                "pipeline": plotting.plot_pipeline_bench, "lengths": plotting.plot_length_batching,
                "hybrid": plotting.plot_hybrid_bench, "zero": plotting.plot_zero_bench}[kind]
        draw(records, path=args.plot)
        print(f"wrote the plot to {args.plot}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nanopar", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="the hardware tier, devices, torch version and backends").set_defaults(run=_info)
    sub.add_parser("train", help="hybrid training of the GPT (options: python -m nanopar train --help)")

    bench = sub.add_parser("bench", help="benchmarks that write JSON records (and plots)")
    kinds = bench.add_subparsers(dest="kind", required=True)
    coll = kinds.add_parser("collectives", help="all-reduce: gloo vs our ring vs a memory copy")
    coll.add_argument("--quick", action="store_true", help="fewer sizes and repeats (about a minute on 2 cores)")
    coll.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4], metavar="N",
                      help="numbers of ranks to measure (default: 2 4)")
    coll.add_argument("--sizes", type=int, nargs="+", metavar="BYTES",
                      help="message sizes in bytes, multiples of 4 (default: 1 KiB … 256 MiB, ×4 apart)")
    coll.add_argument("--json", metavar="PATH", help="write the records here (default: print them)")
    coll.add_argument("--plot", metavar="PATH", help="also draw bus bandwidth against message size")
    coll.set_defaults(run=_bench_collectives)

    dp = kinds.add_parser("dp", help="data parallelism: one process, naive, bucketed and DDP")
    dp.add_argument("--quick", action="store_true", help="fewer rounds (about two minutes on 2 cores)")
    dp.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4], metavar="N",
                    help="numbers of ranks; must include 1, the reference (default: 1 2 4)")
    dp.add_argument("--bucket-cap-mb", type=float, default=25.0, metavar="MB",
                    help="bucket size of our bucketed DP and of DDP (default: 25, DDP's default)")
    dp.add_argument("--json", metavar="PATH", help="write the records here (default: print them)")
    dp.add_argument("--plot", metavar="PATH", help="also draw throughput and efficiency against ranks")
    dp.set_defaults(run=_bench_dp)

    pipe = kinds.add_parser("pipeline", help="pipelines: naive split, GPipe, 1F1B; ours, torch's, one process")
    pipe.add_argument("--quick", action="store_true",
                      help="2 stages only, fewer rounds (under a minute on 2 idle cores)")
    pipe.add_argument("--stages", type=int, nargs="+", metavar="P",
                      help="numbers of stages, each dividing the model's 8 blocks (default: 2 4; --quick: 2)")
    pipe.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4, 8, 16], metavar="M",
                      help="micro-batch counts, each dividing the batch of 128 (default: 1 2 4 8 16)")
    pipe.add_argument("--json", metavar="PATH", help="write the records here (default: print them)")
    pipe.add_argument("--plot", metavar="PATH", help="also draw speed-up and bubble against micro-batches")
    pipe.set_defaults(run=_bench_pipeline)

    lens = kinds.add_parser("lengths", help="uneven sequence lengths: random against length-bucketed batches")
    lens.add_argument("--quick", action="store_true", help="512 utterances instead of 4096 (seconds on 2 cores)")
    lens.add_argument("--samples", type=int, metavar="N", help="utterances in the epoch (default: 4096; --quick: 512)")
    lens.add_argument("--batch", type=int, default=16, metavar="B", help="global batch over 2 ranks (default: 16)")
    lens.add_argument("--json", metavar="PATH", help="write the records here (default: print them)")
    lens.add_argument("--plot", metavar="PATH", help="also draw padded frames and where the epoch's time went")
    lens.set_defaults(run=_bench_lengths)

    hyb = kinds.add_parser("hybrid", help="every dp × pp × tp grid of 4 ranks training one GPT: speed and bytes")
    hyb.add_argument("--quick", action="store_true", help="a smaller GPT and fewer rounds (about a minute on 2 cores)")
    hyb.add_argument("--json", metavar="PATH", help="write the records here (default: print them)")
    hyb.add_argument("--plot", metavar="PATH", help="also draw samples/s and the bytes of each axis")
    hyb.set_defaults(run=_bench_hybrid)

    zer = kinds.add_parser("zero", help="ZeRO stages 0-3 (ours), DDP, ZeroRedundancyOptimizer, FSDP2: bytes and speed")
    zer.add_argument("--quick", action="store_true", help="a smaller GPT and fewer rounds (about a minute on 2 cores)")
    zer.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4], metavar="N",
                     help="numbers of ranks, each at least 2 and dividing the batch (default: 2 4)")
    zer.add_argument("--json", metavar="PATH", help="write the records here (default: print them)")
    zer.add_argument("--plot", metavar="PATH", help="also draw the bytes held per rank and the step time")
    zer.set_defaults(run=_bench_zero)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # its own parser, so that torchrun can also run it as -m nanopar.train
        from . import train

        return train.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench" and args.kind == "collectives":
        if min(args.world_sizes) < 2:
            parser.error("collectives need world sizes of at least 2")
        if args.sizes and any(s <= 0 or s % 4 for s in args.sizes):
            parser.error("message sizes must be positive multiples of 4 bytes (float32 elements)")
    if args.command == "bench" and args.kind == "dp":
        if 1 not in args.world_sizes or min(args.world_sizes) < 1:
            parser.error("--world-sizes must include 1 (the one-process reference) and be at least 1")
        if not args.bucket_cap_mb > 0:
            parser.error("--bucket-cap-mb must be a positive number of megabytes")
    if args.command == "bench" and args.kind == "pipeline":
        from . import bench

        args.stages = args.stages or ([2] if args.quick else [2, 4])
        if any(p < 2 or bench.PIPE_BLOCKS % p for p in args.stages):
            parser.error(f"--stages must be at least 2 and divide the model's {bench.PIPE_BLOCKS} blocks")
        if any(m < 1 or bench.PIPE_BATCH % m for m in args.microbatches):
            parser.error(f"--microbatches must be positive and divide the batch of {bench.PIPE_BATCH}")
    if args.command == "bench" and args.kind == "lengths" and (
            args.batch < 2 or args.batch % 2 or (args.samples is not None and args.samples < 8 * args.batch)):
        parser.error("--batch must be even (2 ranks) and --samples at least 8 global batches")
    if args.command == "bench" and args.kind == "zero":
        from .bench import zero

        try:
            zero.zero_batch(args.world_sizes, args.quick)
        except ValueError as e:
            parser.error(str(e))
    return args.run(args)
