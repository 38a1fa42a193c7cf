"""Callers that wait, hang or hoard: none of them may stall the shard's other calls.

Each case opens more calls than the shard has worker threads (64 by default): a design with
a thread per waiting call fails all of them. Loopback only; every call is bounded in time.
OPTSERVE_HOSTILE_SCALE=k multiplies the idle streams and the sync workers by k (the soak in
bench/results/soak.md).
"""
from __future__ import annotations

import os
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from optserve.client import RemoteOptimizer
from optserve.proto.v1 import optserve_pb2 as pb
from optserve.proto.v1 import optserve_pb2_grpc as pb_grpc
from optserve.server import ShardConfig, ShardServer
from optserve.server.config import Limits
from support import DEVICE

THREADS = ShardConfig().max_threads
SCALE = int(os.environ.get("OPTSERVE_HOSTILE_SCALE", "1"))


@pytest.fixture
def never():
    """A request stream that sends nothing until the test ends."""
    stop = threading.Event()

    def silent(*first):
        yield from first
        stop.wait(60)
    yield silent
    stop.set()


def legit_job(address: str, job: str, steps: int = 2, **kw) -> RemoteOptimizer:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = RemoteOptimizer(model.parameters(), "adamw", servers=[address], job=job, lr=1e-2,
                          rpc_timeout=10.0, retries=0, **kw)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.ones(2, 8)).sum().backward()
        opt.step()
    return opt


def health_check_seconds(channel) -> float:
    start = time.perf_counter()
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    return time.perf_counter() - start


def test_idle_streams_of_every_kind_stall_no_one(shard, never):
    """More silent streams than threads, of every streaming method anyone may open (Step and
    RegisterJob before their header, Health.Watch, reflection): the health check and
    another job's steps stay fast."""
    calls, channels = [], []
    for i in range(SCALE * (THREADS + 16)):
        if i % 100 == 0:   # each its own connection: HTTP/2 allows 1024 streams on one
            channels.append(grpc.insecure_channel(shard.address,
                                                  options=[("grpc.use_local_subchannel_pool", 1)]))
            stub = pb_grpc.OptimizerStub(channels[-1])
            watch = health_pb2_grpc.HealthStub(channels[-1])
            reflect = reflection_pb2_grpc.ServerReflectionStub(channels[-1])
        calls.append(stub.Step(never(), timeout=60))
        calls.append(stub.RegisterJob.future(never(), timeout=60))
        calls.append(watch.Watch(health_pb2.HealthCheckRequest(), timeout=60))
        calls.append(reflect.ServerReflectionInfo(never(reflection_pb2.ServerReflectionRequest(
            list_services="")), timeout=60))
    channel = grpc.insecure_channel(shard.address)
    try:
        time.sleep(1.0)   # every call has reached the shard
        assert health_check_seconds(channel) < 2.0
        start = time.perf_counter()
        legit_job(shard.address, "beside-idle-streams").close()
        assert time.perf_counter() - start < 5.0
    finally:
        for call in calls:
            call.cancel()
        for c in [channel, *channels]:
            c.close()


def test_a_sync_job_of_more_workers_than_threads_steps(shard):
    """Every worker of a sync round waits at the barrier; none holds a thread doing so. The
    step is the mean of the workers' gradients (rank order), as torch's AdamW takes it."""
    workers = SCALE * (THREADS + 36)
    torch.manual_seed(0)
    start = torch.randn(4, 3)
    grads = [torch.randn(4, 3) for _ in range(workers)]
    params = [torch.nn.Parameter(start.clone()) for _ in range(workers)]
    opts = [RemoteOptimizer([p], "adamw", servers=[shard.address], job="wide", rank=w,
                            world_size=workers, lr=1e-2, rpc_timeout=60.0 * SCALE, retries=0)
            for w, p in enumerate(params)]
    try:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        errors = []

        def step(opt):
            try:
                opt.step()
            except Exception as e:   # reported below
                errors.append(e)
        threads = [threading.Thread(target=step, args=(o,), daemon=True) for o in opts]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60 * SCALE
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in threads), "workers still wait for their step"
        assert not errors, errors[:3]
        oracle = torch.nn.Parameter(start.clone())
        torch_opt = torch.optim.AdamW([oracle], lr=1e-2)
        mean = grads[0].clone()
        for g in grads[1:]:
            mean += g
        oracle.grad = mean / workers
        torch_opt.step()
        for p in params:
            torch.testing.assert_close(p.detach(), oracle.detach(), rtol=1e-6, atol=1e-7)
        assert shard.store.job("wide").version == 1
    finally:
        for o in opts:
            o.close()


def _hung_step(stub, opt, never):
    """Step with the first chunk of a gradient, then nothing: a worker that hung mid-upload."""
    n = sum(int(np.prod(t.shape)) for t in opt.spec.tensors)
    groups = [opt._group_proto(g, i) for i, g in enumerate(opt.param_groups)]
    header = pb.StepHeader(job=opt.job, worker=opt.rank, step=opt._step_no[0] + 1,
                           tensors=range(len(opt.spec.tensors)), groups=groups,
                           dtype=pb.FLOAT32, version=opt._version[0], session=opt._session)
    first = pb.StepRequest(chunk=pb.Chunk(offset=0, data=np.zeros(n // 2, "<f4").tobytes()))
    return stub.Step(never(pb.StepRequest(header=header), first), timeout=60)


def test_a_restarted_worker_preempts_its_hung_upload(shard, never):
    """The same rank, restarted: its step goes through at once; the hung call is aborted."""
    old = legit_job(shard.address, "restarted", steps=1)
    channel = grpc.insecure_channel(shard.address)
    hung = _hung_step(pb_grpc.OptimizerStub(channel), old, never)
    try:
        time.sleep(0.5)
        start = time.perf_counter()
        new = legit_job(shard.address, "restarted", steps=1, resume=True)   # a new session
        assert time.perf_counter() - start < 5.0
        assert shard.store.job("restarted").version == 2
        with pytest.raises(grpc.RpcError) as e:
            list(hung)
        assert e.value.code() == grpc.StatusCode.ABORTED, e.value.details()
        assert "held by a newer client" in e.value.details()
        new.close()
    finally:
        hung.cancel()
        old.close()
        channel.close()


def test_a_hung_upload_ends_after_the_idle_timeout_and_frees_its_worker(never):
    with ShardServer(ShardConfig(port=0, device=DEVICE, idle_timeout=1.0)).start() as server:
        opt = legit_job(server.address, "idle", steps=1)
        channel = grpc.insecure_channel(server.address)
        start = time.perf_counter()
        with pytest.raises(grpc.RpcError) as e:
            list(_hung_step(pb_grpc.OptimizerStub(channel), opt, never))
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.value.details()
        assert "no message from the client" in e.value.details()
        assert time.perf_counter() - start < 5.0
        assert server.store.job("idle").version == 1     # nothing of it was applied
        opt.zero_grad()
        for p in opt._params:
            p.grad = torch.ones_like(p)
        opt.step()                                        # the worker steps on
        assert server.store.job("idle").version == 2
        channel.close()
        opt.close()


def test_stalled_state_readers_are_bounded_by_the_inflight_budget():
    """Readers that take nothing hold their payload; past --max-inflight-bytes the next is
    refused before it allocates, and the budget frees when a reader goes."""
    limits = Limits(max_inflight_bytes=24 << 20, inflight_wait=0.5)
    with ShardServer(ShardConfig(port=0, device=DEVICE, limits=limits)).start() as server:
        model = torch.nn.Linear(1024, 1024)                  # ~4 MB of parameters, 8 MB of state
        opt = RemoteOptimizer(model.parameters(), "adamw", servers=[server.address], job="big")
        opt.zero_grad()
        model(torch.ones(1, 1024)).sum().backward()
        opt.step()
        channel = grpc.insecure_channel(server.address)
        stub = pb_grpc.OptimizerStub(channel)
        readers = []
        try:
            refused = None
            for _ in range(8):
                call = stub.GetOptimizerState(pb.GetOptimizerStateRequest(job="big"), timeout=30)
                readers.append(call)
                try:
                    next(call)               # the header: the call holds its payload from here
                except grpc.RpcError as e:
                    refused = e
                    break
            assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert server.store.job("big").version == 1
            held = server.metrics.inflight._value.get()
            assert 0 < held <= limits.max_inflight_bytes
            for call in readers:
                call.cancel()
            deadline = time.monotonic() + 5
            while server.metrics.inflight._value.get() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server.metrics.inflight._value.get() == 0
            opt.state_dict()                 # reads again once the stalled readers are gone
        finally:
            channel.close()
            opt.close()


def test_workers_of_a_large_job_register_at_once_within_the_inflight_budget():
    """Each worker's registration uploads the parameters: four at once need more than the
    budget, and wait for room instead of failing (torchrun starts them together)."""
    limits = Limits(max_inflight_bytes=10 << 20)             # room for two 4 MB uploads
    with ShardServer(ShardConfig(port=0, device=DEVICE, limits=limits)).start() as server:
        errors, opts = [], []

        def register(rank: int) -> None:
            try:
                opts.append(RemoteOptimizer(torch.nn.Linear(1024, 1024).parameters(), "adamw",
                                            servers=[server.address], job="wide", rank=rank,
                                            world_size=4))
            except Exception as e:   # noqa: BLE001 - reported below
                errors.append(e)
        threads = [threading.Thread(target=register, args=(r,)) for r in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert len(opts) == 4
        for opt in opts:
            opt.close()
