"""Benchmarks: `optserve bench kernels|e2e|load|metrics|gpu` (bench/README.md). Results land in
bench/results/ with the device name; the README links them. Ratios against peers measured in
the same run are what count."""
from __future__ import annotations

import argparse
import importlib


def run_bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"optserve.bench.{args.what}")
    return module.main(args)
