"""The CUDA sources and the runtime that compiles and runs them, for any optimizer.

The kernels live in kernels/csrc: `common.cuh` (tables, loads, reductions, the step sums)
and one `.cu` file per optimizer. `assemble` joins the files an optimizer set needs into
one translation unit (each header once, `#line` markers so that compiler messages name
the real file and line).

One compiler configuration. `compile_kernels` is the only way the kernels are compiled:
NVRTC with OPTIONS and nothing else, to a cubin for the device's architecture (a cubin, not
PTX for the driver to compile, loads on a driver older than NVRTC within one CUDA major),
or to PTX for inspection. CuPy's own compile path (RawModule) appends `-ftz=true`, which
would flush float32 subnormals to zero; here denormals are kept on purpose, so that the
kernels round as the NumPy reference does everywhere (the kernels are memory-bound: FTZ buys
nothing), and tests/test_cuda.py inspects the PTX of exactly these options. Compiled
kernels are cached on disk (`kernel_cache`), keyed by the source, the options, the target
and NVRTC's version, so an edited header is never served from a stale cache; the source is
kept beside them.

The host reads its layouts from the same files: `constant("TC")` is an integer #define,
`struct_dtype("AdamCoef")` the NumPy dtype of a struct of double or i64 fields. A table
the host fills by field name is therefore laid out exactly as the kernel reads it.

`CupyRuntime` is the one object that touches CuPy, imported on first use: importing this
module needs no GPU and no CuPy. Without a GPU, tests run it unchanged on a CuPy test double
(tests/fake_cupy).
"""
from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import re
import tempfile
import weakref
from typing import Iterable

import numpy as np

CSRC = pathlib.Path(__file__).with_name("csrc")

# NVRTC options: C++17, no FMA contraction (the reference rounds every mul and add), and
# IEEE subnormals (NVRTC's default; CuPy's RawModule would add -ftz=true). `/` and sqrtf
# are IEEE too (NVRTC's default --prec-div=true --prec-sqrt=true).
OPTIONS = ("-std=c++17", "--fmad=false", "--ftz=false")


class CompileError(RuntimeError):
    """NVRTC refused the kernels; the message carries its log."""


def kernel_cache() -> pathlib.Path:
    """Where compiled kernels are kept: $OPTSERVE_KERNEL_CACHE, else ~/.cache/optserve."""
    return pathlib.Path(os.environ.get("OPTSERVE_KERNEL_CACHE")
                        or pathlib.Path.home() / ".cache" / "optserve" / "kernels")


def compile_kernels(source: str, arch: int, kind: str = "cubin",
                    cache: pathlib.Path | None = None) -> bytes:
    """`source` compiled by NVRTC with OPTIONS for compute capability `arch` (90 for sm_90):
    a cubin to load, or ("ptx") the PTX of the same options. Needs no GPU, only NVRTC
    (cupy-cuda13x's `cupy_backends`, with the nvidia-cuda-nvrtc library)."""
    from cupy_backends.cuda.libs import nvrtc
    target = f"--gpu-architecture={'sm' if kind == 'cubin' else 'compute'}_{arch}"
    options = (target, *OPTIONS)
    key = hashlib.sha256(repr((source, options, nvrtc.getVersion())).encode()).hexdigest()[:32]
    directory = cache or kernel_cache()
    path = directory / f"{key}.{kind}"
    if path.exists():
        return path.read_bytes()
    prog = nvrtc.createProgram(source, "optserve.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, list(options))
        except nvrtc.NVRTCError as e:
            raise CompileError(f"NVRTC failed ({e}):\n{nvrtc.getProgramLog(prog)}") from None
        binary = nvrtc.getCUBIN(prog) if kind == "cubin" else nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    _write(directory / f"{key}.cu", source.encode())
    _write(path, binary)
    return binary


def _write(path: pathlib.Path, data: bytes) -> None:
    """Writes whole or not at all (another shard may compile the same kernels); a cache that
    cannot be written only costs a compile per start."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        pass

_INCLUDE = re.compile(r'^\s*#include\s+"([^"]+)"\s*$')


def assemble(files: Iterable[str]) -> str:
    """One translation unit of the kernels in `files` (names in kernels/csrc), with every
    `#include "..."` inlined once."""
    seen: set[str] = set()
    out: list[str] = []

    def add(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        lines = (CSRC / name).read_text().splitlines()
        out.append(f'#line 1 "{name}"')
        for number, line in enumerate(lines, start=1):
            include = _INCLUDE.match(line)
            if include:
                add(include.group(1))
                out.append(f'#line {number + 1} "{name}"')
            else:   # a dropped line stays a line, so that line numbers stay right
                out.append("" if line.strip() == "#pragma once" else line)

    for name in files:
        add(name)
    return "\n".join(out) + "\n"


def _strip_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/", "", re.sub(r"//[^\n]*", "", text), flags=re.S)


@functools.cache
def _declarations() -> tuple[dict[str, int], dict[str, np.dtype]]:
    """Every integer #define and every struct of double or i64 fields in kernels/csrc."""
    defines: dict[str, int] = {}
    structs: dict[str, np.dtype] = {}
    for path in sorted(CSRC.glob("*.cu*")):
        text = _strip_comments(path.read_text())
        for name, value in re.findall(r"^\s*#define\s+(\w+)\s+(-?\d+)\s*$", text, flags=re.M):
            if defines.setdefault(name, int(value)) != int(value):
                raise ValueError(f"#define {name} has two values in kernels/csrc")
        for name, body in re.findall(r"\bstruct\s+(\w+)\s*\{([^{}]*)\}\s*;", text):
            fields = []
            for decl in filter(None, (d.strip() for d in body.split(";"))):
                ctype, names = decl.split(None, 1)
                if ctype not in ("double", "i64") or "[" in names:
                    break   # a struct the host does not fill: not read
                fields += [(n.strip(), "<f8" if ctype == "double" else "<i8")
                           for n in names.split(",")]
            else:
                if name in structs and structs[name] != np.dtype(fields):
                    raise ValueError(f"struct {name} is declared twice in kernels/csrc")
                structs[name] = np.dtype(fields)
    return defines, structs


def constant(name: str) -> int:
    """An integer #define of the CUDA sources."""
    return _declarations()[0][name]


def struct_dtype(name: str) -> np.dtype:
    """The NumPy dtype laid out as CUDA struct `name` (all fields double, or all i64)."""
    return _declarations()[1][name]


def flat(table: np.ndarray) -> np.ndarray:
    """A table of structs as the flat float64 or int64 array that is uploaded."""
    base = table.dtype[0] if table.dtype.names else table.dtype
    return np.ascontiguousarray(table).reshape(-1).view(base)


class CupyRuntime:
    """Device arrays, copies and launches through CuPy. The methods are the runtime
    interface that kernels/cuda.py uses (and a test emulation implements). Creating one
    compiles the kernels (or takes them from the cache) for the current device."""

    def __init__(self, source: str) -> None:
        import cupy
        self.cp = cupy
        device = cupy.cuda.Device()
        self.device_name = cupy.cuda.runtime.getDeviceProperties(device.id)["name"].decode()
        self.module = cupy.cuda.function.Module()
        self.module.load(compile_kernels(source, int(device.compute_capability)))
        self._kernels: dict[str, object] = {}
        self.copied = {"h2d": 0, "d2h": 0}   # bytes over PCIe, by direction
        self.pinned_bytes = 0                # page-locked host memory in arrays now

    # ---- arrays; copies on the current stream, complete when they return --------------------
    def is_device_array(self, x) -> bool:
        return isinstance(x, self.cp.ndarray)

    def upload(self, x: np.ndarray):
        self.copied["h2d"] += x.nbytes
        return self.cp.asarray(x)

    def download(self, x) -> np.ndarray:
        self.copied["d2h"] += x.nbytes
        return self.cp.asnumpy(x)

    def copy_into(self, host: np.ndarray, dev) -> None:
        self.copied["d2h"] += host.nbytes
        dev.get(out=host)

    def empty(self, n: int, dtype):
        return self.cp.empty(max(int(n), 1), dtype)

    # ---- streams, events, page-locked memory and copies queued on a stream ------------------
    def stream(self):
        """A stream that does not wait for the legacy default stream."""
        return self.cp.cuda.Stream(non_blocking=True)

    def event(self):
        """An event the host can wait on asleep (block=True: a busy wait would hold a core
        per waiting gRPC thread)."""
        return self.cp.cuda.Event(block=True, disable_timing=True)

    def pinned(self, nbytes: int) -> np.ndarray:
        """`nbytes` of page-locked host memory as a uint8 array; it goes back to CuPy's pool
        with the last array made from it."""
        import cupyx
        out = cupyx.empty_pinned(nbytes, np.uint8)
        self.pinned_bytes += nbytes
        weakref.finalize(out, self._unpinned, nbytes)
        return out

    def _unpinned(self, nbytes: int) -> None:
        self.pinned_bytes -= nbytes

    def h2d(self, dst, dst_byte: int, src: np.ndarray, stream) -> None:
        """Queues on `stream` a copy of host `src` (page-locked for the copy to be
        asynchronous) into device array `dst` from its byte `dst_byte` on."""
        self.copied["h2d"] += src.nbytes
        self.cp.cuda.runtime.memcpyAsync(dst.data.ptr + dst_byte, src.ctypes.data, src.nbytes,
                                         self.cp.cuda.runtime.memcpyHostToDevice, stream.ptr)

    def d2h(self, dst: np.ndarray, src, src_byte: int, stream) -> None:
        """Queues on `stream` a copy into host `dst` of device array `src` from its byte
        `src_byte` on."""
        self.copied["d2h"] += dst.nbytes
        self.cp.cuda.runtime.memcpyAsync(dst.ctypes.data, src.data.ptr + src_byte, dst.nbytes,
                                         self.cp.cuda.runtime.memcpyDeviceToHost, stream.ptr)

    def launch(self, kernel: str, grid: int, block: int, args: tuple) -> None:
        """Launches `kernel` on the current stream."""
        if grid <= 0:
            return
        fn = self._kernels.get(kernel)
        if fn is None:
            fn = self._kernels[kernel] = self.module.get_function(kernel)
        # Every scalar argument of the kernels is an i64 (`long long`).
        fn((int(grid),), (int(block),), tuple(np.int64(a) if isinstance(a, (int, np.integer))
                                              else a for a in args))

    # ---- memory -------------------------------------------------------------------------------
    def memory(self) -> tuple[int, int]:
        """(free, total) bytes of the device."""
        return self.cp.cuda.runtime.memGetInfo()

    def limit(self, nbytes: int) -> None:
        """Caps CuPy's device memory pool: an allocation beyond raises OutOfMemoryError."""
        self.cp.get_default_memory_pool().set_limit(size=nbytes)

    def report(self) -> dict[str, int]:
        """Device bytes in arrays now and the pool's limit, page-locked bytes, and the bytes
        copied each way so far (for the metrics)."""
        pool = self.cp.get_default_memory_pool()
        return {"device": pool.used_bytes(), "device_limit": pool.get_limit(),
                "pinned": self.pinned_bytes, **self.copied}

    def release_cached(self) -> None:
        """Gives the pools' unused blocks (device and page-locked) back to the driver."""
        self.cp.get_default_memory_pool().free_all_blocks()
        self.cp.get_default_pinned_memory_pool().free_all_blocks()
