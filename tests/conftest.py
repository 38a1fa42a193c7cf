"""Shared fixtures: real shards on loopback, the two paths a step takes through a shard,
and the runtimes of the CUDA backend."""
from __future__ import annotations

import os

import pytest

from optserve.server import ShardConfig, ShardServer
from support import DEVICE, skip_or_fail, steps_in_parts


@pytest.fixture
def shard():
    """A fresh shard on a free loopback port, stopped after the test."""
    server = ShardServer(ShardConfig(port=0, device=DEVICE, barrier_timeout=30.0)).start()
    yield server
    server.stop(grace=0)


@pytest.fixture
def shards():
    """Two shards, for tests that spread one job over several."""
    servers = [ShardServer(ShardConfig(port=0, device=DEVICE, barrier_timeout=30.0)).start()
               for _ in range(2)]
    yield servers
    for s in servers:
        s.stop(grace=0)


@pytest.fixture(params=["inline", "in-parts"])
def step_path(request, monkeypatch):
    """Runs a test twice: with steps taken inline, as small models' are, and in parts on
    the job's stepper thread while the reply streams, as large models' are."""
    if request.param == "inline":
        yield
        return
    started = steps_in_parts(monkeypatch)
    yield
    assert started, "no step ran on the stepper"


# ---- the CUDA backend's runtimes: the host emulation, and a real GPU where there is one ----

@pytest.fixture(scope="session")
def cxx():
    """The host C++ compiler the CUDA emulation is built with."""
    import shutil
    found = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if found is None:
        skip_or_fail("no C++ compiler for the CUDA host emulation")
    return found


@pytest.fixture(scope="session")
def emulated_runtime(cxx, tmp_path_factory):
    import emulator
    return emulator.build(cxx, tmp_path_factory.mktemp("cuda_emu"))


@pytest.fixture
def emulated_cuda(emulated_runtime):
    """kernels/cuda.py running on the host emulation; yields the runtime."""
    from optserve.kernels import cuda
    previous = cuda.use_runtime(emulated_runtime)
    emulated_runtime.launches.clear()
    yield emulated_runtime
    cuda.use_runtime(previous)


@pytest.fixture
def gpu_cuda():
    """kernels/cuda.py on a real GPU through CuPy; skipped (with the reason) without one."""
    from optserve.kernels import cuda
    from optserve.kernels.cuda_runtime import CupyRuntime
    try:
        import cupy
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no cupy, no driver, or no device
        pytest.skip(f"no CUDA GPU visible: {type(e).__name__}: {e}")
    if count == 0:
        pytest.skip("no CUDA GPU visible: cupy sees 0 devices")
    rt = CupyRuntime(cuda.source())
    previous = cuda.use_runtime(rt)
    yield rt
    cuda.use_runtime(previous)
