"""Shared fixtures: real shards on loopback, the two paths a step takes through a shard,
and the runtimes of the CUDA backend."""
from __future__ import annotations

import os
import sys

import pytest

from optserve.server import ShardConfig, ShardServer
from support import CUPY_DOUBLE, DEVICE, skip_or_fail, steps_in_parts


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


# ---- the CUDA backend's runtimes: the test double without a GPU, the GPU where there is one ----

@pytest.fixture(scope="session")
def cupy_double():
    """The CuPy test double, ready to compile kernels for the host emulation; skipped where
    a GPU is visible (the GPU tier runs there)."""
    import shutil
    if not CUPY_DOUBLE:
        pytest.skip("a GPU is visible: the GPU tier runs instead of the host emulation")
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        skip_or_fail("no C++ compiler for the CUDA host emulation")
    import cupy
    return cupy


@pytest.fixture(autouse=True)
def no_device_misuse():
    """Fails a test in which the CuPy test double saw a misuse that a GPU would not report
    (a copy on page-locked memory given back before the copy ran)."""
    yield
    engine = sys.modules.get("cupy._engine")
    if engine is not None and engine.violations:
        found = list(engine.violations)
        engine.violations.clear()
        pytest.fail("the CuPy test double saw: " + "; ".join(found))


@pytest.fixture
def emulated_cuda(cupy_double):
    """kernels/cuda.py with the real CupyRuntime on the CuPy test double; yields the list the
    double appends every launched kernel to (cleared)."""
    from optserve.kernels import cuda
    from optserve.kernels.cuda_runtime import CupyRuntime
    previous = cuda.use_runtime(CupyRuntime(cuda.source()))
    launched = cupy_double.cuda.function.launched
    launched.clear()
    yield launched
    cuda.use_runtime(previous)


@pytest.fixture
def gpu_cuda():
    """kernels/cuda.py on a real GPU through CuPy; skipped (with the reason) without one."""
    from optserve.kernels import cuda
    from optserve.kernels.cuda_runtime import CupyRuntime
    if CUPY_DOUBLE:
        pytest.skip("no CUDA GPU visible (the CUDA runtime reports none); the host emulation "
                    "runs the kernels instead")
    rt = CupyRuntime(cuda.source())
    previous = cuda.use_runtime(rt)
    yield rt
    cuda.use_runtime(previous)
