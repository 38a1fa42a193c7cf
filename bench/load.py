"""`optserve bench load`: 32 concurrent workers against 2 shards for a bounded time.

8 sync jobs of 4 workers each; every job spreads over both shards. Workers are threads in
4 processes (one RemoteOptimizer and connection set per worker), so 32 workers fit on a
2-core machine. Each worker sets fixed random gradients and calls step() until the time is
up. Reported: steps/s, p50/p99 step latency, errors (target 0), and the shards' resident
memory sampled every second (target: flat).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pathlib
import queue
import re
import subprocess
import sys
import threading
import time

from optserve.bench._common import RESULTS_DIR, device_description, percentile, today

JOBS, WORKERS_PER_JOB, PROCESSES = 8, 4, 4


def start_shard() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "optserve", "server", "--port", "0",
                             "--device", "cpu"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    address = re.search(r"listening on (\S+)", proc.stdout.readline()).group(1)
    return proc, address


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker_process(index: int, servers: list[str], seconds: float, out) -> None:
    """WORKERS_PER_JOB * JOBS / PROCESSES worker threads; puts (latencies, errors)."""
    import torch
    from optserve.client import RemoteOptimizer
    torch.set_num_threads(1)
    per_process = JOBS * WORKERS_PER_JOB // PROCESSES
    latencies, errors = [], []
    lock = threading.Lock()
    start = threading.Barrier(per_process)

    def one_worker(slot: int) -> None:
        global_id = index * per_process + slot
        job, rank = divmod(global_id, WORKERS_PER_JOB)
        torch.manual_seed(job)
        model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 64))
        opt = RemoteOptimizer(model.parameters(), "adamw", servers=servers, job=f"load-{job}",
                              rank=rank, world_size=WORKERS_PER_JOB, timeout=60.0)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        start.wait()
        deadline = time.monotonic() + seconds
        mine = []
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            try:
                opt.step()
                mine.append(time.perf_counter() - t0)
            except Exception as e:  # counted, reported; the run goes on
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
        opt.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=one_worker, args=(s,)) for s in range(per_process)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put((latencies, errors))


def main(args: argparse.Namespace) -> int:
    seconds = 20.0 if args.quick else float(os.environ.get("OPTSERVE_LOAD_SECONDS", 300))
    shards = [start_shard() for _ in range(2)]
    servers = [address for _, address in shards]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=worker_process, args=(i, servers, seconds, out))
             for i in range(PROCESSES)]
    memory = []
    began = time.monotonic()
    for p in procs:
        p.start()
    print(f"load: {JOBS * WORKERS_PER_JOB} workers ({JOBS} sync jobs x {WORKERS_PER_JOB}) "
          f"against 2 shards for {seconds:.0f}s")
    results = []
    while len(results) < len(procs):
        memory.append((round(time.monotonic() - began, 1), [rss_mb(s.pid) for s, _ in shards]))
        try:
            results.append(out.get(timeout=1.0))
        except queue.Empty:  # keep sampling memory
            pass
    for p in procs:
        p.join()
    for s, _ in shards:
        s.terminate()
        s.wait(30)
    latencies = [x for lat, _ in results for x in lat]
    errors = [e for _, err in results for e in err]
    report = summarize(latencies, errors, memory, seconds)
    write(report, pathlib.Path(args.out) if args.out else RESULTS_DIR)
    print(json.dumps({k: v for k, v in report.items() if k != "memory_mb"}, indent=1))
    return 0 if not errors else 1


def summarize(latencies, errors, memory, seconds) -> dict:
    # Memory after warm-up (the first 10% of the run) against the end: flat means no growth.
    steady = [m for t, m in memory if t >= 0.1 * seconds] or [m for _, m in memory]
    first, last = steady[0], steady[-1]
    return {
        "device": device_description(), "date": today(),
        "workers": JOBS * WORKERS_PER_JOB, "jobs": JOBS, "shards": 2, "seconds": seconds,
        "steps": len(latencies), "worker_steps_per_s": len(latencies) / seconds,
        "job_steps_per_s": len(latencies) / seconds / WORKERS_PER_JOB,
        "p50_ms": 1e3 * percentile(latencies, 50), "p99_ms": 1e3 * percentile(latencies, 99),
        "errors": len(errors), "error_samples": errors[:5],
        "shard_rss_mb_after_warmup": first, "shard_rss_mb_end": last,
        "shard_rss_growth_mb": [b - a for a, b in zip(first, last)],
        "memory_mb": memory,
    }


def write(report: dict, out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "load.json").write_text(json.dumps(report, indent=1))
    rss = ", ".join(f"{a:.0f} -> {b:.0f} MB" for a, b in zip(report["shard_rss_mb_after_warmup"],
                                                         report["shard_rss_mb_end"]))
    (out / "load.md").write_text(
        f"# optserve bench load\n\n{report['date']}, {report['device']}.\n\n"
        f"{report['workers']} workers ({report['jobs']} sync AdamW jobs of {WORKERS_PER_JOB} "
        f"workers, 82k parameters each) against 2 shards for {report['seconds']:.0f} s.\n\n"
        "| steps/s (worker) | steps/s (job) | p50 step | p99 step | errors | shard RSS after warm-up -> end |\n"
        "|---|---|---|---|---|---|\n"
        f"| {report['worker_steps_per_s']:.0f} | {report['job_steps_per_s']:.0f} | "
        f"{report['p50_ms']:.1f} ms | {report['p99_ms']:.1f} ms | {report['errors']} | {rss} |\n")
