"""What optserve's CUDA runtime relies on CuPy to do, asserted against whichever CuPy is
imported: the test double (tests/fake_cupy) in CI, the real one where a GPU is visible. A
behaviour the double has that real CuPy lacks would let CI pass code that fails on a GPU;
each test here is one the double must pass because the GPU does.

The double is stricter than a GPU in ways no test here asserts, since a GPU only sometimes
shows them: its streams run nothing until waited for, page-locked memory given back is
poisoned, and device buffers have guard zones.
"""
from __future__ import annotations

import numpy as np
import pytest

from support import CUPY_DOUBLE


@pytest.fixture
def cp(request):
    """CuPy: the double without a GPU (skipped without a C++ compiler), the real one with."""
    if CUPY_DOUBLE:
        return request.getfixturevalue("cupy_double")
    import cupy
    return cupy


@pytest.fixture
def pinned(cp):
    import cupyx

    def make(values: np.ndarray) -> np.ndarray:
        out = cupyx.empty_pinned(values.nbytes, np.uint8)
        out[:] = values.view(np.uint8)
        return out
    return make


def h2d(cp, dst, src: np.ndarray, stream) -> None:
    cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.ctypes.data, src.nbytes,
                                cp.cuda.runtime.memcpyHostToDevice, stream.ptr)


def d2h(cp, dst: np.ndarray, src, stream) -> None:
    cp.cuda.runtime.memcpyAsync(dst.ctypes.data, src.data.ptr, dst.nbytes,
                                cp.cuda.runtime.memcpyDeviceToHost, stream.ptr)


def test_there_is_one_device_with_memory_and_a_compute_capability(cp):
    assert cp.cuda.runtime.getDeviceCount() >= 1
    free, total = cp.cuda.runtime.memGetInfo()
    assert 0 < free <= total
    assert cp.cuda.Device(0).compute_capability.isdigit()
    props = cp.cuda.runtime.getDeviceProperties(0)
    assert props["totalGlobalMem"] == total and props["name"]


def test_page_locked_memory_is_a_writable_numpy_array_of_the_size(cp):
    import cupyx
    buf = cupyx.empty_pinned(12345, np.uint8)
    assert isinstance(buf, np.ndarray) and buf.dtype == np.uint8 and buf.size == 12345
    buf[:] = 7
    assert (buf == 7).all()


def test_copies_and_an_event_on_one_stream_run_in_order(cp, pinned):
    values = np.random.default_rng(0).standard_normal(1 << 16).astype(np.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    dev = cp.empty(values.size, np.float32)
    src, back = pinned(values), pinned(np.zeros_like(values))
    h2d(cp, dev, src, stream)
    d2h(cp, back, dev, stream)
    done = cp.cuda.Event(block=False, disable_timing=True)
    done.record(stream)
    done.synchronize()
    np.testing.assert_array_equal(back.view(np.float32), values)
    assert done.done


def test_a_stream_waits_for_an_event_of_another(cp, pinned):
    values = np.arange(1 << 15, dtype=np.float32)
    first, second = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
    dev = cp.empty(values.size, np.float32)
    src, back = pinned(values), pinned(np.zeros_like(values))
    h2d(cp, dev, src, first)
    landed = cp.cuda.Event(block=False, disable_timing=True)
    landed.record(first)
    second.wait_event(landed)
    d2h(cp, back, dev, second)
    second.synchronize()
    np.testing.assert_array_equal(back.view(np.float32), values)


def test_a_device_to_device_copy_is_ordered_on_its_stream(cp, pinned):
    """What `optserve bench gpu` times as the copy-bandwidth limit."""
    values = np.random.default_rng(2).standard_normal(1 << 14).astype(np.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    a, b = cp.empty(values.size, np.float32), cp.empty(values.size, np.float32)
    src, back = pinned(values), pinned(np.zeros_like(values))   # alive until the copies ran
    h2d(cp, a, src, stream)
    cp.cuda.runtime.memcpyAsync(b.data.ptr, a.data.ptr, a.nbytes,
                                cp.cuda.runtime.memcpyDeviceToDevice, stream.ptr)
    d2h(cp, back, b, stream)
    stream.synchronize()
    np.testing.assert_array_equal(back.view(np.float32), values)


def test_a_copy_into_pageable_memory_is_done_when_it_returns(cp, pinned):
    """CUDA's documented behaviour for device-to-pageable copies, which the runtime's
    download (through asnumpy) and the double both rely on."""
    values = np.arange(4096, dtype=np.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    dev = cp.empty(values.size, np.float32)
    src = pinned(values)
    h2d(cp, dev, src, stream)
    out = np.zeros_like(values)
    d2h(cp, out, dev, stream)
    np.testing.assert_array_equal(out, values)


def test_asarray_and_asnumpy_round_trip_on_the_current_stream(cp):
    values = np.random.default_rng(1).integers(0, 1 << 16, 1000).astype(np.uint16)
    with cp.cuda.Stream(non_blocking=True) as stream:
        assert cp.cuda.get_current_stream() is stream
        dev = cp.asarray(values)
        assert dev.dtype == np.uint16 and dev.size == 1000 and dev.nbytes == 2000
        np.testing.assert_array_equal(cp.asnumpy(dev), values)


def test_the_pool_limit_refuses_an_allocation_beyond_it_and_frees_count(cp):
    pool = cp.get_default_memory_pool()
    before = pool.get_limit()
    held = cp.empty(1 << 18, np.uint8)
    used = pool.used_bytes()
    try:
        pool.set_limit(size=used + (4 << 20))
        assert pool.get_limit() == used + (4 << 20)
        with pytest.raises(cp.cuda.memory.OutOfMemoryError):
            cp.empty(8 << 20, np.uint8)
        extra = cp.empty(2 << 20, np.uint8)
        assert pool.used_bytes() >= used + extra.nbytes
        del extra
        assert pool.used_bytes() == used
    finally:
        pool.set_limit(size=before)
        del held


def test_a_runtime_error_carries_its_status(cp):
    error = cp.cuda.runtime.CUDARuntimeError(35)
    assert error.status == 35
    assert isinstance(error, Exception)
