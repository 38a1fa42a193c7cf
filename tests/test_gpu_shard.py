"""A `--device cuda` shard around its device state: it compiles its kernels before it opens
its port, admits jobs against the device's memory, exports that memory and its PCIe
traffic, names a driver that is too old, and stops (exit status 70) on a device fault, so
that its supervisor restarts it from its checkpoints.

On the CuPy test double (tests/fake_cupy) without a GPU; the fault-injection tests only
there (a real GPU is not made to fault on purpose).
"""
from __future__ import annotations

import asyncio

import subprocess
import sys
import urllib.request

import pytest
import torch
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families

from models import make_model, train
from optserve import local
from optserve.client import RemoteOptimizer, ResourceExhausted
from optserve.kernels import cuda, get_backend, why_no_gpu
from optserve.server import Limits, ShardConfig, ShardServer
from support import CUPY_DOUBLE

pytestmark = pytest.mark.usefixtures("cupy_double")


def scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_kernels_compile_before_the_port_opens_and_memory_is_capped():
    cuda.use_runtime(None)
    server = ShardServer(ShardConfig(port=0, device="cuda",
                                     limits=Limits(max_device_bytes=64 << 20)))
    try:
        assert cuda._runtime is not None          # compiled in the constructor
        assert cuda.runtime().report()["device_limit"] == 64 << 20
        assert server.config.limits.max_device_bytes == 64 << 20
    finally:
        server.stop(grace=0)


def test_a_job_over_the_device_memory_limit_is_refused():
    """A 4M-parameter AdamW job with 4 workers needs ~100 MB of device memory (state,
    gradient buffers, mean, scratch); a 50 MB shard refuses it, a 200 MB one takes it."""
    big = torch.nn.Linear(2048, 2048)
    for limit, fits in ((50 << 20, False), (200 << 20, True)):
        server = ShardServer(ShardConfig(port=0, device="cuda",
                                         limits=Limits(max_device_bytes=limit))).start()
        try:
            if fits:
                RemoteOptimizer(big.parameters(), "adamw", servers=[server.address], job="big",
                                world_size=4).close()
            else:
                with pytest.raises(ResourceExhausted, match="bytes of device memory"):
                    RemoteOptimizer(big.parameters(), "adamw", servers=[server.address],
                                    job="big", world_size=4)
        finally:
            server.stop(grace=0)


def test_device_memory_and_pcie_traffic_are_metrics():
    server = ShardServer(ShardConfig(port=0, device="cuda")).start()
    port = server.serve_metrics(0)
    try:
        model = make_model()
        opt = RemoteOptimizer(model.parameters(), "adamw", servers=[server.address], job="m",
                              grad_dtype="bfloat16", param_dtype="bfloat16")
        n = sum(p.numel() for p in model.parameters())
        train(model, opt, 1)
        before = scrape(port)
        train(model, opt, 1)
        after = scrape(port)
        moved = {d: after[("optserve_device_copy_bytes_total", (("direction", d),))]
                 - before[("optserve_device_copy_bytes_total", (("direction", d),))]
                 for d in ("h2d", "d2h")}
        assert 2 * n <= moved["h2d"] < 2 * n + 8192 and 2 * n <= moved["d2h"] < 2 * n + 8192
        assert after[("optserve_device_memory_bytes", (("kind", "device"),))] > 4 * 4 * n
        assert after[("optserve_device_memory_bytes", (("kind", "pinned"),))] > 0
        opt.delete_job()          # DeleteJob gives the job's device memory back
        gone = scrape(port)[("optserve_device_memory_bytes", (("kind", "device"),))]
        assert gone <= after[("optserve_device_memory_bytes", (("kind", "device"),))] - 4 * 4 * n
    finally:
        server.stop(grace=0)


def test_a_driver_too_old_is_named(monkeypatch):
    import cupy

    def old_driver():
        raise cupy.cuda.runtime.CUDARuntimeError(35, "CUDA driver version is insufficient")

    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", old_driver)
    monkeypatch.setattr(cupy.cuda.runtime, "driverGetVersion", lambda: 12020)
    assert "driver is too old: it supports CUDA 12.2" in why_no_gpu()
    with pytest.raises(ValueError, match="driver is too old"):
        get_backend("cuda")
    assert get_backend("auto").name == "cpu"


@pytest.mark.skipif(not CUPY_DOUBLE, reason="faults are injected through the CuPy test double")
def test_a_device_fault_stops_the_shard(monkeypatch):
    """A CUDA error in a step (injected) leaves the device state untrustworthy: the shard
    reports NOT_SERVING, stops without checkpointing, and answers nothing more."""
    import cupy
    server = ShardServer(ShardConfig(port=0, device="cuda")).start()
    model = make_model()
    opt = RemoteOptimizer(model.parameters(), "adamw", servers=[server.address], job="f",
                          retries=0)
    train(model, opt, 1)

    def faults(*args, **kwargs):
        raise cupy.cuda.runtime.CUDARuntimeError(700, "an illegal memory access")

    monkeypatch.setattr(cuda, "step", faults)
    with pytest.raises(Exception):
        train(model, opt, 1)
    server.wait()
    assert isinstance(server.fault, cupy.cuda.runtime.CUDARuntimeError)
    reply = asyncio.run(server.health.Check(health_pb2.HealthCheckRequest(service=""), None))
    assert reply.status != health_pb2.HealthCheckResponse.SERVING


@pytest.mark.skipif(not CUPY_DOUBLE, reason="faults are injected through the CuPy test double")
def test_optserve_server_exits_70_on_a_device_fault(tmp_path, monkeypatch):
    """The 20th kernel fails with a sticky illegal address: the process logs the fault and
    exits 70, which a supervisor (Kubernetes, compose's restart policy) restarts."""
    monkeypatch.setenv("FAKE_CUPY_FAULT_AT", "20")
    log = tmp_path / "shard.log"
    shard = local.start(local.shard_command("--device", "cuda"), log)
    model = make_model()
    opt = RemoteOptimizer(model.parameters(), "adamw", servers=[shard.address], job="exit",
                          retries=0, rpc_timeout=30)
    with pytest.raises(Exception):
        train(model, opt, 20)
    assert shard.proc.wait(timeout=60) == 70
    assert "device fault" in log.read_text()


def test_the_cli_takes_a_gpu_and_a_device_memory_cap():
    help_text = subprocess.run([sys.executable, "-m", "optserve", "server", "--help"],
                               capture_output=True, text=True, check=True).stdout
    assert "--gpu" in help_text and "--max-device-bytes" in help_text


def test_a_step_that_fails_after_its_reply_was_queued_lets_no_copy_outlive_it(monkeypatch):
    """The metrics of a step fail after its reply's copies were queued: the reply buffer is
    let go (and may be reused) only once they have run."""
    from support import steps_in_parts
    steps_in_parts(monkeypatch)
    server = ShardServer(ShardConfig(port=0, device="cuda")).start()
    try:
        model = make_model()
        opt = RemoteOptimizer(model.parameters(), "adamw", servers=[server.address], job="late",
                              retries=0)
        train(model, opt, 1)
        stepped = server.store.observer.stepped
        calls = []

        def fail_once(*args):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("a metrics failure")
            return stepped(*args)
        monkeypatch.setattr(server.store.observer, "stepped", fail_once)
        with pytest.raises(Exception):
            train(model, opt, 1)
        job = server.store.job("late")
        job.stepper._thread.submit(lambda: None).result()   # the failed step's run has returned
        assert job.state.replied.done, "a copy into the failed step's reply is still pending"
        train(model, opt, 1)
    finally:
        server.stop(grace=0)
