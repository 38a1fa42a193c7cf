"""Worker processes for the cluster tests (spawned, so they must be importable)."""
from __future__ import annotations

import time

import torch

from models import make_data, make_model, param_groups
from optserve.client import RemoteOptimizer

HYPER = {
    "adamw": dict(lr=1e-2, weight_decay=0.1),
    "adamp": dict(lr=1e-2, weight_decay=0.1, nesterov=True),
    "adafactor": dict(lr=1e-2, relative_step=False, weight_decay=0.01, beta1=0.9),
}


def data_half(rank: int):
    x, y = make_data(n=64)
    return x[rank::2], y[rank::2]


def sync_worker(rank, servers, job, optimizer, steps, out):
    """Trains on its half of the data in sync mode; puts its final parameters in `out`."""
    torch.set_num_threads(1)
    model = make_model()
    opt = RemoteOptimizer(param_groups(model, 0.1), optimizer, servers=servers, job=job,
                          rank=rank, world_size=2, **HYPER[optimizer])
    x, y = data_half(rank)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    out.put((rank, [p.detach().numpy().copy() for p in model.parameters()], opt.dropped_steps))
    opt.close()


def steady_worker(rank, servers, job, world_size, steps, delay, out, kwargs, start):
    """Steps `steps` times, sleeping `delay` seconds before each step, once every worker has
    registered (`start`, a barrier)."""
    torch.set_num_threads(1)
    model = make_model()
    opt = RemoteOptimizer(model.parameters(), "adamw", servers=servers, job=job, rank=rank,
                          world_size=world_size, **kwargs)
    start.wait()
    x, y = make_data(seed=rank)
    for _ in range(steps):
        time.sleep(delay)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    out.put((rank, opt.dropped_steps))
    opt.close()


def async_regression_worker(rank, servers, job, steps, out):
    """Fits y = x·w* asynchronously with a second worker; reports its final loss."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    w_true = torch.randn(16, 1, generator=g)
    model = torch.nn.Linear(16, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    opt = RemoteOptimizer(model.parameters(), "adamw", servers=servers, job=job, rank=rank,
                          world_size=2, mode="async", lr=0.05, weight_decay=0.0)
    gen = torch.Generator().manual_seed(10 + rank)
    for _ in range(steps):
        x = torch.randn(32, 16, generator=gen)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), x @ w_true).backward()
        opt.step()
    opt.pull_parameters()
    x = torch.randn(256, 16, generator=gen)
    out.put((rank, torch.nn.functional.mse_loss(model(x), x @ w_true).item()))
    opt.close()


def joins_then_hangs(servers, job, on_timeout, ready):
    """Registers as rank 1, takes no step, says it is ready, then waits to be killed."""
    model = make_model()
    RemoteOptimizer(model.parameters(), "adamw", servers=servers, job=job, rank=1, world_size=2,
                    timeout=2.0, on_timeout=on_timeout)
    ready.set()
    time.sleep(600)


def replaying_worker(rank, servers, job, steps, delay, out):
    """Sync worker whose batches are a function of the step index, so that after a
    RolledBack it can replay exactly; reports its final parameters and rollbacks."""
    from optserve.client import RolledBack
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    opt = RemoteOptimizer(model.parameters(), "adamw", servers=servers, job=job, rank=rank,
                          world_size=2, lr=1e-2, rpc_timeout=20.0, retries=40)
    rollbacks, step = [], 0
    while step < steps:
        g = torch.Generator().manual_seed(1000 * step + rank)
        x, y = torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        time.sleep(delay)  # a training step's worth of time, so that kills land mid-run
        try:
            opt.step()
            step += 1
        except RolledBack as e:
            rollbacks.append((step, e.step))
            step = e.step
    out.put((rank, [p.detach().numpy().copy() for p in model.parameters()], rollbacks))
    opt.close()
