"""Shared fixtures: real shards on loopback, and the backend the tests run against."""
from __future__ import annotations

import os

import pytest

from optserve.server import ShardServer
from support import skip_or_fail

# The backend every end-to-end test drives; the kernel tests compare backends directly.
DEVICE = os.environ.get("OPTSERVE_TEST_DEVICE", "cpu")


@pytest.fixture
def shard():
    """A fresh shard on a free loopback port, stopped after the test."""
    server = ShardServer("127.0.0.1", 0, device=DEVICE, barrier_timeout=30.0).start()
    yield server
    server.stop(grace=0)


@pytest.fixture
def shards():
    """Two shards, for tests that spread one job over several."""
    servers = [ShardServer("127.0.0.1", 0, device=DEVICE, barrier_timeout=30.0).start()
               for _ in range(2)]
    yield servers
    for s in servers:
        s.stop(grace=0)


# ---- the CUDA backend's runtimes: the host emulation, and a real GPU where there is one ----

@pytest.fixture(scope="session")
def emulated_runtime(tmp_path_factory):
    import shutil

    import emulator
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        skip_or_fail("no C++ compiler for the CUDA host emulation")
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
