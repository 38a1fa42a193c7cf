"""The CUDA kernels on a CPU: the kernel source compiled by the host C++ compiler against a
small CUDA shim (tests/emulation/), driven by the unchanged host side of kernels/cuda.py
through its runtime hook (`cuda.use_runtime`).

Buffers carry poisoned guard zones that are checked after every launch, and scratch
starts as NaN, so a kernel that writes outside its buffers or reads what nobody wrote
fails here without a GPU. What the emulation does not model (real concurrency, the memory
model, FTZ) is for the GPU tier of the tests.
"""
from __future__ import annotations

import ctypes
import pathlib
import re
import subprocess

import numpy as np

from optserve.kernels import cuda

HERE = pathlib.Path(__file__).with_name("emulation")
_KERNEL_RE = re.compile(r'extern "C" __global__ void __launch_bounds__\(BLOCK\)\s*(\w+)\(([^)]*)\)')


def wrappers(source: str) -> tuple[str, dict[str, int]]:
    """extern "C" emu_k_<name>(const long long* a) calling each kernel with a[i] cast to its
    parameter type (pointers or i64: the kernels take no floating-point scalars)."""
    out, arity = [], {}
    for name, params in _KERNEL_RE.findall(source):
        args = []
        for i, param in enumerate(p.strip() for p in params.split(",")):
            ptype = re.sub(r"\b__restrict__\b", "", param.rsplit(None, 1)[0]).strip()
            if "*" in ptype:
                args.append(f"({ptype})(intptr_t)a[{i}]")
            else:
                assert ptype == "i64", (name, param)
                args.append(f"a[{i}]")
        arity[name] = len(args)
        out.append(f'extern "C" void emu_k_{name}(const long long* a) {{ {name}({", ".join(args)}); }}')
    return "\n".join(out), arity


GUARD = 1024          # poisoned elements on each side of every emulated device buffer
_POISON = {4: np.uint32(0x7FC0DEAD), 8: np.uint64(0x7FF8DEADDEADDEAD), 2: np.uint16(0x7E5A)}


class EmuArray:
    """A 'device' array of the emulation: a NumPy buffer between two poisoned guard zones."""

    def __init__(self, raw: np.ndarray, n: int):
        self.raw, self.n = raw, n
        self.a = raw[GUARD:GUARD + n]

    @classmethod
    def new(cls, n: int, dtype, fill=None) -> "EmuArray":
        dtype = np.dtype(dtype)
        raw = np.empty(n + 2 * GUARD, dtype)
        raw.view(f"u{dtype.itemsize}")[:] = _POISON[dtype.itemsize]   # NaN for floats
        arr = cls(raw, n)
        if fill is not None:
            arr.a[:] = fill
        return arr

    dtype = property(lambda self: self.a.dtype)
    size = property(lambda self: self.n)
    ptr = property(lambda self: self.a.ctypes.data)

    def guards_intact(self) -> bool:
        u = self.raw.view(f"u{self.dtype.itemsize}")
        p = _POISON[self.dtype.itemsize]
        return bool((u[:GUARD] == p).all() and (u[GUARD + self.n:] == p).all())


class EmulatedRuntime:
    """kernels/cuda.py's runtime interface over the host-compiled kernels."""
    device_name = "host emulation"

    def __init__(self, lib: ctypes.CDLL, arity: dict[str, int]):
        self.lib, self.arity = lib, arity
        self.lib.emu_launch.restype = ctypes.c_int
        self.lib.emu_launch.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong,
                                        ctypes.c_longlong, ctypes.c_char_p, ctypes.c_int]
        self.launches: list[str] = []

    def is_device_array(self, x) -> bool:
        return isinstance(x, EmuArray)

    def upload(self, x: np.ndarray) -> EmuArray:
        return EmuArray.new(x.size, x.dtype, np.ravel(x))

    def download(self, x: EmuArray) -> np.ndarray:
        return x.a.copy()

    def copy_into(self, host: np.ndarray, dev: EmuArray) -> None:
        host[...] = dev.a.reshape(host.shape)

    def empty(self, n: int, dtype) -> EmuArray:
        return EmuArray.new(max(int(n), 1), dtype)      # poisoned: NaN where a float

    def launch(self, kernel: str, grid: int, block: int, args: tuple) -> None:
        self.launches.append(kernel)
        assert len(args) == self.arity[kernel], (kernel, len(args))
        if grid <= 0:
            return
        # CuPy passes a Python float as a double, which no kernel takes: refuse it here.
        assert all(isinstance(a, (EmuArray, int, np.integer)) for a in args), (kernel, args)
        words = np.array([a.ptr if isinstance(a, EmuArray) else int(a) for a in args], np.int64)
        err = ctypes.create_string_buffer(512)
        fn = ctypes.cast(getattr(self.lib, f"emu_k_{kernel}"), ctypes.c_void_p)
        rc = self.lib.emu_launch(fn, words.ctypes.data, int(grid), int(block), err, 512)
        assert rc == 0, f"{kernel}: {err.value.decode()}"
        bad = [i for i, a in enumerate(args) if isinstance(a, EmuArray) and not a.guards_intact()]
        assert not bad, f"{kernel} wrote outside its buffers (arguments {bad})"


def build(cxx: str, directory: pathlib.Path, source: str | None = None) -> EmulatedRuntime:
    """Compiles `source` (default: every registered optimizer's kernels) for the host, into
    `directory`."""
    source = source or cuda.source()
    glue, arity = wrappers(source)
    assert set(arity) == set(cuda.kernel_names()), set(arity) ^ set(cuda.kernel_names())
    src = directory / "emu.cpp"
    src.write_text("\n".join(['#line 1 "shim.h"', (HERE / "shim.h").read_text(), source,
                              '#line 1 "runner.cpp"', (HERE / "runner.cpp").read_text(),
                              '#line 1 "wrappers"', glue]))
    lib = directory / "emu.so"
    # -ffp-contract=off: no FMA, as --fmad=false on the device; no -ffast-math.
    proc = subprocess.run([cxx, "-std=c++17", "-O1", "-fPIC", "-shared", "-ffp-contract=off",
                           "-fno-strict-aliasing", str(src), "-o", str(lib)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return EmulatedRuntime(ctypes.CDLL(str(lib)), arity)
