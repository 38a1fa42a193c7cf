"""Parameter-server semantics with real worker processes on loopback: sync averaging over
two shards, async training, backup workers, staleness, barrier timeouts with a killed
worker, and retried steps."""
from __future__ import annotations

import multiprocessing as mp
import threading

import pytest
import torch

import workers
from models import make_data, make_model, param_groups
from optserve.client import DeadlineExceeded, RemoteOptimizer

import adamp
import transformers.optimization as hf

CTX = mp.get_context("spawn")
ORACLES = {
    "adamw": lambda groups: torch.optim.AdamW(groups, **workers.HYPER["adamw"]),
    "adamp": lambda groups: adamp.AdamP(groups, **workers.HYPER["adamp"]),
    "adafactor": lambda groups: hf.Adafactor(groups, **workers.HYPER["adafactor"]),
}


def run(target, *args):
    p = CTX.Process(target=target, args=args)
    p.start()
    return p


def collect(queue, n, timeout=120):
    return sorted(queue.get(timeout=timeout) for _ in range(n))


@pytest.mark.usefixtures("step_path")
@pytest.mark.parametrize("optimizer", sorted(ORACLES))
def test_sync_two_workers_match_local_averaged_gradient(shards, optimizer):
    """2 workers on different halves, 2 shards, 30 steps == a local optimizer fed the mean."""
    steps, out = 30, CTX.Queue()
    servers = [s.address for s in shards]
    procs = [run(workers.sync_worker, r, servers, f"sync-{optimizer}", optimizer, steps, out)
             for r in range(2)]
    results = collect(out, 2)
    for p in procs:
        p.join(30)
    model = make_model()
    opt = ORACLES[optimizer](param_groups(model, 0.1))
    halves = [workers.data_half(r) for r in range(2)]
    for _ in range(steps):
        grads = []
        for x, y in halves:
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for p, g0, g1 in zip(model.parameters(), *grads):
            p.grad = (g0 + g1) / 2
        opt.step()
    for rank, params, dropped in results:
        assert dropped == 0
        for ours, theirs in zip(params, model.parameters()):
            torch.testing.assert_close(torch.from_numpy(ours), theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("step_path")
def test_async_workers_train_to_target(shard):
    out = CTX.Queue()
    procs = [run(workers.async_regression_worker, r, [shard.address], "async", 150, out)
             for r in range(2)]
    losses = collect(out, 2)
    for p in procs:
        p.join(30)
    job = shard.store.job("async")
    assert job.version == 300  # every gradient applied, one at a time
    assert all(loss < 1e-2 for _, loss in losses), losses


@pytest.mark.usefixtures("step_path")
def test_backup_worker_lets_steps_proceed_and_drops_late_gradients(shard):
    """3 workers, 1 backup: the slow worker never holds the others up; its late gradients
    are dropped and counted, and it catches up with the job's parameters."""
    out, start = CTX.Queue(), CTX.Barrier(3)
    kwargs = dict(backup_workers=1, lr=1e-3)
    procs = [run(workers.steady_worker, r, [shard.address], "backup", 3, 10, delay, out, kwargs,
                 start) for r, delay in enumerate([0.0, 0.0, 0.3])]
    results = dict(collect(out, 3))
    for p in procs:
        p.join(30)
    job = shard.store.job("backup")
    late = shard.metrics.skipped.labels("backup", "late")._value.get()
    assert results[2] > 0 and late == sum(results.values())
    assert job.version >= 10


@pytest.mark.usefixtures("step_path")
def test_staleness_bound_drops_stale_gradients_and_scales_lr(shard):
    """async, max_staleness=2, staleness_lr: a gradient 2 versions behind is applied at lr/2,
    one 3 behind is dropped; the applied steps equal torch's AdamW fed the same sequence."""
    a_model, b_model, ref_model = make_model(), make_model(), make_model()
    kw = dict(servers=[shard.address], job="stale", world_size=2, mode="async", max_staleness=2,
              staleness_lr=True, lr=1e-2, weight_decay=0.0)
    a = RemoteOptimizer(a_model.parameters(), "adamw", rank=0, **kw)
    b = RemoteOptimizer(b_model.parameters(), "adamw", rank=1, **kw)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.0)

    def grad(model, seed):
        model.zero_grad()
        xs, ys = make_data(seed)
        torch.nn.functional.cross_entropy(model(xs), ys).backward()
        return [p.grad.clone() for p in model.parameters()]

    def ref_step(grads, lr):
        for p, g in zip(ref_model.parameters(), grads):
            p.grad = g
        ref.param_groups[0]["lr"] = lr
        ref.step()

    gb = grad(b_model, 1)                       # b holds version 0
    for seed in (2, 3):
        ref_step(grad(a_model, seed), 1e-2)
        a.step()                                # versions 1, 2 (a is never behind)
    b.step()                                    # 2 behind: applied at lr/2 -> version 3
    ref_step(gb, 1e-2 / 2)
    assert b.dropped_steps == 0 and b._version[0] == 3
    assert shard.metrics.registry.get_sample_value(   # the lr as applied
        "optserve_learning_rate", {"training_job": "stale", "group": "0"}) == 1e-2 / 2
    gb = grad(b_model, 4)                       # b holds version 3
    for seed in (5, 6, 7):
        ref_step(grad(a_model, seed), 1e-2)     # a is 1 behind once: lr/1
        a.step()                                # versions 4, 5, 6
    b.step()                                    # 3 behind: dropped
    assert b.dropped_steps == 1 and b._version[0] == 6
    assert shard.metrics.skipped.labels("stale", "stale")._value.get() == 1
    a.pull_parameters()
    for p, q in zip(a_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    a.close()
    b.close()


@pytest.mark.parametrize("on_timeout", ["fail", "proceed"])
def test_killed_worker_does_not_hang_a_sync_step(shard, on_timeout):
    """Rank 1 registers and is killed. Rank 0's step waits the barrier timeout, then either
    fails with DEADLINE_EXCEEDED, applying nothing, or steps with the workers present."""
    ready = CTX.Event()
    proc = run(workers.joins_then_hangs, [shard.address], f"kill-{on_timeout}", on_timeout, ready)
    assert ready.wait(60)
    proc.kill()
    proc.join(10)
    x, y = make_data()
    model, ref_model = make_model(), make_model()
    opt = RemoteOptimizer(model.parameters(), "adamw", servers=[shard.address],
                          job=f"kill-{on_timeout}", rank=0, world_size=2, timeout=2.0,
                          on_timeout=on_timeout, retries=1)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    job = shard.store.job(f"kill-{on_timeout}")
    if on_timeout == "fail":
        with pytest.raises(DeadlineExceeded, match="waiting for workers \\[1\\]; nothing was applied"):
            opt.step()
        assert job.version == 0
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    else:
        opt.step()
        ref = torch.optim.AdamW(ref_model.parameters())
        torch.nn.functional.cross_entropy(ref_model(x), y).backward()
        ref.step()
        assert job.version == 1 and job.barrier.members == {0}
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    opt.close()


@pytest.mark.usefixtures("step_path")
def test_concurrent_duplicates_of_one_step_apply_once(shard):
    """The same (job, worker, step) sent on two connections at once: one state update, the
    same answer for both (each written into its own copy of the model)."""
    x, y = make_data()
    models, ref_model = [make_model(), make_model()], make_model()
    opts = [RemoteOptimizer(m.parameters(), "adamw", servers=[shard.address], job="dup")
            for m in models]
    opts[0]._session = opts[1]._session   # one client's retry, on a second connection
    for m in models:
        torch.nn.functional.cross_entropy(m(x), y).backward()
    results = []
    threads = [threading.Thread(target=lambda o=o: results.append(o._step_shard(
        0, [o._group_proto(g, i) for i, g in enumerate(o.param_groups)],
        [True] * len(o._params), False))) for o in opts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert shard.store.job("dup").version == 1
    first, second = results
    assert first == second
    assert all(torch.equal(p, q) for p, q in zip(*(m.parameters() for m in models)))
    ref = torch.optim.AdamW(ref_model.parameters())
    torch.nn.functional.cross_entropy(ref_model(x), y).backward()
    ref.step()
    for p, q in zip(models[0].parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("step_path")
def test_sync_mean_is_over_the_workers_that_sent_each_tensor(shard):
    """Sync, 2 workers, where worker 1 sends no gradient for one tensor at one step: that
    tensor steps with worker 0's gradient alone, the others with the mean of both, against
    torch's AdamW fed exactly that."""
    models, ref_model = [make_model(), make_model()], make_model()
    opts = [RemoteOptimizer(m.parameters(), "adamw", servers=[shard.address], job="subsets",
                            rank=r, world_size=2, lr=1e-2) for r, m in enumerate(models)]
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    torch.manual_seed(3)
    for step in range(4):
        grads = [[torch.randn(p.shape) for p in ref_model.parameters()] for _ in range(2)]
        missing = 1 if step == 2 else None       # worker 1 has no gradient for tensor 1
        for r, m in enumerate(models):
            for k, p in enumerate(m.parameters()):
                p.grad = None if (r, k) == (1, missing) else grads[r][k].clone()
        for k, q in enumerate(ref_model.parameters()):
            q.grad = grads[0][k].clone() if k == missing else (grads[0][k] + grads[1][k]) / 2
        threads = [threading.Thread(target=o.step) for o in opts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ref.step()
    for m in models:
        for p, q in zip(m.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for o in opts:
        o.close()


@pytest.mark.parametrize("grad_dtype,torch_dtype", [("bfloat16", torch.bfloat16),
                                                    ("float16", torch.float16)])
@pytest.mark.usefixtures("step_path")
def test_low_precision_gradients_on_the_wire(shard, grad_dtype, torch_dtype):
    """Gradients sent as bf16/fp16 are the float32 master's input rounded to that dtype:
    the oracle is AdamW fed the same rounded gradients. Both sides get the oracle model's
    gradients, so that a last-bit difference in the parameters cannot flip a rounding."""
    model, ref_model = make_model(), make_model()
    opt = RemoteOptimizer(model.parameters(), "adamw", servers=[shard.address],
                          job=f"wire-{grad_dtype}", grad_dtype=grad_dtype, lr=1e-2)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    for seed in range(10):
        x, y = make_data(seed)
        ref.zero_grad()
        torch.nn.functional.cross_entropy(ref_model(x), y).backward()
        for p, q in zip(model.parameters(), ref_model.parameters()):
            p.grad = q.grad.clone()
            q.grad = q.grad.to(torch_dtype).float()
        opt.step()
        ref.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    opt.close()


@pytest.mark.usefixtures("step_path")
def test_bfloat16_parameters_on_the_wire(shard):
    """param_dtype="bfloat16": the worker gets the float32 master rounded to nearest-even
    bf16; the master itself stays float32 on the shard."""
    model, ref_model = make_model(), make_model()
    opt = RemoteOptimizer(model.parameters(), "adamw", servers=[shard.address], job="wire-out",
                          param_dtype="bfloat16", lr=1e-2)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    x, y = make_data()
    for m, o in ((model, opt), (ref_model, ref)):
        torch.nn.functional.cross_entropy(m(x), y).backward()
        o.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q.to(torch.bfloat16).float(), rtol=0, atol=0)
    master = torch.from_numpy(shard.store.job("wire-out").state.host().param.copy())
    flat = torch.cat([q.detach().reshape(-1) for q in ref_model.parameters()])
    torch.testing.assert_close(master, flat, rtol=1e-5, atol=1e-6)
    opt.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("policy", ["skip", "refuse"])
def test_a_nonfinite_gradient_on_one_shard_is_applied_by_none(shards, policy, mode):
    """An inf in a tensor held by one shard: every shard skips (or refuses) the step, so the
    shards stay at one version and the parameters stay as torch would leave them: unchanged."""
    from optserve.client import InvalidArgument
    model = make_model()
    opt = RemoteOptimizer(model.parameters(), "adamw", servers=[s.address for s in shards],
                          job="inf", mode=mode, nonfinite=policy)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = make_data()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    holder = [s.store.job("inf") for s in shards]
    bad = next(t for t in holder[1].tensors)            # a tensor shard 1 holds, shard 0 not
    list(model.parameters())[bad].grad.view(-1)[0] = float("inf")
    if policy == "skip":
        opt.step()
        assert opt.dropped_steps == 1
    else:
        with pytest.raises(InvalidArgument):
            opt.step()
    opt.pull_parameters()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
    assert len({job.version for job in holder}) == 1
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()                                          # a finite step then goes through
    assert not all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    opt.close()
