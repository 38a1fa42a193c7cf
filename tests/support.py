"""Helpers the test modules share (no tests here)."""
from __future__ import annotations

import os
import pathlib
import sys

import pytest

FAKE_CUPY = pathlib.Path(__file__).with_name("fake_cupy")


def gpu_visible() -> bool:
    """Whether the CUDA runtime sees a device (asked without importing cupy)."""
    try:
        from cupy_backends.cuda.api import runtime
        return runtime.getDeviceCount() > 0
    except Exception:   # no cupy, no driver, or no device
        return False


# Without a GPU, `import cupy` is the test double (tests/fake_cupy): the CUDA backend's kernels
# run on the host emulation, here and in the shards the tests start.
CUPY_DOUBLE = not gpu_visible()
if CUPY_DOUBLE:
    sys.path.insert(0, str(FAKE_CUPY))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FAKE_CUPY),
                                                             os.environ.get("PYTHONPATH")]))

# The backend every end-to-end test drives; the kernel tests compare backends directly.
DEVICE = os.environ.get("OPTSERVE_TEST_DEVICE", "cpu")

# CI installs everything but a GPU: there, a missing compiler or library is a failure.
IN_CI = bool(os.environ.get("CI"))


def skip_or_fail(reason: str):
    """A skip with its reason, or in CI a failure."""
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


def steps_in_parts(monkeypatch) -> list:
    """Makes every step of an in-process shard run on its job's stepper thread, in parts of
    16 bytes or more (as steps of more than one 4 MiB reply chunk do); returns the list of
    those steps' Progress objects, for the caller to check that steps did take that path."""
    from optserve.server import stepper
    started = []

    class CountedProgress(stepper.Progress):
        def __init__(self):
            super().__init__()
            started.append(self)

    monkeypatch.setattr(stepper, "CHUNK_BYTES", 16)
    monkeypatch.setattr(stepper, "Progress", CountedProgress)
    return started
