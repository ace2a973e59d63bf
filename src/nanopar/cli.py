"""The command line: ``python -m nanopar info | bench …``.

    python -m nanopar info
    python -m nanopar bench collectives --quick --json out.json --plot out.png
    python -m nanopar bench dp --quick --json dp.json --plot dp.png

Book: "Setting up" (info), chapter 2 (bench collectives), chapter 4.1 (bench dp).
"""
from __future__ import annotations

import argparse
import json
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
    ratio = bench.ring_to_gloo_ratio(records, world_size=min(args.world_sizes))
    print(f"ring / gloo bus bandwidth, messages >= 4 MiB, {min(args.world_sizes)} ranks: {ratio:.2f}x")
    return 0


def _bench_dp(args: argparse.Namespace) -> int:
    from . import bench

    records = bench.bench_dp(world_sizes=args.world_sizes, quick=args.quick, bucket_mb=args.bucket_mb)
    _write(records, args, "dp")
    for rec in records:
        comm = f"{rec['comm_s'] * 1e3:7.1f}" if rec["comm_s"] is not None else "      -"
        print(f"{rec['workload']:<20} {rec['impl']:<9} N={rec['world_size']}  {rec['samples_per_s']:9.1f} samples/s"
              f"  step {rec['step_s'] * 1e3:7.1f} ms  comm {comm} ms  efficiency {rec['scaling_efficiency']:.2f}")
    if 2 in args.world_sizes:
        for workload in bench.DP_WORKLOADS:
            print(f"{workload}: bucketed / DDP throughput at 2 ranks: "
                  f"{bench.dp_ratio(records, workload, 2, 'bucketed', 'ddp'):.2f}x")
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

        draw = {"collectives": plotting.plot_bandwidth, "dp": plotting.plot_dp_scaling}[kind]
        draw(records, path=args.plot)
        print(f"wrote the plot to {args.plot}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nanopar", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="the hardware tier, devices, torch version and backends").set_defaults(run=_info)

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
    dp.add_argument("--bucket-mb", type=float, default=25.0, metavar="MB",
                    help="bucket size of our bucketed DP and of DDP (default: 25, DDP's default)")
    dp.add_argument("--json", metavar="PATH", help="write the records here (default: print them)")
    dp.add_argument("--plot", metavar="PATH", help="also draw throughput and efficiency against ranks")
    dp.set_defaults(run=_bench_dp)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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
        if not args.bucket_mb > 0:
            parser.error("--bucket-mb must be a positive number of megabytes")
    return args.run(args)
