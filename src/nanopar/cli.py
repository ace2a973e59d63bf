"""The command line: ``python -m nanopar info | bench …``.

    python -m nanopar info
    python -m nanopar bench collectives --quick --json out.json --plot out.png

Book: "Setting up" (info) and chapter 2 (bench collectives).
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


def _write(records: list[dict], args: argparse.Namespace) -> None:
    text = json.dumps(records, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
        print(f"wrote {len(records)} records to {args.json}")
    else:
        print(text)
    if args.plot:
        from . import plotting

        plotting.plot_bandwidth(records, path=args.plot)
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench" and args.kind == "collectives":
        if min(args.world_sizes) < 2:
            parser.error("collectives need world sizes of at least 2")
        if args.sizes and any(s <= 0 or s % 4 for s in args.sizes):
            parser.error("message sizes must be positive multiples of 4 bytes (float32 elements)")
    return args.run(args)
