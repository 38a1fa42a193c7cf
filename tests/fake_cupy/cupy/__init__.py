"""A test double of CuPy, for machines without a GPU (tests/conftest.py puts this folder
first on the path when none is visible): the parts optserve uses, with NumPy memory, streams
that run their work only when waited for, and kernels on a host emulation of the CUDA
thread model. tests/test_cupy_contract.py checks the behaviours it relies on against
whichever CuPy is imported: this one in CI, the real one where there is a GPU."""
from __future__ import annotations

import numpy as np

from cupy import _environment, cuda  # noqa: F401  (_environment: for cupy_backends)
from cupy._engine import DeviceBuffer, NULL, copy, current_stream

__version__ = "0.0-test-double"
TEST_DOUBLE = True


class ndarray:
    """A one-dimensional device array (all optserve's are)."""

    def __init__(self, n: int, dtype):
        self.dtype = np.dtype(dtype)
        self.size = int(n)
        self.shape = (self.size,)
        self.nbytes = self.size * self.dtype.itemsize
        self._buffer = DeviceBuffer(self.nbytes)
        self.data = cuda.memory.MemoryPointer(self._buffer.ptr)

    def __len__(self) -> int:
        return self.size

    def set(self, arr, stream=None) -> None:
        arr = np.ascontiguousarray(arr).reshape(-1)
        if arr.nbytes != self.nbytes:
            raise ValueError(f"set: {arr.nbytes} bytes into an array of {self.nbytes}")
        copy(self.data.ptr, arr.ctypes.data, self.nbytes, True, stream or current_stream())

    def get(self, stream=None, order="C", out=None, blocking=True):
        """A blocking copy to the host on `stream` (the current one): waits for the work
        queued there before it."""
        host = out if out is not None else np.empty(self.size, self.dtype)
        stream = stream or current_stream()
        stream.synchronize()
        copy(host.ctypes.data, self.data.ptr, self.nbytes, False, NULL)
        return host


def empty(shape, dtype=float):
    return ndarray(int(np.prod(shape)), dtype)


def zeros(shape, dtype=float):
    out = empty(shape, dtype)
    out.set(np.zeros(out.size, out.dtype))
    return out


def asarray(a, dtype=None):
    if isinstance(a, ndarray):
        return a
    a = np.asarray(a, dtype)
    out = empty(a.size, a.dtype)
    out.set(a)
    return out


def asnumpy(a, stream=None):
    return a.get(stream=stream) if isinstance(a, ndarray) else np.asarray(a)


def get_default_memory_pool():
    return cuda.memory.MemoryPool()


def get_default_pinned_memory_pool():
    return cuda.pinned_memory.PinnedMemoryPool()
