"""`optserve demo --compare`: what decoupled weight decay and AdamP's projection do to
scale-invariant weights, measured by the shard's own metrics.

The same conv net with BatchNorm trains under Adam+L2, AdamW and AdamP (and Adafactor, for
its state size). A conv weight followed by BatchNorm is scale-invariant: its gradient is
orthogonal to it, so each Adam step grows its norm, and a larger norm makes the same step a
smaller rotation, the "effective step" of the AdamP paper. After every step the worker
reads the shard's /metrics (optserve_weight_norm, optserve_effective_step) and the run
ends with a plot of both for each optimizer.
"""
from __future__ import annotations

import argparse
import os
import time
import urllib.request

from optserve.demo import make_model, make_shapes, param_groups, start_shard

CONV_WEIGHTS = ("0.weight", "4.weight")  # the two convs of demo.make_model, each before a BN
RUNS = {
    "Adam+L2": ("adam", dict(lr=3e-3), 5e-4),
    "AdamW": ("adamw", dict(lr=3e-3), 0.05),
    "AdamP": ("adamp", dict(lr=3e-3), 0.05),
    "Adafactor": ("adafactor", dict(lr=3e-3, relative_step=False, scale_parameter=False), 0.0),
}


def scrape(port: int, job: str) -> dict[tuple[str, str], float]:
    """{(metric, tensor): value} of the job's per-tensor gauges, and its state bytes."""
    from prometheus_client.parser import text_string_to_metric_families
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("training_job") == job:
                out[(s.name, s.labels.get("tensor", ""))] = s.value
    return out


def train(label: str, address: str, port: int, steps: int) -> dict:
    import torch
    from optserve.client import RemoteOptimizer
    optimizer, hyper, weight_decay = RUNS[label]
    images, labels = make_shapes(2048, seed=1)
    model = make_model()
    job = f"compare-{optimizer}-{os.getpid()}"
    opt = RemoteOptimizer(param_groups(model, weight_decay), optimizer, servers=[address],
                          job=job, **hyper)
    g = torch.Generator().manual_seed(100)
    norms, angles = [], []
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (64,), generator=g)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(images[idx]), labels[idx])
        loss.backward()
        opt.step()
        m = scrape(port, job)
        norms.append(sum(m[("optserve_weight_norm", t)] ** 2 for t in CONV_WEIGHTS) ** 0.5)
        angles.append(sum(m[("optserve_effective_step", t)] for t in CONV_WEIGHTS) / len(CONV_WEIGHTS))
    state = scrape(port, job)[("optserve_state_bytes", "")]
    params = sum(p.numel() for p in model.parameters())
    opt.close()
    return dict(label=label, norms=norms, angles=angles, loss=loss.item(),
                optimizer_state_bytes=int(state) - 4 * params)


def plot(results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        left.plot(r["norms"], label=r["label"])
        right.plot(r["angles"], label=r["label"])
    left.set(title="norm of the conv weights (scale-invariant)", xlabel="step",
             ylabel="||w||")
    right.set(title="effective step ||w'/||w'|| - w/||w|||| (mean over convs)", xlabel="step",
              ylabel="angle (rad)", yscale="log")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def collect(device: str, steps: int, port: int | None = None) -> list[dict]:
    """Trains every run of RUNS through one local shard; returns their per-step curves."""
    import tempfile
    log_dir = tempfile.mkdtemp(prefix="optserve-compare-")
    shard = start_shard(device, os.path.join(log_dir, "shard.log"), port or 0)
    address, port = shard.address, shard.metrics_port
    print(f"optserve demo --compare: shard {address}, metrics http://127.0.0.1:{port}/metrics")
    try:
        results = []
        for label in RUNS:
            start = time.perf_counter()
            results.append(train(label, address, port, steps))
            print(f"  {label:<10} done in {time.perf_counter() - start:5.1f}s")
        return results
    finally:
        shard.stop()


def run_compare(args: argparse.Namespace) -> int:
    results = collect(args.device, args.steps, args.metrics_port)
    plotted = [r for r in results if r["label"] != "Adafactor"]
    plot(plotted, args.compare_out)
    print(f"\n  {'optimizer':<10} {'final loss':>10} {'conv ||w||':>11} {'eff. step':>10} "
          f"{'optimizer state':>16}")
    for r in results:
        print(f"  {r['label']:<10} {r['loss']:>10.4f} {r['norms'][-1]:>11.3f} "
              f"{r['angles'][-1]:>10.2e} {r['optimizer_state_bytes']:>14,} B")
    print(f"\nplot: {os.path.abspath(args.compare_out)}")
    return 0

