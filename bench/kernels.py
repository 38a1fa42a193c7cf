"""`optserve bench kernels`: optimizer step throughput of optserve's backend against the peers
users would run instead, and against the machine's memory roofline, all in one run.

For each optimizer (AdamW, AdamP, Adafactor, Lion), size (16M, 64M parameters) and layout
  one-tensor          one square matrix (4096², 8192²): factored by Adafactor, channel
                      rows for AdamP
  transformer-mixed   ~200 tensors shaped like a GPT block stack: token and position
                      embeddings; per layer LayerNorm weight/bias x2, q/k/v/o (d x d) with
                      biases, MLP up (4d x d) and down (d x 4d) with biases; a final LayerNorm
it measures, after warm-up, the median time of several steps of
  optserve            the backend `get_backend("auto")` picks: the numba CPU kernels here,
                      the CUDA kernels where a GPU is visible (state kept on the device).
                      Never the NumPy reference. Stepped with sums=False: what a shard runs
                      for a step that refreshes no per-tensor metrics (every step but one in
                      --metrics-every N, and every step without metrics); the peers compute
                      no statistics either. This is the row the targets judge.
  optserve+sums       the same backend with sums=True: the float64 sums (‖w‖², ⟨w, Δw⟩,
                      ‖Δw‖², ‖g‖²) a metrics refresh needs, summed in the same pass. Shown
                      so that their cost can be read off ("optserve ÷ this" in its row).
  peers               AdamW: torch.optim.AdamW fused=True and foreach=True;
                      AdamP: adamp.AdamP 0.3.0 (clovaai, the reference code);
                      Adafactor: torch.optim.Adafactor and transformers' Adafactor
                      (relative step, parameter scaling: the same update as optserve's);
                      Lion: lion_pytorch.Lion (its default, non-Triton update).
  roofline            the machine's own limit for a step that moves AdamW's bytes: a fused
                      single pass reading 4 float32 streams and writing 3 (numba, parallel;
                      CuPy elementwise on a GPU), and a plain large copy; timed in the same
                      rounds as AdamW on one tensor of the same size.
All implementations of one configuration are timed in interleaved rounds (one step of each
per round, median over rounds, after two warm-up steps each), so that load from other
processes on a shared machine falls on all of them alike.

Gradients are random normal (AdamP then rarely projects, as for most weights in training);
hyperparameters are each optimizer's defaults with weight decay 0.01 for AdamW.

Bytes per parameter used for GB/s (the same nominal figure for every implementation of an
optimizer, so GB/s ranks them exactly as params/s does):
  AdamW      28 B: read θ, g, m, v; write θ, m, v (float32).
  AdamP      36 B: AdamW's 28 B plus a read of θ and g for the per-row cosine test, which
             must finish before any write (the projection needs whole-row reductions).
  Adafactor  24 B: read θ, g for RMS(θ) and the row/column means of g²; read g again for
             RMS(U); read θ, g and write θ. The factored second moments are O(R + C) per
             matrix and are left out.
  Lion       20 B: read θ, g, m; write θ, m.

Threads: 2 (torch.set_num_threads, numba.set_num_threads), recorded per record.
Results: bench/results/kernels.json (one record per measurement) and kernels.md.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from optserve.bench import _common

# OpenMP threads sleep between parallel regions instead of spinning. Both torch and numba's
# "omp" layer run on OpenMP; with the default (active) policy, torch steps that open one
# parallel region per small tensor stalled for about a scheduler tick (~8 ms) per region on
# the 2-vCPU machines these results come from (50 LayerNorm-sized tensors: 405 ms a step
# active, 0.6 ms passive). Read when each OpenMP runtime loads, so it is set before torch or
# numba is imported (neither is, by the CLI, before this module); an explicit setting wins.
OMP_WAIT_POLICY = os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

THREADS = 2
BYTES_PER_PARAM = {"adamw": 28, "adamp": 36, "adafactor": 24, "lion": 20}
ROOFLINE_BYTES = 28          # the roofline stream moves AdamW's bytes
# Targets (CPU, 2 threads): optserve / peer params/s.
TARGETS = {("adamw", "torch.AdamW(fused)"): 1.0, ("adamp", "adamp.AdamP"): 4.0,
           ("adafactor", "torch.Adafactor"): 4.0}
PEERS = {"adamw": ("torch.AdamW(fused)", "torch.AdamW(foreach)"),
         "adamp": ("adamp.AdamP",),
         "adafactor": ("torch.Adafactor", "transformers.Adafactor"),
         "lion": ("lion_pytorch.Lion",)}
OPTIMIZERS = ("adamw", "adamp", "adafactor", "lion")
LAYOUTS = ("one-tensor", "transformer-mixed")


# ---- layouts ----------------------------------------------------------------------------
def one_tensor(target: int) -> list[tuple[int, ...]]:
    side = int(math.isqrt(target))
    return [(side, side)]


def transformer(target: int, layers: int = 12) -> list[tuple[int, ...]]:
    """GPT-like tensors, ~16 per layer (12 layers: 196 tensors), about `target` parameters:
    width d from the target, vocabulary filling the rest (kept between 8K and 64K rows)."""
    d = 64 * max(1, round(math.sqrt(target * 0.6 / (12 * layers)) / 64))
    block = [(d,), (d,)]                                   # ln1 weight, bias
    for _ in range(4):                                     # q, k, v, o
        block += [(d, d), (d,)]
    block += [(d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]   # ln2, mlp up, mlp down
    per_layer = sum(math.prod(s) for s in block)
    positions = 1024
    rest = target - layers * per_layer - positions * d - 2 * d
    vocab = min(65536, max(8192, rest // d))
    return [(vocab, d), (positions, d)] + block * layers + [(d,), (d,)]


def shapes_for(layout: str, target: int) -> list[tuple[int, ...]]:
    return one_tensor(target) if layout == "one-tensor" else transformer(target)


# ---- timing ---------------------------------------------------------------------------------
@dataclass
class Timing:
    ms: float
    reps: int


def interleaved(steps: dict[str, tuple[Callable[[], None], Callable[[], None]]], reps: int,
                warmup: int = 1) -> dict[str, Timing]:
    """Median step time of each implementation, measured in rounds: every round times one
    step of each in turn, so that load from other processes on a shared machine falls on
    all of them alike and their ratios stay meaningful."""
    for step, sync in steps.values():
        for _ in range(warmup):
            step()
        sync()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, (step, sync) in steps.items():
            t0 = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: Timing(1e3 * _common.median(ts), reps) for name, ts in times.items()}


def reps_for(n: int, quick: bool) -> int:
    if quick:
        return 3
    return 9 if n > 32e6 else 15


# ---- optserve ---------------------------------------------------------------------------------
def _hyper(optimizer: str, n_tensors: int):
    """(Hyper, wire form) of one group of the registry defaults, as a shard builds it."""
    from optserve.kernels import Hyper
    from optserve.proto.optimizers import REGISTRY, group_to_proto
    group = dict(REGISTRY[optimizer].defaults)
    if optimizer == "adamw":
        group["weight_decay"] = 0.01
    h = group_to_proto(optimizer, group, initial_lr=group["lr"] or 1e-2)
    return Hyper.from_groups([h], np.zeros(n_tensors, int)), h


def optserve_step(optimizer: str, shapes, backend, sums: bool = False):
    """(step, sync) of optserve's backend on a fresh job with these tensors; `sums`: whether
    each step also computes the per-tensor float64 sums of a metrics refresh."""
    from optserve.kernels import FlatLayout, FlatState
    from optserve.proto.optimizers import REGISTRY
    hyper, proto = _hyper(optimizer, len(shapes))
    layout = FlatLayout(shapes, [REGISTRY[optimizer].state_fields(s, proto) for s in shapes])
    rng = np.random.default_rng(0)
    state = FlatState.zeros(layout)
    state.param[:] = rng.standard_normal(layout.numel, dtype=np.float32)
    grad = rng.standard_normal(layout.numel, dtype=np.float32)
    active = np.ones(len(shapes), bool)
    sync = lambda: None  # noqa: E731
    if backend.name == "cuda":
        state = backend.to_device(state)
        grad = backend.runtime().upload(grad)
        sync = backend.runtime().cp.cuda.Device().synchronize

    def step():
        state.steps[:] += 1
        backend.step(optimizer, layout, state, grad, active, hyper, sums=sums)
    return step, sync


# ---- peers ------------------------------------------------------------------------------------
def _torch_params(shapes, device: str):
    import torch
    g = torch.Generator(device="cpu").manual_seed(0)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g).to(device))
        p.grad = torch.randn(s, generator=g).to(device)
        params.append(p)
    return params


def make_peer(impl: str, params):
    import torch
    if impl == "torch.AdamW(fused)":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True)
    if impl == "torch.AdamW(foreach)":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, foreach=True)
    if impl == "adamp.AdamP":
        from adamp import AdamP
        return AdamP(params, lr=1e-3)
    if impl == "torch.Adafactor":
        return torch.optim.Adafactor(params, lr=1e-2)
    if impl == "transformers.Adafactor":
        from transformers.optimization import Adafactor
        return Adafactor(params, lr=None, relative_step=True, scale_parameter=True,
                         warmup_init=False)
    if impl == "lion_pytorch.Lion":
        from lion_pytorch import Lion
        return Lion(params, lr=1e-4)
    raise ValueError(impl)


def peer_step(impl: str, shapes, device: str):
    """(step, sync) of a peer optimizer over torch parameters of these shapes."""
    import torch
    opt = make_peer(impl, _torch_params(shapes, device))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        with torch.no_grad():
            opt.step()
    return step, sync


# ---- roofline ---------------------------------------------------------------------------------
def _stream_kernel():
    from numba import njit, prange

    @njit(parallel=True, fastmath=False, cache=True, error_model="numpy")  # numpy: no /0 check, so it vectorises
    def stream(p, g, m, v):
        """AdamW's traffic in one pass: read p, g, m, v; write p, m, v (trivial arithmetic)."""
        for i in prange(p.shape[0]):
            gi = g[i]
            mi = m[i] + np.float32(0.1) * (gi - m[i])
            vi = v[i] * np.float32(0.999) + np.float32(0.001) * gi * gi
            m[i] = mi
            v[i] = vi
            p[i] = p[i] - np.float32(1e-3) * mi / (np.sqrt(vi) + np.float32(1e-8))
    return stream


def roofline_steps(n: int, gpu: bool) -> dict[str, tuple[Callable[[], None], Callable[[], None]]]:
    """(step, sync) of the roofline measurements over n float32 elements:
    "stream (AdamW bytes)" moves 28 B per element, "copy" 8 B."""
    if gpu:
        import cupy as cp
        arrays = [cp.random.standard_normal(n, dtype=cp.float32) for _ in range(4)]
        triad = cp.ElementwiseKernel(
            "float32 g", "float32 p, float32 m, float32 v",
            "m = m + 0.1f*(g - m); v = v*0.999f + 0.001f*g*g; p = p - 1e-3f*m/(sqrtf(v) + 1e-8f);",
            "optserve_stream")
        sync = cp.cuda.Device().synchronize
        dst = cp.empty_like(arrays[0])
        return {"stream (AdamW bytes)": (lambda: triad(arrays[1], arrays[0], arrays[2], arrays[3]), sync),
                "copy": (lambda: cp.copyto(dst, arrays[0]), sync)}
    rng = np.random.default_rng(1)
    p, g, m, v = (rng.standard_normal(n, dtype=np.float32) for _ in range(4))
    m[:] = 0.0
    v[:] = 1.0
    stream = _stream_kernel()
    dst = np.empty_like(p)
    none = lambda: None  # noqa: E731
    return {"stream (AdamW bytes)": (lambda: stream(p, g, m, v), none),
            "copy": (lambda: np.copyto(dst, p), none)}


ROOFLINE = ("stream (AdamW bytes)", "copy")
# optserve's rows: without the metric sums (what the targets judge), and with them.
OURS = ("optserve", "optserve+sums")


# ---- driver -----------------------------------------------------------------------------------
def _record(optimizer, impl, shapes, layout, device, timing: Timing, bytes_per_param: int,
            backend: str | None = None) -> dict:
    n = sum(math.prod(s) for s in shapes)
    rate = n / (timing.ms / 1e3)
    rec = dict(optimizer=optimizer, impl=impl, params=n, layout=layout, tensors=len(shapes),
               threads=THREADS, device=device, params_per_s=rate,
               gb_per_s=rate * bytes_per_param / 1e9, bytes_per_param=bytes_per_param,
               ms=timing.ms, reps=timing.reps)
    if backend:
        rec["backend"] = backend
    return rec


def _set_threads() -> None:
    import numba
    import torch
    torch.set_num_threads(THREADS)
    numba.set_num_threads(min(THREADS, numba.config.NUMBA_NUM_THREADS))


def _add_ratios(records: list[dict]) -> None:
    """optserve_ratio on every other record of the same optimizer, size and layout (peers, and
    optserve+sums): optserve's params/s over its own; fraction_of_roofline_gb_per_s on
    optserve's records (GB/s over the stream's GB/s)."""
    ours = {(r["optimizer"], r["params"], r["layout"]): r for r in records if r["impl"] == "optserve"}
    stream = {r["params"]: r for r in records if r["impl"] == "stream (AdamW bytes)"}
    for r in records:
        key = (r["optimizer"], r["params"], r["layout"])
        if r["impl"] != "optserve" and r["impl"] not in ROOFLINE and key in ours:
            r["optserve_ratio"] = ours[key]["params_per_s"] / r["params_per_s"]
        if r["impl"] in OURS:
            sizes = sorted(stream, key=lambda s: abs(s - r["params"]))
            if sizes:
                r["fraction_of_roofline_gb_per_s"] = r["gb_per_s"] / stream[sizes[0]]["gb_per_s"]


def _markdown(records: list[dict], device: str, quick: bool) -> list[str]:
    ours = {(r["optimizer"], r["params"], r["layout"]): r for r in records if r["impl"] == "optserve"}
    rows = []
    for r in records:
        row = dict(r)
        row["mparams"] = r["params"] / 1e6
        row["gparams_per_s"] = r["params_per_s"] / 1e9
        if "fraction_of_roofline_gb_per_s" in r:
            row["roof"] = f"{100 * r['fraction_of_roofline_gb_per_s']:.0f} %"
        if r["impl"] == "optserve":
            row["vs"] = "—"
        elif "optserve_ratio" in r:
            row["vs"] = f"{r['optserve_ratio']:.2f}x"
        rows.append(row)
    table = _common.markdown_table(rows, [
        ("optimizer", "optimizer"), ("impl", "implementation"), ("layout", "layout"),
        ("tensors", "tensors"), ("mparams", "M params"), ("ms", "ms/step"),
        ("gparams_per_s", "G params/s"), ("gb_per_s", "GB/s (nominal)"), ("roof", "of stream GB/s"),
        ("vs", "optserve ÷ this")])

    verdicts = ["| target | size | layout | ratio | met |", "|---|---|---|---|---|"]
    all_met = True
    for (optimizer, peer), goal in TARGETS.items():
        for r in records:
            if r["optimizer"] == optimizer and r["impl"] == peer and "optserve_ratio" in r:
                met = r["optserve_ratio"] >= goal
                all_met &= met
                verdicts.append(f"| {optimizer} optserve ≥ {goal:g}x {peer} | {r['params'] / 1e6:.1f}M "
                                f"| {r['layout']} | {r['optserve_ratio']:.2f}x | {'yes' if met else 'NO'} |")
    backend = next((r.get("backend") for r in ours.values()), "?")
    notes = [
        f"optserve backend: `{backend}`; threads: {THREADS} (torch and numba); "
        f"OMP_WAIT_POLICY={OMP_WAIT_POLICY} for every implementation (see bench/kernels.py); "
        f"{'--quick: a reduced set. ' if quick else ''}Rounds: {reps_for(1 << 24, quick)} at 16M, "
        f"{reps_for(1 << 26, quick)} at 64M parameters.",
        "GB/s are nominal: params/s times the bytes a step must move "
        f"(AdamW {BYTES_PER_PARAM['adamw']} B, AdamP {BYTES_PER_PARAM['adamp']} B, "
        f"Adafactor {BYTES_PER_PARAM['adafactor']} B per parameter; see bench/kernels.py), "
        "the same figure for every implementation of an optimizer. The roofline rows are a "
        "fused single pass with AdamW's 28 B/param traffic and a plain copy (8 B/element), "
        "timed in the AdamW one-tensor rounds; 'of stream GB/s' compares optserve's nominal "
        "GB/s with the stream of the same size (measured in other rounds for the other rows, "
        "so it can exceed 100 % on a noisy machine).",
        "All implementations of one configuration are timed in interleaved rounds (one step of "
        "each per round; median over rounds after 2 warm-up steps).",
        "optserve steps with sums=False, as a shard does for every step that refreshes no "
        "per-tensor metrics, and is what the targets judge; optserve+sums is the same "
        "backend computing the float64 sums of a metrics refresh (‖w‖², ⟨w, Δw⟩, ‖Δw‖², ‖g‖²) "
        "in the same pass, and 'optserve ÷ this' in its row is what skipping them gains.",
        "Gradients are random, so AdamP rarely projects; ratios compare implementations "
        "measured in this same run. The machine is shared and noisy: compare ratios, not "
        "absolute figures.",
    ]
    return [
        "## Targets\n\n" + "\n".join(verdicts) + f"\n\nAll targets met: {'yes' if all_met else 'no'}.",
        "## Measurements\n\n" + table,
        "## Notes\n\n" + "\n".join(f"- {n}" for n in notes),
    ]


def main(args: argparse.Namespace) -> int:
    from optserve.kernels import get_backend
    _set_threads()
    backend = get_backend("auto")
    gpu = backend.name == "cuda"
    device = _common.device_description(backend.runtime().device_name if gpu else None)
    quick = bool(getattr(args, "quick", False))
    sizes = (1 << 24,) if quick else (1 << 24, 1 << 26)
    layouts = LAYOUTS
    peer_device = "cuda" if gpu else "cpu"
    if gpu:
        import torch
        if not torch.cuda.is_available():
            peer_device = None           # no CUDA torch: GPU peers cannot be measured
    records: list[dict] = []

    def log(rec: dict) -> None:
        print(f"{rec['optimizer']:>9} {rec['impl']:<24} {rec['layout']:<17} {rec['params'] / 1e6:6.1f}M "
              f"{rec['ms']:9.2f} ms  {rec['params_per_s'] / 1e9:6.3f} Gp/s  {rec['gb_per_s']:6.1f} GB/s",
              flush=True)

    for optimizer in OPTIMIZERS:
        for n in sizes:
            for layout in layouts:
                if quick and layout == "one-tensor" and optimizer != "adamw":
                    continue
                shapes = shapes_for(layout, n)
                steps = {"optserve": optserve_step(optimizer, shapes, backend, sums=False),
                         "optserve+sums": optserve_step(optimizer, shapes, backend, sums=True)}
                if peer_device is not None:
                    for impl in PEERS[optimizer]:
                        if not (quick and impl == "torch.AdamW(foreach)"):
                            steps[impl] = peer_step(impl, shapes, peer_device)
                if optimizer == "adamw" and layout == "one-tensor":   # the roofline, same rounds
                    steps.update(roofline_steps(sum(math.prod(s) for s in shapes), gpu))
                for impl, t in interleaved(steps, reps_for(n, quick), warmup=2).items():
                    if impl in ROOFLINE:
                        rec = _record("-", impl, shapes, layout, device, t,
                                      ROOFLINE_BYTES if impl.startswith("stream") else 8)
                    else:
                        rec = _record(optimizer, impl, shapes, layout, device, t,
                                      BYTES_PER_PARAM[optimizer],
                                      backend=backend.name if impl in OURS else None)
                    records.append(rec)
                    log(rec)
                del steps
                gc.collect()
    _add_ratios(records)
    out = _common.out_dir(getattr(args, "out", None))
    meta = dict(date=_common.today(), device=device, threads=THREADS, quick=quick,
                load_average_at_end=os.getloadavg(),
                omp_wait_policy=OMP_WAIT_POLICY,
                backend=backend.name, bytes_per_param=BYTES_PER_PARAM, targets={
                    f"{o} vs {p}": g for (o, p), g in TARGETS.items()},
                cpu_count=os.cpu_count())
    _common.write_json(out / "kernels.json", records, meta)
    _common.write_markdown(out / "kernels.md", "Optimizer step kernels", device,
                           _markdown(records, device, quick))
    print(f"wrote {out / 'kernels.json'} and {out / 'kernels.md'}")
    return 0
