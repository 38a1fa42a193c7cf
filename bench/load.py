"""`optserve bench load`: many concurrent workers against 2 shards for a bounded time.

Two scenarios, each with fresh shards:
  many-workers  32 workers: 8 sync jobs of 4, small models (82k parameters), so steps are
                short and the shards juggle many connections and barriers at once;
  stepper       8 workers: 2 sync jobs of 4, models of 4.2M parameters (~8 MB of reply per
                shard), so that every step runs in parts on the shards' stepper threads
                while its reply streams.
Every job spreads over both shards. Workers are threads in 4 processes (one RemoteOptimizer
and connection set per worker), so they fit on a 2-core machine. Each worker sets fixed
random gradients and calls step() until the time is up. Reported: steps/s, p50/p99 step
latency, errors (target 0), and the shards' resident memory sampled every second (target:
flat).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pathlib
import queue
import threading
import time
from dataclasses import dataclass

from optserve import local
from optserve.bench._common import device_description, out_dir, percentile, today

PROCESSES = 4


@dataclass(frozen=True)
class Scenario:
    name: str
    jobs: int
    workers_per_job: int
    layers: tuple[tuple[int, int], ...]    # (in, out) of each Linear layer of a worker's model
    share: float                           # of the run's time

    @property
    def workers(self) -> int:
        return self.jobs * self.workers_per_job

    @property
    def params(self) -> int:
        return sum(i * o + o for i, o in self.layers)


SCENARIOS = [Scenario("many-workers", 8, 4, ((256, 256), (256, 64)), 1.0),
             Scenario("stepper", 2, 4, ((1024, 2048), (2048, 1024)), 0.4)]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker_process(index: int, servers: list[str], seconds: float, scenario: Scenario,
                   out) -> None:
    """The scenario's workers / PROCESSES worker threads; puts (latencies, errors)."""
    import torch
    from optserve.client import RemoteOptimizer
    torch.set_num_threads(1)
    per_process = scenario.workers // PROCESSES
    latencies, errors = [], []
    lock = threading.Lock()
    start = threading.Barrier(per_process)

    def one_worker(slot: int) -> None:
        global_id = index * per_process + slot
        job, rank = divmod(global_id, scenario.workers_per_job)
        torch.manual_seed(job)
        model = torch.nn.Sequential(*(torch.nn.Linear(i, o) for i, o in scenario.layers))
        opt = RemoteOptimizer(model.parameters(), "adamw", servers=servers, job=f"load-{job}",
                              rank=rank, world_size=scenario.workers_per_job, timeout=60.0)
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
    reports = [run(scenario, seconds * scenario.share) for scenario in SCENARIOS]
    write(reports, out_dir(args.out))
    for report in reports:
        print(json.dumps({k: v for k, v in report.items() if k != "memory_mb"}, indent=1))
    return 0 if not any(r["errors"] for r in reports) else 1


def run(scenario: Scenario, seconds: float) -> dict:
    shards = [local.start(local.shard_command("--device", "cpu")) for _ in range(2)]
    servers = [s.address for s in shards]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=worker_process, args=(i, servers, seconds, scenario, out))
             for i in range(PROCESSES)]
    memory = []
    began = time.monotonic()
    for p in procs:
        p.start()
    print(f"load, {scenario.name}: {scenario.workers} workers ({scenario.jobs} sync jobs x "
          f"{scenario.workers_per_job}) against 2 shards for {seconds:.0f}s")
    results = []
    while len(results) < len(procs):
        memory.append((round(time.monotonic() - began, 1), [rss_mb(s.proc.pid) for s in shards]))
        try:
            results.append(out.get(timeout=1.0))
        except queue.Empty:  # keep sampling memory
            pass
    for p in procs:
        p.join()
    for s in shards:
        s.stop()
    latencies = [x for lat, _ in results for x in lat]
    errors = [e for _, err in results for e in err]
    return summarize(scenario, latencies, errors, memory, seconds)


def summarize(scenario: Scenario, latencies, errors, memory, seconds) -> dict:
    # Memory after warm-up (the first 10% of the run) against the end: flat means no growth.
    steady = [m for t, m in memory if t >= 0.1 * seconds] or [m for _, m in memory]
    first, last = steady[0], steady[-1]
    return {
        "scenario": scenario.name, "device": device_description(), "date": today(),
        "workers": scenario.workers, "jobs": scenario.jobs, "params": scenario.params,
        "shards": 2, "seconds": seconds,
        "steps": len(latencies), "worker_steps_per_s": len(latencies) / seconds,
        "job_steps_per_s": len(latencies) / seconds / scenario.workers_per_job,
        "p50_ms": 1e3 * percentile(latencies, 50), "p99_ms": 1e3 * percentile(latencies, 99),
        "errors": len(errors), "error_samples": errors[:5],
        "shard_rss_mb_after_warmup": first, "shard_rss_mb_end": last,
        "shard_rss_growth_mb": [b - a for a, b in zip(first, last)],
        "memory_mb": memory,
    }


def write(reports: list[dict], out: pathlib.Path) -> None:
    (out / "load.json").write_text(json.dumps(reports, indent=1))
    lines = [f"# optserve bench load\n\n{reports[0]['date']}, {reports[0]['device']}.\n\n"
             "Sync AdamW jobs of 4 workers each, every job spread over 2 shards; each scenario "
             "with fresh shards (see bench/load.py).\n\n"
             "| scenario | workers | parameters per job | seconds | steps/s (worker) | "
             "steps/s (job) | p50 step | p99 step | errors | shard RSS after warm-up -> end |\n"
             "|---|---|---|---|---|---|---|---|---|---|\n"]
    for r in reports:
        rss = ", ".join(f"{a:.0f} -> {b:.0f} MB"
                        for a, b in zip(r["shard_rss_mb_after_warmup"], r["shard_rss_mb_end"]))
        lines.append(f"| {r['scenario']} | {r['workers']} | {r['params'] / 1e6:.2f}M | "
                     f"{r['seconds']:.0f} | {r['worker_steps_per_s']:.1f} | "
                     f"{r['job_steps_per_s']:.1f} | {r['p50_ms']:.1f} ms | {r['p99_ms']:.1f} ms | "
                     f"{r['errors']} | {rss} |\n")
    (out / "load.md").write_text("".join(lines))
