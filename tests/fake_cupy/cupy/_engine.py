"""The machinery of the CuPy test double: device memory, page-locked memory, streams that
run their work late, events, and kernels run on the host emulation of tests/emulation.

It is stricter than a GPU where a GPU would only sometimes fail:
- work queued on a stream other than the null stream (copies, launches, event records)
  runs only when something waits for it: an event or stream synchronize, a blocking copy
  on that stream, a device synchronize. Reading a result before waiting for it reads what
  was there before (device memory starts poisoned);
- a copy from page-locked memory reads its source when it runs, not when it is queued, so
  reusing a staging buffer before the copy's event has fired corrupts the copy; page-locked
  memory given back to the pool is poisoned;
- device buffers have poisoned guard zones, checked after every kernel;
- the pool's limit raises OutOfMemoryError, as CuPy's does;
- a copy that runs after its page-locked buffer was given back fails, and is recorded in
  `violations`;
- FAKE_CUPY_FAULT_AT=n makes the n-th kernel to run fail with an illegal address, and every
  kernel and copy after it, as a sticky CUDA error does.
"""
from __future__ import annotations

import bisect
import ctypes
import hashlib
import os
import pathlib
import re
import subprocess
import threading
import weakref

import numpy as np

GUARD = 1024                    # poisoned elements on each side of a device buffer
_POISON_BYTE = 0xFF             # NaN in every float width, -1 in every integer one
EMULATION = pathlib.Path(__file__).resolve().parents[2] / "emulation"
TOTAL_MEMORY = int(os.environ.get("FAKE_CUPY_MEMORY", 8 << 30))
_lock = threading.RLock()
# Held while any stream runs its work, one op at a time: a stream's work stays in order, and a
# wait on another stream's event runs that stream's work in the same thread (a lock per
# stream would deadlock two threads that each wait on the other's stream, which a GPU does not).
_running = threading.RLock()
violations: list[str] = []    # misuses a GPU would not report (tests/conftest.py checks it)


class _Faults:
    """The injected sticky error (FAKE_CUPY_FAULT_AT)."""
    at = int(os.environ.get("FAKE_CUPY_FAULT_AT", "0"))
    runs = 0
    sticky = False

    @classmethod
    def check(cls) -> None:
        if cls.sticky:
            raise CUDARuntimeError(700, "an illegal memory access was encountered")


class CUDARuntimeError(RuntimeError):
    def __init__(self, status: int, message: str = ""):
        super().__init__(f"cudaError {status}: {message}")
        self.status = status


class OutOfMemoryError(MemoryError):
    def __init__(self, size: int, total: int, limit: int = 0):
        super().__init__(f"Out of memory allocating {size:,} bytes (allocated so far: "
                         f"{total:,} bytes, limit set to: {limit:,} bytes).")


# ---- memory: every allocation is findable by address -------------------------------------------
_starts: list[int] = []
_spans: dict[int, tuple[int, weakref.ref, str]] = {}     # start -> (end, owner, kind)


def _register(start: int, size: int, owner, kind: str) -> None:
    with _lock:
        bisect.insort(_starts, start)
        _spans[start] = (start + size, weakref.ref(owner), kind)


def _unregister(start: int) -> None:
    with _lock:
        _starts.remove(start)
        del _spans[start]


def find(address: int, size: int):
    """(owner, kind) of the live allocation holding [address, address + size), or (None,
    "pageable") for memory the double did not allocate."""
    with _lock:
        i = bisect.bisect_right(_starts, address) - 1
        if i >= 0:
            end, owner, kind = _spans[_starts[i]]
            if address + size <= end and owner() is not None:
                return owner(), kind
    return None, "pageable"


class Pool:
    """The device memory pool: what is in arrays, and the limit."""

    def __init__(self):
        self.used = 0
        self.limit = 0

    def allocate(self, nbytes: int) -> None:
        with _lock:
            cap = self.limit or TOTAL_MEMORY
            if self.used + nbytes > cap:
                raise OutOfMemoryError(nbytes, self.used, self.limit)
            self.used += nbytes

    def free(self, nbytes: int) -> None:
        with _lock:
            self.used -= nbytes


POOL = Pool()


class DeviceBuffer:
    """Device memory: a NumPy buffer between two poisoned guard zones."""

    def __init__(self, nbytes: int):
        POOL.allocate(nbytes)
        self.nbytes = nbytes
        self.raw = np.full(nbytes + 2 * GUARD, _POISON_BYTE, np.uint8)
        self.mem = self.raw[GUARD:GUARD + nbytes]
        self.ptr = self.mem.ctypes.data
        _register(self.ptr, nbytes, self, "device")
        weakref.finalize(self, _release_device, self.ptr, nbytes)

    def guards_intact(self) -> bool:
        return bool((self.raw[:GUARD] == _POISON_BYTE).all()
                    and (self.raw[GUARD + self.nbytes:] == _POISON_BYTE).all())


def _release_device(ptr: int, nbytes: int) -> None:
    _unregister(ptr)
    POOL.free(nbytes)


class PinnedPool:
    """Page-locked host memory: blocks are reused by size, and poisoned when given back.

    As with CuPy's PinnedMemoryPointer, an array's memory is held by a non-array object (a
    ctypes array over the block) that every slice made from the array keeps alive: the block
    goes back to the pool only once the last of them is gone."""

    def __init__(self):
        self.free: dict[int, list[np.ndarray]] = {}
        self.blocks: set[int] = set()
        self._all: list[np.ndarray] = []          # every block, kept for the process's life

    def take(self, nbytes: int) -> np.ndarray:
        with _lock:
            spare = self.free.get(nbytes)
            block = spare.pop() if spare else None
            if block is None:
                block = np.empty(max(nbytes, 1), np.uint8)
                self._all.append(block)
        owner = (ctypes.c_uint8 * block.nbytes).from_address(block.ctypes.data)
        _register(block.ctypes.data, block.nbytes, owner, "pinned")
        weakref.finalize(owner, self._give_back, block)
        return np.frombuffer(owner, np.uint8, nbytes)

    def _give_back(self, block: np.ndarray) -> None:
        block[:] = _POISON_BYTE
        _unregister(block.ctypes.data)
        with _lock:
            self.free.setdefault(block.nbytes, []).append(block)

    def free_all_blocks(self) -> None:
        with _lock:
            self.free.clear()


PINNED = PinnedPool()


# ---- streams and events --------------------------------------------------------------------------
class Stream:
    """Work queued in order; the null stream runs it at once."""
    _next_ptr = 0x1000

    def __init__(self, null: bool = False, non_blocking: bool = False, ptds: bool = False,
                 priority=None):
        self.null = null
        self.non_blocking = non_blocking
        self.ops: list = []
        if null:
            self.ptr = 0
        else:
            with _lock:
                self.ptr = Stream._next_ptr
                Stream._next_ptr += 0x10
            STREAMS[self.ptr] = self

    def enqueue(self, op) -> None:
        if self.null:
            op()
        else:
            with _lock:
                self.ops.append(op)

    def run_until(self, done=lambda: False) -> None:
        """Runs queued work in order until `done()` or none is left."""
        with _running:
            while not done():
                with _lock:
                    if not self.ops:
                        return
                    op = self.ops.pop(0)
                op()

    def synchronize(self) -> None:
        self.run_until()

    @property
    def done(self) -> bool:
        return not self.ops

    def wait_event(self, event) -> None:
        self.enqueue(event.synchronize)

    def use(self):
        _current.stack = [*getattr(_current, "stack", []), self]
        return self

    def __enter__(self):
        _current.stack = [*getattr(_current, "stack", []), self]
        return self

    def __exit__(self, *exc):
        _current.stack = _current.stack[:-1]


STREAMS: "weakref.WeakValueDictionary[int, Stream]" = weakref.WeakValueDictionary()
NULL = Stream(null=True)
_current = threading.local()


def current_stream() -> Stream:
    stack = getattr(_current, "stack", [])
    return stack[-1] if stack else NULL


def stream_of(ptr: int) -> Stream:
    return NULL if ptr == 0 else STREAMS[ptr]


def synchronize_all() -> None:
    for stream in list(STREAMS.values()):
        stream.synchronize()


class Event:
    def __init__(self, block: bool = False, disable_timing: bool = False, interprocess: bool = False):
        self.stream: Stream | None = None
        self.fired = True

    def record(self, stream: Stream | None = None) -> None:
        self.stream = stream or current_stream()
        self.fired = False
        self.stream.enqueue(self._fire)

    def _fire(self) -> None:
        self.fired = True

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.run_until(lambda: self.fired)

    @property
    def done(self) -> bool:
        return self.fired


# ---- copies ----------------------------------------------------------------------------------
def copy(dst: int, src: int, nbytes: int, to_device: bool, stream: Stream,
         from_device: bool | None = None) -> None:
    """cudaMemcpyAsync, host to device (`to_device`), device to host, or device to device
    (both). Page-locked memory is read or written when the copy runs; pageable host memory is
    read at once (the driver stages it) or written once the stream has run up to the copy
    (a copy into pageable memory returns when it is done)."""
    if nbytes == 0:
        return
    from_device = not to_device if from_device is None else from_device
    dst_owner, dst_kind = find(dst, nbytes)
    src_owner, src_kind = find(src, nbytes)
    for address, kind, wanted in ((dst, dst_kind, to_device), (src, src_kind, from_device)):
        if wanted and kind != "device":
            raise CUDARuntimeError(1, f"memcpyAsync: {hex(address)} is not device memory")
    if to_device and src_kind == "pageable":
        staged = np.frombuffer((ctypes.c_char * nbytes).from_address(src), np.uint8).copy()
        src, src_owner = staged.ctypes.data, staged

    # Device memory and staged pageable memory stay alive until the copy has run. Page-locked
    # memory does not (CUDA keeps nothing alive): a copy that runs after its page-locked
    # buffer was given back is an error, as on a GPU it would write into whatever reuses it.
    pinned = [weakref.ref(o) for o, k in ((dst_owner, dst_kind), (src_owner, src_kind)) if k == "pinned"]

    def run():
        _Faults.check()
        if any(ref() is None for ref in pinned):
            message = (f"a copy of {nbytes} bytes ran on page-locked memory that was given back "
                       "before it ran")
            violations.append(message)
            raise RuntimeError(f"CuPy test double: {message}")
        ctypes.memmove(dst, src, nbytes)
    run.keep = tuple(o for o, k in ((dst_owner, dst_kind), (src_owner, src_kind)) if k != "pinned")
    stream.enqueue(run)
    if not to_device and dst_kind == "pageable":
        stream.synchronize()


# ---- kernels on the host emulation -----------------------------------------------------------
_KERNEL_RE = re.compile(r'extern "C" __global__ void __launch_bounds__\(BLOCK\)\s*(\w+)\(([^)]*)\)')
launched: list[str] = []      # every kernel launched, in order (tests count them)


def _wrappers(source: str) -> tuple[str, dict[str, int]]:
    """extern "C" emu_k_<name>(const long long* a) calling each kernel with a[i] cast to its
    parameter type (pointers or i64: the kernels take no floating-point scalars)."""
    out, arity = [], {}
    for name, params in _KERNEL_RE.findall(source):
        args = []
        for i, param in enumerate(p.strip() for p in params.split(",")):
            ptype = re.sub(r"\b__restrict__\b", "", param.rsplit(None, 1)[0]).strip()
            if "*" in ptype:
                args.append(f"({ptype})(intptr_t)a[{i}]")
            elif ptype == "i64":
                args.append(f"a[{i}]")
            else:
                raise ValueError(f"kernel {name}: parameter {param!r} is neither a pointer nor i64")
        arity[name] = len(args)
        out.append(f'extern "C" void emu_k_{name}(const long long* a) {{ {name}({", ".join(args)}); }}')
    return "\n".join(out), arity


class Library:
    """A translation unit of kernels, compiled for the host against the CUDA shim."""

    def __init__(self, source: str, directory: pathlib.Path):
        glue, self.arity = _wrappers(source)
        key = hashlib.sha256((source + (EMULATION / "shim.h").read_text()
                              + (EMULATION / "runner.cpp").read_text()).encode()).hexdigest()[:32]
        lib = directory / f"emu-{key}.so"
        if not lib.exists():
            directory.mkdir(parents=True, exist_ok=True)
            src = directory / f".emu-{key}-{os.getpid()}.cpp"
            src.write_text("\n".join(['#line 1 "shim.h"', (EMULATION / "shim.h").read_text(),
                                      source, '#line 1 "runner.cpp"',
                                      (EMULATION / "runner.cpp").read_text(),
                                      '#line 1 "wrappers"', glue]))
            tmp = directory / f".emu-{key}-{os.getpid()}.so"
            cxx = os.environ.get("CXX", "g++")
            # -ffp-contract=off: no FMA, as --fmad=false on the device; no -ffast-math.
            proc = subprocess.run([cxx, "-std=c++17", "-O1", "-fPIC", "-shared",
                                   "-ffp-contract=off", "-fno-strict-aliasing", str(src), "-o",
                                   str(tmp)], capture_output=True, text=True, timeout=600)
            src.unlink()
            if proc.returncode:
                raise CUDARuntimeError(218, f"the host emulation did not compile:\n{proc.stderr}")
            os.replace(tmp, lib)
        self.lib = ctypes.CDLL(str(lib))
        self.lib.emu_launch.restype = ctypes.c_int
        self.lib.emu_launch.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong,
                                        ctypes.c_longlong, ctypes.c_char_p, ctypes.c_int]

    def launch(self, name: str, grid: int, block: int, args: tuple, stream: Stream) -> None:
        if len(args) != self.arity[name]:
            raise CUDARuntimeError(1, f"{name} takes {self.arity[name]} arguments, got {len(args)}")
        words, buffers = [], []
        for a in args:
            buffer = getattr(a, "_buffer", None)
            if buffer is not None:
                words.append(buffer.ptr)
                buffers.append(buffer)
            elif isinstance(a, (int, np.integer)) and not isinstance(a, bool):
                words.append(int(a))
            else:   # CuPy would pass a float as a double, which no kernel takes
                raise TypeError(f"{name}: argument {a!r} is neither a device array nor an integer")
        launched.append(name)
        fn = ctypes.cast(getattr(self.lib, f"emu_k_{name}"), ctypes.c_void_p)

        def run():
            _Faults.runs += 1
            if _Faults.at and _Faults.runs >= _Faults.at:
                _Faults.sticky = True
            _Faults.check()
            # One launch at a time: the emulation's fibers and shared memory are process-wide.
            with _launch_lock:
                packed = np.array(words, np.int64)
                err = ctypes.create_string_buffer(512)
                rc = self.lib.emu_launch(fn, packed.ctypes.data, int(grid), int(block), err, 512)
            if rc:
                raise CUDARuntimeError(719, f"{name}: {err.value.decode()}")
            bad = [i for i, b in enumerate(buffers) if not b.guards_intact()]
            if bad:
                raise CUDARuntimeError(700, f"{name} wrote outside its buffers ({bad})")
        if grid > 0:
            stream.enqueue(run)


_launch_lock = threading.Lock()
