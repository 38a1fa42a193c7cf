"""`optserve bench gpu`: the GPU shard's whole validation in one run, sized for under 8
minutes on one H100 or H200 (bench/README.md says how to carry the project there).

Sections, each timed, each kept when a later one fails (the JSON is rewritten after each):
  environment   the device, driver, CUDA runtime, CuPy, NVRTC and torch; the kernels'
                cold compile (an empty cache) and warm load (from the cache)
  tests         tests/test_cuda.py, test_state.py, test_cupy_contract.py and test_kernels.py's
                GPU cases, run by pytest on the GPU (needs the source tree)
  sanitizer     compute-sanitizer memcheck and racecheck over every optimizer's step, a sync
                mean of two workers and the wire encoding, where the tool is installed
  kernels       step throughput of every optimizer at 16M, 268M and 1.07B parameters, as one
                tensor and as ~200 transformer-shaped tensors, with the metric sums off and
                on, against the peer on CUDA (torch.optim.AdamW fused, adamp.AdamP,
                torch.optim.Adafactor, lion_pytorch.Lion) in interleaved rounds, and AdamW
                against a device-to-device copy of its 28 bytes per parameter
  transfers     host to device and back, page-locked against pageable memory
  e2e           a loopback run of 2 workers (sync, bfloat16 on the wire) at 10M and 100M
                parameters against a `--device cuda` shard and a `--device cpu` shard (whose
                kernels use every core: the workers run torch on one thread each)
  crash         a `--device cuda` shard killed with SIGKILL mid-training and restarted: the
                client rolls back to the last checkpoint and goes on from there

The optserve rows step a job's DeviceState as a shard does (kernels/cuda_state.py: state on
the device, the gradient in a device buffer), so they include everything but the receipt.

`--emulate` runs every section on the CuPy test double (tests/fake_cupy, the kernels on the
host emulation) at toy sizes, without the tests, sanitizer and peers, so that CI runs this
script; its files are named gpu-emulated.* and carry no GPU figure.

Results: gpu.json (meta and one record list per section) and gpu.md; logs under gpu-logs/.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Callable

import numpy as np

from optserve.bench import _common

BUDGET_S = 8 * 60
SIZES = {"16M": 1 << 24, "268M": 1 << 28, "1.07B": 1 << 30}
EMULATED_SIZES = {"64K": 1 << 16}
OPTIMIZERS = ("adamw", "adamp", "adafactor", "lion")
LAYOUTS = ("one-tensor", "transformer-mixed")
PEER = {"adamw": "torch.AdamW(fused)", "adamp": "adamp.AdamP", "adafactor": "torch.Adafactor",
        "lion": "lion_pytorch.Lion"}
# optserve / peer params/s on CUDA; AdamW's fraction of the copy-bandwidth limit.
TARGETS = {"adamw": 1.0, "adamp": 5.0, "adafactor": 3.0}
COPY_FRACTION, COPY_FROM = 0.9, 1 << 28
TRANSFER_BYTES, EMULATED_TRANSFER_BYTES = 256 << 20, 4 << 20
GPU_TESTS = ("test_cuda.py", "test_state.py", "test_cupy_contract.py")


class Run:
    """The records of every section, written out after each."""

    def __init__(self, out: pathlib.Path, emulate: bool):
        self.out, self.emulate = out, emulate
        self.stem = "gpu-emulated" if emulate else "gpu"
        self.logs = out / f"{self.stem}-logs"       # every log, apart from the results
        self.logs.mkdir(parents=True, exist_ok=True)
        self.sections: dict[str, dict] = {}
        self.meta: dict = dict(date=_common.today(), emulated=emulate)
        self.started = time.monotonic()

    def left(self) -> float:
        return BUDGET_S - (time.monotonic() - self.started)

    def section(self, name: str, fn: Callable[["Run", dict], None]) -> None:
        """Runs fn(run, result), which appends to result["records"] as it measures: what it
        measured stays when it fails part way."""
        print(f"== {name} ({self.left():.0f} s of the budget left)", flush=True)
        start = time.monotonic()
        result = self.sections[name] = dict(records=[], notes=[])
        try:
            fn(self, result)
        except Exception as e:    # one failed section must not lose the others
            traceback.print_exc()
            result["error"] = f"{type(e).__name__}: {e}"
        result["seconds"] = round(time.monotonic() - start, 1)
        self.write()

    def within(self, reserve: float, cap: float) -> float:
        """A subprocess's timeout: at most `cap`, leaving `reserve` of the budget."""
        return max(30.0, min(cap, self.left() - reserve))

    def write(self) -> None:
        path = self.out / f"{self.stem}.json"
        path.write_text(json.dumps(dict(meta=self.meta, sections=self.sections), indent=1,
                                   default=str) + "\n")
        _common.write_markdown(self.out / f"{self.stem}.md",
                               "GPU shard validation" + (" (EMULATED: no GPU figures)"
                                                         if self.emulate else ""),
                               self.meta.get("device", "?"), markdown(self))


# ---- environment -------------------------------------------------------------------------------
def environment(run: Run, result: dict) -> None:
    import cupy
    from cupy_backends.cuda.libs import nvrtc

    from optserve.kernels import cuda
    from optserve.kernels.cuda_runtime import CupyRuntime, compile_kernels
    rt_api = cupy.cuda.runtime
    device = cupy.cuda.Device()
    name = rt_api.getDeviceProperties(device.id)["name"].decode()
    run.meta["device"] = _common.device_description(name)
    env = dict(gpu=name, compute_capability=device.compute_capability,
               memory_bytes=rt_api.memGetInfo()[1], driver=rt_api.driverGetVersion(),
               cuda_runtime=rt_api.runtimeGetVersion(), nvrtc=".".join(map(str, nvrtc.getVersion())),
               cupy=cupy.__version__, python=sys.version.split()[0], numpy=np.__version__)
    try:
        import torch
        env.update(torch=torch.__version__, torch_cuda=torch.cuda.is_available())
    except ImportError:
        env.update(torch=None, torch_cuda=False)
    if shutil.which("nvidia-smi"):
        env["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,"
             "temperature.gpu,power.draw", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30).stdout.strip()
    with tempfile.TemporaryDirectory() as cache:
        source, arch = cuda.source(), int(device.compute_capability)
        t = time.perf_counter()
        compile_kernels(source, arch, cache=pathlib.Path(cache))
        env["cold_compile_s"] = time.perf_counter() - t
        t = time.perf_counter()
        compile_kernels(source, arch, cache=pathlib.Path(cache))
        env["cached_compile_s"] = time.perf_counter() - t
        os.environ["OPTSERVE_KERNEL_CACHE"] = cache
        try:
            t = time.perf_counter()
            CupyRuntime(source)
            env["runtime_start_s"] = time.perf_counter() - t   # a shard's start, cache warm
        finally:
            del os.environ["OPTSERVE_KERNEL_CACHE"]
    run.meta.update(env)
    result["records"].append(env)


# ---- tests and sanitizer -----------------------------------------------------------------------
def tests(run: Run, result: dict) -> None:
    folder = run.meta["source"] / "tests"
    if run.emulate or not folder.is_dir():
        result["skipped"] = ("emulated: CI runs these itself" if run.emulate
                             else f"no tests folder under {run.meta['source']}")
        return
    log = run.logs / "tests.log"
    # From tests/: the checkout's optserve/ folder must not shadow the installed package.
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *GPU_TESTS,
            "test_kernels.py", "-k", "gpu or not test_kernels"]
    try:
        proc = subprocess.run(argv, cwd=folder, capture_output=True, text=True,
                              timeout=run.within(reserve=330, cap=200))
        output, returncode = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        output, returncode = _text(e.stdout) + _text(e.stderr) + "\n(timed out)", None
    log.write_text(output)
    summary = (output.strip().splitlines() or ["(no output)"])[-1]
    result["records"].append(dict(returncode=returncode, summary=summary, log=log.name))


def sanitizer(run: Run, result: dict) -> None:
    tool = shutil.which("compute-sanitizer")
    if run.emulate or tool is None:
        result["skipped"] = "emulated" if run.emulate else "compute-sanitizer is not installed"
        return
    for check in ("memcheck", "racecheck"):
        argv = [tool, "--tool", check, "--error-exitcode", "3", sys.executable, "-m",
                "optserve.bench.gpu", "sanitize-target"]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True,
                                  timeout=run.within(reserve=300, cap=100))
            output, returncode = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            output, returncode = _text(e.stdout) + _text(e.stderr) + "\n(timed out)", None
        lines = output.strip().splitlines()
        summary = next((ln for ln in reversed(lines) if "SUMMARY" in ln), lines[-1] if lines else "")
        result["records"].append(dict(tool=check, returncode=returncode, summary=summary.strip()))
        (run.logs / f"{check}.log").write_text("\n".join(lines[-200:]))


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def sanitize_target() -> None:
    """What compute-sanitizer watches: every optimizer through a DeviceState, with two
    workers' bfloat16 gradients in chunks, their mean, the sums and the wire encoding."""
    from optserve.kernels import FlatLayout, Hyper, cuda
    from optserve.kernels.convert import encode_reference
    from optserve.proto.optimizers import REGISTRY, group_to_proto
    from optserve.proto.v1 import optserve_pb2 as pb
    from optserve.proto.wire import chunked
    import cupy
    cupy.cuda.set_allocator(None)   # no pool: memcheck then knows every allocation's bounds
    shapes = [(33, 17), (7,), (300, 301), (2, 3, 4, 5), (129,), (1,), (64, 1024)]
    rng = np.random.default_rng(0)
    for optimizer in OPTIMIZERS:
        info = REGISTRY[optimizer]
        h = group_to_proto(optimizer, dict(info.defaults), info.defaults.get("lr") or 1e-2)
        layout = FlatLayout(shapes, [info.state_fields(s, h) for s in shapes])
        hyper = Hyper.from_groups([h], np.zeros(len(shapes), int))
        state = cuda.new_state(layout, rng.standard_normal(layout.numel).astype(np.float32))
        every = np.arange(layout.num_tensors)
        for _ in range(2):
            for worker in (0, 1):
                wire = np.empty(2 * layout.numel, np.uint8)
                encode_reference(rng.standard_normal(layout.numel).astype(np.float32), "bfloat16", wire)
                receiver = state.receive(worker, pb.BFLOAT16, every, "gradient")
                for chunk in chunked(wire, 65536):
                    receiver.add(chunk)
                assert receiver.finish()
            state.steps[:] += 1
            state.step(optimizer, {0: every, 1: every}, every, hyper, sums=True)
            out = state.reply_buffer(2 * layout.numel)
            state.encode(every, pb.BFLOAT16, out, 0)[-1].wait()
        state.release()
    print("sanitize-target: done", flush=True)


# ---- kernels ------------------------------------------------------------------------------------
def _optserve(optimizer: str, shapes, params: np.ndarray, grad: np.ndarray):
    """(state, step(sums)) of a job's DeviceState over `shapes`, its gradient in place."""
    from optserve.bench.kernels import _hyper
    from optserve.kernels import FlatLayout, cuda
    from optserve.proto.optimizers import REGISTRY
    hyper, proto = _hyper(optimizer, len(shapes))
    layout = FlatLayout(shapes, [REGISTRY[optimizer].state_fields(s, proto) for s in shapes])
    state = cuda.new_state(layout, params[:layout.numel])
    state.grads[0] = state.rt.upload(grad[:layout.numel])
    every = np.arange(layout.num_tensors)

    def step(sums: bool) -> Callable[[], None]:
        def go():
            state.steps[:] += 1
            state.step(optimizer, {0: every}, every, hyper, sums=sums)
        return go
    return state, step


def _peer(optimizer: str, shapes):
    import torch

    from optserve.bench.kernels import make_peer
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=gen, device="cuda"))
        p.grad = torch.randn(s, generator=gen, device="cuda")
        params.append(p)
    opt = make_peer(PEER[optimizer], params)

    def step():
        with torch.no_grad():
            opt.step()
    return opt, step


def _copy(rt, nbytes: int):
    """A device-to-device copy of `nbytes` (read + write: 2 × nbytes moved)."""
    src, dst = rt.empty(nbytes, np.uint8), rt.empty(nbytes, np.uint8)
    stream = rt.stream()
    api = rt.cp.cuda.runtime

    def step():
        api.memcpyAsync(dst.data.ptr, src.data.ptr, nbytes, api.memcpyDeviceToDevice, stream.ptr)
    return (src, dst), step, stream.synchronize


def kernels(run: Run, result: dict) -> None:
    from optserve.bench.kernels import shapes_for
    from optserve.kernels import cuda
    rt = cuda.runtime()
    peers = bool(run.meta.get("torch_cuda")) and not run.emulate
    sizes = EMULATED_SIZES if run.emulate else SIZES
    largest = max(sum(math.prod(s) for s in shapes_for(layout, n))
                  for n in sizes.values() for layout in LAYOUTS)
    rng = np.random.default_rng(0)      # one draw for every job: 1.07B normals take a while
    params = rng.random(largest, dtype=np.float32) - np.float32(0.5)
    grad = rng.random(largest, dtype=np.float32) - np.float32(0.5)
    records = result["records"]
    for label, n in sizes.items():
        for layout in LAYOUTS:
            for optimizer in OPTIMIZERS:
                if run.left() < 200:
                    result["notes"].append(f"stopped before {optimizer} {layout} {label}: the budget")
                    return
                try:
                    records += _measure(rt, optimizer, layout, label, shapes_for(layout, n),
                                        params, grad, peers, run.emulate, result["notes"])
                except Exception as e:   # out of memory at 1.07B, say: the other sizes stand
                    traceback.print_exc()
                    result["notes"].append(f"{optimizer} {layout} {label} failed: "
                                           f"{type(e).__name__}: {e}")
                finally:                 # _measure's arrays are gone: give their memory back
                    gc.collect()
                    if peers:
                        import torch
                        torch.cuda.empty_cache()
                    rt.release_cached()
                _ratios(records)
                run.write()


def _measure(rt, optimizer: str, layout: str, label: str, shapes, params, grad, peers: bool,
             emulate: bool, notes: list) -> list[dict]:
    """One optimizer, layout and size: optserve with the sums off and on, its CUDA peer, and
    for AdamW a copy of its bytes, in interleaved rounds."""
    from optserve.bench.kernels import BYTES_PER_PARAM, interleaved
    numel = sum(math.prod(s) for s in shapes)
    state, step = _optserve(optimizer, shapes, params, grad)
    steps = {"optserve": (step(False), state.stream.synchronize),
             "optserve+sums": (step(True), state.stream.synchronize)}
    if peers:
        import torch
        _opt, peer_step = _peer(optimizer, shapes)
        steps[PEER[optimizer]] = (peer_step, torch.cuda.synchronize)
    if optimizer == "adamw":
        free = rt.memory()[0]
        copy_bytes = 14 * numel       # read + write: AdamW's 28 bytes per parameter
        if 2 * copy_bytes < 0.8 * free:
            _buffers, copy_step, copy_sync = _copy(rt, copy_bytes)
            steps["copy (28 B/param)"] = (copy_step, copy_sync)
        else:
            notes.append(f"no copy at {label} {layout}: {2 * copy_bytes / 1e9:.0f} GB would not "
                         f"fit in {free / 1e9:.0f} GB free")
    reps = 3 if emulate else (7 if numel > 1e8 else 15)
    records = []
    try:
        for impl, t in interleaved(steps, reps, warmup=2).items():
            per_param = 28 if impl.startswith("copy") else BYTES_PER_PARAM[optimizer]
            rate = numel / (t.ms / 1e3)
            records.append(dict(optimizer=optimizer, impl=impl, size=label, params=numel,
                                tensors=len(shapes), layout=layout, ms=t.ms, reps=t.reps,
                                params_per_s=rate, gb_per_s=rate * per_param / 1e9))
            print(f"{optimizer:>9} {impl:<22} {layout:<17} {label:>5} {t.ms:9.3f} ms "
                  f"{records[-1]['gb_per_s']:8.1f} GB/s", flush=True)
    finally:
        state.release()
    return records


def _ratios(records: list[dict]) -> None:
    ours = {(r["optimizer"], r["size"], r["layout"]): r for r in records if r["impl"] == "optserve"}
    for r in records:
        mine = ours.get((r["optimizer"], r["size"], r["layout"]))
        if mine is None or r is mine:
            continue
        if r["impl"].startswith("copy"):
            mine["fraction_of_copy"] = mine["gb_per_s"] / r["gb_per_s"]
        else:
            r["optserve_ratio"] = mine["params_per_s"] / r["params_per_s"]


# ---- transfers ---------------------------------------------------------------------------------
def transfers(run: Run, result: dict) -> None:
    from optserve.kernels import cuda
    rt = cuda.runtime()
    nbytes = EMULATED_TRANSFER_BYTES if run.emulate else TRANSFER_BYTES
    dev = rt.empty(nbytes, np.uint8)
    stream = rt.stream()
    hosts = {"pinned": rt.pinned(nbytes), "pageable": np.ones(nbytes, np.uint8)}
    records = result["records"]
    for kind, host in hosts.items():
        for direction in ("h2d", "d2h"):
            times = []
            for _ in range(3 if run.emulate else 10):
                t = time.perf_counter()
                if direction == "h2d":
                    rt.h2d(dev, 0, host, stream)
                else:
                    rt.d2h(host, dev, 0, stream)
                stream.synchronize()
                times.append(time.perf_counter() - t)
            s = _common.median(times)
            records.append(dict(memory=kind, direction=direction, bytes=nbytes, ms=1e3 * s,
                                gb_per_s=nbytes / s / 1e9))


# ---- end to end ---------------------------------------------------------------------------------
def e2e(run: Run, result: dict) -> None:
    from optserve import local
    from optserve.bench import e2e as e2e_bench
    models = ([e2e_bench.Model("toy", 64, 2)] if run.emulate
              else [e2e_bench.MODELS["10M"], e2e_bench.MODELS["100M"]])
    steps = {"toy": (1, 2), "10M": (2, 10), "100M": (1, 5)}
    log_dir = run.logs
    records = result["records"]
    with e2e_bench.WorkerPool(2) as pool:
        for model in models:
            case = e2e_bench.Case(model, 1, 2, "bfloat16", *steps[model.label])
            for backend in ("cpu", "cuda"):
                if run.left() < 90:
                    result["notes"].append("stopped early: the budget")
                    return
                argv = local.shard_command("--device", backend)
                tag = f"{backend}-{model.label}"
                with e2e_bench.Servers(argv, 1, log_dir, tag) as shards:
                    # over gRPC, as the CPU figures it is compared with in bench/results
                    reports = pool.run(e2e_bench.optserve_worker, case,
                                       (shards.endpoints, f"gpu-bench-{tag}", False))
                rec = e2e_bench.summarize(e2e_bench.IMPL_OPTSERVE, case, reports,
                                          run.meta.get("device", "?"), 1)
                rec["backend"] = backend
                records.append(rec)
                _speedups(records)
                print(f"e2e {model.label:>5} --device {backend:<4} {rec['step_ms_median']:9.1f} ms/step",
                      flush=True)


def _speedups(records: list[dict]) -> None:
    for r in records:
        cpu = [c for c in records if c["backend"] == "cpu" and c["params"] == r["params"]]
        if r["backend"] == "cuda" and cpu:
            r["speedup_over_cpu"] = cpu[0]["step_ms_median"] / r["step_ms_median"]


# ---- crash and restore --------------------------------------------------------------------------
def crash(run: Run, result: dict) -> None:
    import torch

    from optserve import local
    from optserve.client import RemoteOptimizer, RolledBack, Unavailable
    torch.manual_seed(0)
    width = 64 if run.emulate else 1024
    model = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                torch.nn.Linear(4 * width, width))
    x = torch.randn(32, width)
    port = local.free_port()
    with tempfile.TemporaryDirectory() as ckpt:
        argv = local.shard_command("--device", "cuda", "--port", str(port),
                                   "--checkpoint-dir", ckpt, "--checkpoint-every", "2")
        shard = local.start(argv, run.logs / "crash-shard.log")
        opt = RemoteOptimizer(model.parameters(), "adamw", servers=[shard.address],
                              job="gpu-bench-crash", lr=1e-3)
        at_checkpoint = None
        try:
            for step in range(5):
                opt.zero_grad()
                model(x).square().mean().backward()
                opt.step()
                if step == 3:          # version 4: the last checkpoint before the kill
                    at_checkpoint = [p.detach().clone() for p in model.parameters()]
            shard.proc.send_signal(signal.SIGKILL)
            shard.proc.wait()
            t = time.perf_counter()
            shard = local.start(argv, run.logs / "crash-restart.log")
            restart_s = time.perf_counter() - t
            rolled_back = None
            deadline = time.monotonic() + 60
            while rolled_back is None:
                opt.zero_grad()
                model(x).square().mean().backward()
                try:
                    opt.step()
                    break
                except RolledBack as e:
                    rolled_back = e.step
                except Unavailable:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            restored = all(torch.equal(a, p.detach()) for a, p in zip(at_checkpoint, model.parameters()))
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()                 # and training goes on from the checkpoint
            record = dict(killed_at_version=5, rolled_back_to=rolled_back, parameters_restored=restored,
                          restart_to_listening_s=restart_s, version_after=opt.version)
        finally:
            opt.close()
            shard.stop()
    record["ok"] = (record["rolled_back_to"] == 4 and record["parameters_restored"]
                    and record["version_after"] == 5)
    result["records"].append(record)


# ---- report -------------------------------------------------------------------------------------
def markdown(run: Run) -> list[str]:
    out = [_verdicts(run)]
    for name, section in run.sections.items():
        text = f"## {name} ({section.get('seconds', '?')} s)\n\n"
        if "error" in section:
            text += f"Failed: `{section['error']}`\n\n"
        if "skipped" in section:
            text += f"Skipped: {section['skipped']}."
        else:
            records = section.get("records", [])
            if records:
                columns = [(k, k) for k in records[0] if k not in ("device",)]
                if name == "kernels":
                    columns = [(k, k) for k in ("optimizer", "impl", "layout", "size", "tensors",
                                                 "ms", "gb_per_s", "optserve_ratio", "fraction_of_copy")]
                elif name == "e2e":
                    columns = [(k, k) for k in ("params_label", "backend", "workers", "wire_dtype",
                                                 "step_ms_median", "step_ms_p90", "speedup_over_cpu")]
                text += _common.markdown_table(records, columns)
            for note in section.get("notes", []):
                text += f"\n- {note}"
        out.append(text)
    return out


def _verdicts(run: Run) -> str:
    if run.emulate:
        return ("## Targets\n\nNot judged: an emulated run (the CuPy test double, kernels on the "
                "host emulation) checks that this script works, not how fast a GPU is.")
    lines = []
    kern = run.sections.get("kernels", {}).get("records", [])
    for r in kern:
        if r["impl"] == PEER.get(r["optimizer"]) and r["optimizer"] in TARGETS:
            goal = TARGETS[r["optimizer"]]
            lines.append(f"- {r['optimizer']} {r['layout']} {r['size']}: {r['optserve_ratio']:.2f}× "
                         f"{r['impl']} (target ≥ {goal}×): {'met' if r['optserve_ratio'] >= goal else 'MISSED'}")
        if r["impl"] == "optserve" and "fraction_of_copy" in r and r["params"] >= COPY_FROM:
            lines.append(f"- adamw {r['layout']} {r['size']}: {100 * r['fraction_of_copy']:.0f} % of "
                         f"the copy bandwidth (target ≥ {100 * COPY_FRACTION:.0f} %): "
                         f"{'met' if r['fraction_of_copy'] >= COPY_FRACTION else 'MISSED'}")
    for r in run.sections.get("e2e", {}).get("records", []):
        if r["backend"] == "cuda" and r["params_label"] == "100M":
            lines.append(f"- e2e 100M: a --device cuda step {r['speedup_over_cpu']:.2f}× as fast as "
                         f"--device cpu (target > 1): {'met' if r['speedup_over_cpu'] > 1 else 'MISSED'}")
    return "## Targets\n\n" + ("\n".join(lines) or "No target measured yet.")


def main(args: argparse.Namespace) -> int:
    source = pathlib.Path(args.source or pathlib.Path(__file__).resolve().parents[1]).resolve()
    if args.emulate:
        fake = source / "tests" / "fake_cupy"
        if not fake.is_dir():
            raise SystemExit(f"--emulate needs a source checkout with tests/fake_cupy (--source; not {source})")
        sys.path.insert(0, str(fake))   # here, and in the shards this run starts
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(fake), os.environ.get("PYTHONPATH")]))
    from optserve.kernels import why_no_gpu
    reason = why_no_gpu()
    if reason:
        raise SystemExit(f"optserve bench gpu: {reason} (--emulate runs it on the CuPy test double)")
    out = _common.out_dir(args.out)
    run = Run(out, args.emulate)
    run.meta["source"] = source
    for name, fn in (("environment", environment), ("tests", tests), ("sanitizer", sanitizer),
                     ("kernels", kernels), ("transfers", transfers), ("e2e", e2e), ("crash", crash)):
        run.section(name, fn)
    run.meta["seconds"] = round(time.monotonic() - run.started, 1)
    run.write()
    print((out / f"{run.stem}.md").read_text())
    failed = [n for n, s in run.sections.items() if "error" in s]
    return 1 if failed else 0


if __name__ == "__main__" and sys.argv[1:] == ["sanitize-target"]:
    sanitize_target()
