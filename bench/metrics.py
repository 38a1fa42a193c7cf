"""`optserve bench metrics`: what the metrics cost a Step.

One worker steps a transformer-shaped job (~200 tensors) through an in-process shard, three
ways in the same run: no metrics at all, every step (`--metrics-every 1`, the default), and
every 10th step. A step that refreshes the per-tensor gauges has the kernel add the float64
sums they need in its pass over θ, then updates the gauges in Python; every other step
does neither.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from optserve.bench._common import device_description, out_dir, today

LAYERS, WIDTH = 12, 256  # 12 blocks of 16 tensors + embeddings: 193 tensors, ~13.2M params


def transformer_like():
    import torch
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8192, WIDTH) * 0.02)]
    for _ in range(LAYERS):
        for shape in [(WIDTH,), (WIDTH,), (3 * WIDTH, WIDTH), (3 * WIDTH,), (WIDTH, WIDTH),
                      (WIDTH,), (WIDTH,), (WIDTH,), (4 * WIDTH, WIDTH), (4 * WIDTH,),
                      (WIDTH, 4 * WIDTH), (WIDTH,), (WIDTH, WIDTH), (WIDTH,), (WIDTH, WIDTH),
                      (WIDTH,)]:
            params.append(torch.nn.Parameter(torch.randn(shape) * 0.02))
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def time_steps(variant: str, steps: int) -> list[float]:
    from optserve.client import RemoteOptimizer
    from optserve.server import ShardConfig, ShardServer
    every = {"off": 1, "every-1": 1, "every-10": 10}[variant]
    server = ShardServer(ShardConfig(port=0, device="cpu", metrics_every=every)).start()
    if variant == "off":
        server.store.observer = None  # jobs registered from now on observe nothing
    params = transformer_like()
    opt = RemoteOptimizer(params, "adamw", servers=[server.address], job=f"m-{variant}")
    for _ in range(3):  # warm-up: compile caches, allocator
        opt.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    opt.close()
    server.stop(0)
    return times


def main(args: argparse.Namespace) -> int:
    steps = 10 if args.quick else 40
    variants = ("off", "every-1", "every-10")
    medians = {v: [] for v in variants}
    for _ in range(1 if args.quick else 3):  # interleaved rounds against machine noise
        for v in variants:
            medians[v].append(statistics.median(time_steps(v, steps)))
    result = {v: 1e3 * statistics.median(m) for v, m in medians.items()}
    n = sum(p.numel() for p in transformer_like())
    record = dict(device=device_description(), date=today(), params=n, tensors=1 + 16 * LAYERS,
                  step_ms=result, overhead_every_1=result["every-1"] / result["off"] - 1,
                  overhead_every_10=result["every-10"] / result["off"] - 1)
    out = out_dir(args.out)
    (out / "metrics.json").write_text(json.dumps(record, indent=1))
    (out / "metrics.md").write_text(
        f"# What the metrics cost a Step\n\n{record['date']}, {record['device']}, one worker, "
        f"AdamW, {n / 1e6:.1f}M parameters in {record['tensors']} tensors, in-process shard "
        "on loopback; medians of interleaved rounds.\n\n"
        "| metrics | step (ms) | vs off |\n|---|---|---|\n" +
        "".join(f"| {v} | {result[v]:.1f} | {result[v] / result['off'] - 1:+.1%} |\n"
                for v in variants))
    print(json.dumps(record, indent=1))
    return 0
