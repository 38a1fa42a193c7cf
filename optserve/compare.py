"""`optserve demo --compare`: what decoupled weight decay and AdamP's projection do to
scale-invariant weights, measured by the shard's own metrics.

The same conv net with BatchNorm trains under Adam+L2, AdamW, AdamP, Adafactor and Lion, at a
constant learning rate. A conv weight followed by BatchNorm is scale-invariant: its gradient is
orthogonal to it, so each Adam step grows its norm, and a larger norm makes the same step a
smaller rotation, the "effective step" of the AdamP paper (Heo et al., 2021, section 2). After
every step the worker reads the shard's /metrics (optserve_weight_norm,
optserve_effective_step); the run ends with a table (norm growth, recent effective step, angle
travelled, optimizer state) and a plot of the conv weights' norm and effective step. AdamW's
norm grows ~9 % and its effective step is that much smaller than AdamP's, whose norm stays flat.

A third panel shows where ε sits: the same AdamW at ε = 1e-3, with torch's ε after the
bias-corrected √v̂ and with Keras's ε̂ on the raw √v (eps_mode="keras"), over the first
EPS_STEPS steps. With one number for both, torch's effective ε is ε̂·√(1 − β2^t) (0.03 of it
at step 1), so its first steps are several times larger.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import urllib.request
from pathlib import Path

from optserve import local
from optserve.demo import RECIPES, local_shards, make_model, make_shapes, param_groups

CONV_WEIGHTS = ("0.weight", "4.weight")  # the two convs of demo.make_model, each before a BN
# label: (optimizer, hyperparameters, weight decay of the conv and linear weights)
RUNS = {
    "Adam+L2": ("adam", dict(lr=3e-3), 5e-4),
    "AdamW": ("adamw", dict(lr=3e-3), 0.05),
    "AdamP": ("adamp", dict(lr=3e-3), 0.05),
    "Adafactor": ("adafactor", dict(lr=3e-3, relative_step=False, scale_parameter=False), 0.0),
    "Lion": ("lion", dict(lr=RECIPES["lion"]["lr"]), RECIPES["lion"]["weight_decay"]),
}
# Where ε sits (docs/optimizers.md, "AdamW and Adam"): the AdamW above at ε = EPS, early in
# training, where the two placements differ most (√(1 − β2^t) is 0.03 at step 1, 0.31 at 100).
EPS = 1e-3
EPS_RUNS = {
    "torch ε": ("adamw", dict(lr=3e-3, eps=EPS), 0.05),
    "Keras ε̂": ("adamw", dict(lr=3e-3, eps=EPS, eps_mode="keras"), 0.05),
}
EPS_STEPS = 100
STEPS = 300   # the README's figure and numbers
BATCH = 64


def default_out() -> Path:
    """Where the plot goes without --compare-out: a folder of the temporary directory, so
    that a run leaves nothing in the current directory."""
    return Path(tempfile.gettempdir()) / "optserve" / "compare.png"


def scrape(url: str, job: str) -> dict[tuple[str, str], float]:
    """{(metric, tensor): value} of the job's per-tensor gauges, and its state bytes."""
    from prometheus_client.parser import text_string_to_metric_families
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("training_job") == job:
                out[(s.name, s.labels.get("tensor", ""))] = s.value
    return out


def conv_norm(model) -> float:
    """||w|| of the conv weights taken together, as the shard adds them (float64)."""
    params = dict(model.named_parameters())
    return sum(params[t].detach().double().square().sum().item() for t in CONV_WEIGHTS) ** 0.5


def train(label: str, run: tuple, address: str, metrics_url: str, steps: int, job: str) -> dict:
    """`steps` steps of `run` (optimizer, hyperparameters, weight decay) as job `job`."""
    import torch
    from optserve.client import RemoteOptimizer
    optimizer, hyper, weight_decay = run
    images, labels = make_shapes(2048, seed=1)
    model = make_model()
    start_norm = conv_norm(model)
    opt = RemoteOptimizer(param_groups(model, weight_decay), optimizer, servers=[address],
                          job=job, **hyper)
    g = torch.Generator().manual_seed(100)
    norms, angles, losses = [], [], []
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (BATCH,), generator=g)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(images[idx]), labels[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
        m = scrape(metrics_url, job)
        norms.append(sum(m[("optserve_weight_norm", t)] ** 2 for t in CONV_WEIGHTS) ** 0.5)
        angles.append(sum(m[("optserve_effective_step", t)] for t in CONV_WEIGHTS)
                      / len(CONV_WEIGHTS))
    state = scrape(metrics_url, job)[("optserve_state_bytes", "")]
    params = sum(p.numel() for p in model.parameters())
    opt.close()
    travelled = []
    for a in angles:
        travelled.append(a + (travelled[-1] if travelled else 0.0))
    return dict(label=label, start_norm=start_norm, norms=norms, angles=angles,
                travelled=travelled, losses=losses, loss=losses[-1],
                optimizer_state_bytes=int(state) - 4 * params)


SMOOTH = 25   # steps in the effective step's running mean


def running_mean(values: list[float], window: int = SMOOTH) -> list[float]:
    """The centred mean of each value and its neighbours, `window` wide (narrower at the
    ends): one step's angle jumps with its batch, the trend is what the optimizers set."""
    import numpy as np
    a, kernel = np.asarray(values, float), np.ones(window)
    return (np.convolve(a, kernel, "same") / np.convolve(np.ones_like(a), kernel, "same")).tolist()


def plot(results: list[dict], eps_results: list[dict], path: str | os.PathLike):
    """Three panels over the steps: the growth of the conv weights' norm and their effective
    step (running mean) under every run of RUNS, with the gap between AdamW and AdamP shaded;
    then the effective step, step by step, under the two of EPS_RUNS, the gap shaded.
    Returns the (closed) figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right, eps) = plt.subplots(1, 3, figsize=(16.5, 4.4))
    smoothed = {}
    for r in results:
        steps = range(len(r["norms"]) + 1)
        left.plot(steps, [100 * (n / r["start_norm"] - 1) for n in [r["start_norm"], *r["norms"]]],
                  label=r["label"])
        smoothed[r["label"]] = running_mean(r["angles"])
        right.plot(steps[1:], smoothed[r["label"]], label=r["label"])
    if "AdamW" in smoothed and "AdamP" in smoothed:
        right.fill_between(steps[1:], smoothed["AdamW"], smoothed["AdamP"], color="tab:green",
                           alpha=0.25, linewidth=0, label="AdamP - AdamW")
    # Linear up to 10 %, where the Adam family is; logarithmic above, where Lion goes.
    left.set_yscale("symlog", linthresh=10, linscale=1.5)
    ticks = [0, 2, 4, 6, 8, 10, 20, 50, 100, 200, 500]
    top = max(100 * (max(r["norms"]) / r["start_norm"] - 1) for r in results)
    ticks = [t for t in ticks if t <= max(10, top * 1.5)]
    left.set_yticks(ticks, [str(t) for t in ticks])
    left.set(title="growth of the conv weights' norm ||w|| (scale-invariant)", xlabel="step",
             ylabel="% since step 0 (log scale above 10 %)")
    right.set(title=f"effective step ||w'/||w'|| - w/||w|||| ({SMOOTH}-step mean)",
              xlabel="step", ylabel="angle per step (rad)", yscale="log")
    for r in eps_results:
        eps.plot(range(1, len(r["angles"]) + 1), r["angles"], label=r["label"])
    if len(eps_results) == 2:
        steps = range(1, len(eps_results[0]["angles"]) + 1)
        eps.fill_between(steps, eps_results[0]["angles"], eps_results[1]["angles"],
                         color="tab:red", alpha=0.2, linewidth=0, label="torch ε - Keras ε̂")
    eps.set(title=f"where ε sits: AdamW, ε = {EPS:g}, first steps", xlabel="step",
            ylabel="effective step of the conv weights (rad)", yscale="log")
    for ax in (left, right, eps):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def collect(device: str, steps: int, port: int | None = None) -> tuple[list[dict], list[dict]]:
    """Trains every run of RUNS, then of EPS_RUNS (for at most EPS_STEPS steps), through one
    local shard; returns their per-step curves."""
    eps_steps = min(steps, EPS_STEPS)
    with local_shards(1, device, port, prefix="optserve-compare-") as (shard,):
        print(f"optserve demo --compare: shard {shard.address}, "
              f"metrics {shard.metrics_url}, {steps} steps each ({eps_steps} for ε's placement)",
              flush=True)
        results = ([], [])
        for k, (runs, n) in enumerate([(RUNS, steps), (EPS_RUNS, eps_steps)]):
            for i, (label, run) in enumerate(runs.items()):
                start = time.perf_counter()
                job = f"compare-{k}-{i}-{run[0]}-{os.getpid()}"
                results[k].append(train(label, run, shard.address, shard.metrics_url, n, job))
                print(f"  {label:<10} done in {time.perf_counter() - start:5.1f}s", flush=True)
        return results


def run_compare(args: argparse.Namespace) -> int:
    out = Path(args.compare_out) if args.compare_out else default_out()
    with local.stopped_by_signals():
        results, eps_results = collect(args.device, args.steps or STEPS, args.metrics_port)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(results, eps_results, out)
    print(f"\n  {'optimizer':<10} {'final loss':>10} {'conv ||w||':>10} {'growth':>8} "
          f"{'eff. step':>9} {'travelled':>9} {'optimizer state':>15}")
    for r in results:
        growth = r["norms"][-1] / r["start_norm"] - 1
        recent = r["angles"][-SMOOTH:]
        print(f"  {r['label']:<10} {r['loss']:>10.4f} {r['norms'][-1]:>10.3f} {growth:>+8.1%} "
              f"{sum(recent) / len(recent):>9.2e} {r['travelled'][-1]:>5.2f} rad "
              f"{r['optimizer_state_bytes']:>13,} B")
    print(f"\n  growth: of the conv weights' norm since step 0; eff. step: their mean angle\n"
          f"  per step over the last {SMOOTH} steps; travelled: the sum of all their angles")
    marks = [t for t in (1, 10, 30, 100) if t <= len(eps_results[0]["angles"])]
    print(f"\n  where ε sits (AdamW, ε = {EPS:g}): the conv weights' effective step at step")
    print("  " + " " * 10 + "".join(f"{t:>10}" for t in marks) + f"{'loss':>10}")
    for r in eps_results:
        print(f"  {r['label']:<10}" + "".join(f"{r['angles'][t - 1]:>10.2e}" for t in marks)
              + f"{r['loss']:>10.4f}")
    print(f"\nplot: {out.resolve()}")
    return 0
