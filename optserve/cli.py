"""The `optserve` command: `server` (one shard), `demo` (the main job), `bench`."""
from __future__ import annotations

import argparse
import logging
import sys


def _server(args: argparse.Namespace) -> int:
    from optserve.server import serve
    serve(args.host, args.port, args.device, args.barrier_timeout, args.grace)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from optserve.demo import run_demo
    return run_demo(args)


def _bench(args: argparse.Namespace) -> int:
    from optserve.bench import run_bench
    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    server = sub.add_parser("server", help="run one shard")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all)")
    server.add_argument("--port", type=int, default=50051)
    server.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "reference"],
                        help="optimizer backend; auto picks cuda when a GPU is visible")
    server.add_argument("--barrier-timeout", type=float, default=300.0,
                        help="seconds a sync step waits for the other workers")
    server.add_argument("--grace", type=float, default=10.0,
                        help="seconds in-flight calls get to finish on SIGTERM")
    server.set_defaults(func=_server)

    demo = sub.add_parser("demo", help="train a small model through a local shard")
    demo.add_argument("--workers", type=int, default=2)
    demo.add_argument("--steps", type=int, default=150)
    demo.add_argument("--optimizers", default="adamw,adamp,adafactor",
                      help="comma-separated list of optimizers to run, one after another")
    demo.add_argument("--device", default="cpu", choices=["auto", "cpu", "reference"])
    demo.set_defaults(func=_demo)

    bench = sub.add_parser("bench", help="benchmarks (see bench/)")
    bench.add_argument("what", choices=["kernels"])
    bench.add_argument("--quick", action="store_true")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)
