"""`optserve demo`: shards and W worker processes on this machine train a small conv net.

The task is generated, so nothing is downloaded, and has a known answer: 12x12 images of
four shapes (square outline, plus, cross, disk) at random places and sizes under noise; a
correct classifier reaches ~100 % accuracy. Workers split the data by rank; in sync mode
(the default) the shards average their gradients each step, in async mode they apply each
as it comes. Each optimizer trains the same model from the same seed, one after another,
and the summary compares them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import queue
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Iterator

from optserve import local

CLASSES = ("square", "plus", "cross", "disk")
SIZE = 12
STEPS = 150   # per optimizer, without --steps

# Per optimizer: hyperparameters of a reasonable run on this task.
RECIPES = {
    "adamw": dict(lr=3e-3, weight_decay=0.05),
    "adam": dict(lr=3e-3, weight_decay=1e-4),
    "adamp": dict(lr=3e-3, weight_decay=0.05),
    "adafactor": dict(lr=3e-3, relative_step=False, scale_parameter=False, weight_decay=0.0),
    # torch.optim.Adafactor's own rule: its update is relative to the weights' RMS, hence the lr
    "torch_adafactor": dict(lr=1e-2, weight_decay=0.0),
    # Lion: a smaller lr and a larger decay than AdamW's, as Chen et al. (2023) advise
    "lion": dict(lr=1e-3, weight_decay=0.15),
}


def make_shapes(n: int, seed: int):
    """n noisy 1x12x12 images of the four shapes, and their labels."""
    import torch
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    labels = torch.randint(0, len(CLASSES), (n,), generator=g)
    r = torch.randint(2, 5, (n,), generator=g)
    cy = torch.randint(4, SIZE - 4, (n,), generator=g)
    cx = torch.randint(4, SIZE - 4, (n,), generator=g)
    images = torch.empty(n, 1, SIZE, SIZE)
    for i in range(n):
        dy, dx = (ys - cy[i]).abs(), (xs - cx[i]).abs()
        inside = (dy <= r[i]) & (dx <= r[i])
        shape = [
            inside & ((dy == r[i]) | (dx == r[i])),              # square outline
            inside & ((dy == 0) | (dx == 0)),                    # plus
            inside & (dy == dx),                                 # cross
            (dy**2 + dx**2) <= r[i] ** 2,                        # disk
        ][int(labels[i])]
        images[i, 0] = shape.float()
    images += 0.3 * torch.randn(images.shape, generator=g)
    return images, labels


def make_model():
    """Convs without bias before BatchNorm (their bias would only see rounding noise)."""
    import torch
    from torch import nn
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 3 * 3, 64), nn.ReLU(), nn.Linear(64, len(CLASSES)))


def param_groups(model, weight_decay: float):
    decay = [(n, p) for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [(n, p) for n, p in model.named_parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class WorkerArgs:
    rank: int
    world_size: int
    servers: list[str]
    optimizer: str
    steps: int
    batch: int
    job: str
    mode: str
    token: str | None = None
    resume: bool = False


def worker(args: WorkerArgs, progress) -> None:
    """One training process: its 1/W of the data, a RemoteOptimizer, a cosine schedule."""
    import logging
    import torch
    from optserve.client import RemoteOptimizer
    torch.set_num_threads(1)
    if args.rank != 0:  # one worker's warnings (such as placement balance) are enough
        logging.getLogger("optserve.client").setLevel(logging.ERROR)
    images, labels = make_shapes(2048, seed=1)
    mine = slice(args.rank, None, args.world_size)
    images, labels = images[mine], labels[mine]
    model = make_model()
    hyper = dict(RECIPES[args.optimizer])
    opt = RemoteOptimizer(param_groups(model, hyper.pop("weight_decay")), args.optimizer,
                          servers=args.servers, job=args.job, rank=args.rank,
                          world_size=args.world_size, mode=args.mode, token=args.token,
                          resume=args.resume, **hyper)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    g = torch.Generator().manual_seed(100 + args.rank)
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(labels), (args.batch,), generator=g)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(images[idx]), labels[idx])
        loss.backward()
        opt.step()
        sched.step()
        if args.rank == 0:
            progress.put(("step", step, loss.item()))
    if args.rank == 0:
        test_x, test_y = make_shapes(512, seed=2)
        model.eval()
        with torch.no_grad():
            logits = model(test_x)
            test_loss = torch.nn.functional.cross_entropy(logits, test_y).item()
            accuracy = (logits.argmax(1) == test_y).float().mean().item()
        state = opt.state_dict()["state"]
        state_bytes = sum(v.numel() * v.element_size() for s in state.values()
                          for v in s.values() if isinstance(v, torch.Tensor) and v.ndim > 0)
        progress.put(("done", test_loss, accuracy, state_bytes))
    opt.close()


# Seconds children get to exit after SIGTERM before SIGKILL. Workers die at once (SIGTERM's
# default action). A shard takes 0.2-0.8 s to exit (its metrics server polls every 0.5 s),
# more on a busy machine; after a Ctrl-C it holds nothing worth draining, so a Ctrl-C stops
# the demo within two seconds.
WORKER_STOP_TIMEOUT = 1.0
SHARD_STOP_TIMEOUT = 10.0
SHARD_STOP_TIMEOUT_INTERRUPTED = 0.5


@contextlib.contextmanager
def local_shards(count: int, device: str, metrics_port: int | None = None,
                 prefix: str = "optserve-demo-") -> Iterator[list[local.LocalServer]]:
    """`count` shard processes (shard k serves metrics on metrics_port + k; None: free
    ports), with SIGINT blocked (local.sigint_blocked) and their logs in a temporary folder;
    stopped and the folder removed on the way out. When the body fails, the end of each
    shard's log goes to stderr first; when it is interrupted, the shards get less time."""
    with tempfile.TemporaryDirectory(prefix=prefix) as log_dir:
        logs = [os.path.join(log_dir, f"shard-{k}.log") for k in range(count)]
        procs, shards, timeout = [], [], SHARD_STOP_TIMEOUT
        try:
            with local.sigint_blocked():
                for k, log in enumerate(logs):
                    port = 0 if metrics_port is None else metrics_port + k
                    procs.append(local.launch(local.shard_command(
                        "--device", device, "--metrics-port", str(port)), log))
            try:
                shards = [local.listening(proc, log) for proc, log in zip(procs, logs)]
            except RuntimeError as e:   # it quotes the shard's log
                raise SystemExit(f"optserve demo: a shard did not start: {e}") from None
            yield shards
        except (KeyboardInterrupt, local.Terminated):
            timeout = SHARD_STOP_TIMEOUT_INTERRUPTED
            raise
        except (Exception, SystemExit):
            if shards:   # a failed run: what the shards said
                for k, log in enumerate(logs):
                    with open(log) as f:
                        tail = f.readlines()[-20:]
                    print(f"--- shard {k} log (last lines) ---\n{''.join(tail)}", end="",
                          file=sys.stderr)
            raise
        finally:
            local.stop_all(procs, timeout)


def show_progress(done: int, total: int, text: str, width: int = 30) -> None:
    """A bar redrawn in place on a terminal; a line per quarter when output is a file."""
    filled = width * done // total
    line = f"  [{'#' * filled}{'.' * (width - filled)}] {done:>4}/{total} {text}"
    if sys.stdout.isatty():
        print("\r" + line, end="", flush=True)
    elif done * 4 % total < 4:
        print(line, flush=True)


def train_one(optimizer: str, servers: list[str], ranks: list[int],
              args: argparse.Namespace) -> dict | None:
    """Trains with one optimizer in worker processes `ranks`; the summary comes from rank 0."""
    ctx = mp.get_context("spawn")
    progress = ctx.Queue()
    job = f"{args.job or f'demo-{os.getpid()}'}-{optimizer}"
    token = None
    if args.tokens_file:
        with open(args.tokens_file) as f:
            token = json.load(f).get(job)
    procs = [ctx.Process(target=worker, args=(WorkerArgs(r, args.workers, servers, optimizer,
                                                         args.steps, 64, job, args.mode, token,
                                                         args.resume),
                                              progress))
             for r in ranks]
    start = time.perf_counter()
    try:
        # Workers start with SIGINT blocked: on Ctrl-C this process stops them (finally).
        with local.sigint_blocked():
            for p in procs:
                p.start()
        print(f"{optimizer}:", flush=True)
        result = None
        while result is None:
            try:
                msg = progress.get(timeout=1.0)
            except queue.Empty:  # check the workers are still alive
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise SystemExit(f"a {optimizer} worker failed") from None
                if 0 not in ranks and all(p.exitcode == 0 for p in procs):
                    break  # this process runs no rank 0: nothing to summarise
                continue
            if msg[0] == "step":
                show_progress(msg[1], args.steps, f"loss {msg[2]:.4f}")
            else:
                result = dict(optimizer=optimizer, test_loss=msg[1], accuracy=msg[2],
                              state_bytes=msg[3], seconds=time.perf_counter() - start)
        for p in procs:
            p.join()
    finally:
        if sys.stdout.isatty():
            print()
        local.stop_all(procs, WORKER_STOP_TIMEOUT)   # those still running: after a failure
    return result


def run_demo(args: argparse.Namespace) -> int:
    if args.steps is None:
        args = argparse.Namespace(**{**vars(args), "steps": STEPS})
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    unknown = set(optimizers) - set(RECIPES)
    if unknown:
        raise SystemExit(f"unknown optimizers {sorted(unknown)}; choose from {sorted(RECIPES)}")
    if args.rank is not None and not args.servers:
        raise SystemExit("--rank runs one worker of a cluster and needs --servers")
    ranks = [args.rank] if args.rank is not None else list(range(args.workers))
    with local.stopped_by_signals(), contextlib.ExitStack() as stack:
        shards = []
        if args.servers:
            servers = args.servers.split(",")
        else:
            shards = stack.enter_context(local_shards(args.shards, args.device, args.metrics_port))
            servers = [shard.address for shard in shards]
        print(f"optserve demo: shards {', '.join(servers)}, {args.workers} workers in {args.mode} "
              f"mode, {args.steps} steps each, classifying {len(CLASSES)} generated shapes",
              flush=True)
        if shards:
            print("metrics (Prometheus text, while the demo runs): " + ", ".join(
                shard.metrics_url for shard in shards), flush=True)
        results = [train_one(o, servers, ranks, args) for o in optimizers]
    results = [r for r in results if r is not None]
    if not results:
        return 0
    print("\nsummary (held-out set of 512 images)")
    print(f"  {'optimizer':<10} {'test loss':>9} {'accuracy':>9} {'state bytes':>12} {'time':>7}")
    for r in results:
        print(f"  {r['optimizer']:<10} {r['test_loss']:>9.4f} {100 * r['accuracy']:>8.1f}% "
              f"{r['state_bytes']:>12,} {r['seconds']:>6.1f}s")
    return 0
