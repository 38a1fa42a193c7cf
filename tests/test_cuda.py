"""The CUDA sources (kernels/csrc) and what only the CUDA backend has.

The kernels' parity with the reference runs in tests/test_kernels.py, on the host emulation
(the CuPy test double, tests/fake_cupy) and on a real GPU where there is one. Here:
1. Compile checks, no GPU needed: the cubin a GPU shard loads and the PTX of the same
   options, by the same function (NVRTC, from the `nvidia-cuda-nvrtc` wheel) for sm_90, and
   every .cu file on its own through nvcc where nvcc is installed (checking that no kernel
   spills).
2. What the host reads from the sources (constants, struct layouts) and the exactness of
   the 16-bit loads, on the emulation.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from optserve.kernels import FlatLayout, FlatState, Hyper, cuda, cuda_runtime
from optserve.kernels.cuda_runtime import CSRC, struct_dtype
from optserve.kernels.registry import KERNELS
from optserve.proto.optimizers import REGISTRY, group_to_proto
from support import skip_or_fail

# ---------------------------------------------------------------------------------------
# 1. Compile checks
# ---------------------------------------------------------------------------------------


def _nvrtc():
    """cupy_backends' NVRTC binding with its library loaded, or a skip (a failure in CI)."""
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()  # loads libnvrtc
        return nvrtc
    except Exception as e:  # no cupy, or no libnvrtc (the nvidia-cuda-nvrtc wheel)
        skip_or_fail(f"NVRTC cannot be loaded ({type(e).__name__}: {e}); "
                     "pip install -e '.[nvrtc-check]'")


def test_the_kernels_compile_with_every_kernel_no_fma_and_no_ftz(tmp_path):
    """compile_kernels makes the cubin CupyRuntime loads; its PTX, of the same options, has
    every kernel and neither FMA contraction nor flushing of subnormals."""
    _nvrtc()
    cubin = cuda_runtime.compile_kernels(cuda.source(), 90, cache=tmp_path)
    assert cubin[:4] == b"\x7fELF"
    ptx = cuda_runtime.compile_kernels(cuda.source(), 90, "ptx", cache=tmp_path).decode()
    entries = set(re.findall(r"\.entry\s+(\w+)", ptx))
    assert entries == set(cuda.kernel_names()), entries ^ set(cuda.kernel_names())
    # --fmad=false: no multiply-add contraction (the reference rounds each operation);
    # --ftz=false: subnormals are kept, as NumPy keeps them.
    assert not re.search(r"\bfma\.rn\.f32\b", ptx)
    assert ".ftz" not in ptx
    assert re.search(r"\bmul\.rn\.f32\b", ptx)   # the patterns above can match


def test_compiled_kernels_are_cached_by_their_source(tmp_path):
    _nvrtc()
    first = cuda_runtime.compile_kernels(cuda.source(), 90, "ptx", cache=tmp_path)
    assert len(list(tmp_path.glob("*.ptx"))) == 1
    assert cuda_runtime.compile_kernels(cuda.source(), 90, "ptx", cache=tmp_path) == first
    edited = cuda.source().replace("#define TC 128", "#define TC 128   // edited")
    cuda_runtime.compile_kernels(edited, 90, "ptx", cache=tmp_path)
    assert len(list(tmp_path.glob("*.ptx"))) == 2
    assert sorted(p.read_text() for p in tmp_path.glob("*.cu")) == sorted([cuda.source(), edited])


def test_compile_kernels_warms_the_cache_a_shard_loads(tmp_path, monkeypatch):
    """`optserve compile-kernels`, as the shard image runs it at build time: the cubins land
    where a shard with the same OPTSERVE_KERNEL_CACHE looks, and it compiles nothing."""
    nvrtc = _nvrtc()
    env = {**os.environ, "OPTSERVE_KERNEL_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "optserve", "compile-kernels", "--arch", "80", "90"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(list(tmp_path.glob("*.cubin"))) == 2

    def no_compiling(*args):
        raise AssertionError("compiled although the cache was warm")
    monkeypatch.setattr(nvrtc, "compileProgram", no_compiling)
    monkeypatch.setenv("OPTSERVE_KERNEL_CACHE", str(tmp_path))
    for arch in (80, 90):
        assert cuda_runtime.compile_kernels(cuda.source(), arch)[:4] == b"\x7fELF"


def test_nvrtc_reports_a_broken_kernel_at_its_file_and_line(tmp_path):
    """A kernel that does not compile fails with NVRTC's log, which names the .cu file and
    line (the checks above are not vacuous, and #line markers survive the assembly)."""
    _nvrtc()
    broken = cuda.source().replace("adam_moments(gj, m[q], v[q], c1, b2, c2);",
                                   "adam_moments(gj, m[q], v[q], c1, b2, undefined_name);")
    line = next(i for i, text in enumerate((CSRC / "adam.cu").read_text().splitlines(), 1)
                if "adam_moments(gj" in text)
    with pytest.raises(cuda_runtime.CompileError, match=rf'adam\.cu\({line}\).*undefined_name'):
        cuda_runtime.compile_kernels(broken, 90, "ptx", cache=tmp_path)


@pytest.mark.parametrize("name", sorted({k.cuda.source for k in KERNELS.values()}))
def test_nvcc_compiles_each_source_file_without_spills(name, tmp_path):
    """Second opinion, where nvcc exists: each .cu file is a translation unit of its own
    (its includes resolved by nvcc), compiled to a cubin for sm_90 with ptxas's report."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed (the NVRTC check above is the one CI relies on)")
    proc = subprocess.run([nvcc, "-cubin", "-arch=sm_90", *cuda_runtime.OPTIONS, "-Xptxas", "-v",
                           str(CSRC / name), "-o", str(tmp_path / "k.cubin")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = proc.stderr
    record = next(k for k in KERNELS.values() if k.cuda.source == name)
    assert set(re.findall(r"Function properties for (\w+)", report)) == {"segment_sums",
                                                                         *record.cuda.kernels}
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores", report)
    assert frames and all(f == ("0", "0") for f in frames), report


# ---------------------------------------------------------------------------------------
# 2. Host and device agree
# ---------------------------------------------------------------------------------------

def test_messages_name_the_file_and_line_of_every_header(tmp_path):
    """A compile error deep in common.cuh (after its #pragma once) names its real line."""
    _nvrtc()
    needle = "T.R = ti.R; T.C = ti.C; T.n = ti.n; T.p = ti.p;"
    line = next(i for i, text in enumerate((CSRC / "common.cuh").read_text().splitlines(), 1)
                if needle in text)
    broken = cuda.source().replace(needle, "T.R = undefined_name;")
    with pytest.raises(cuda_runtime.CompileError, match=rf'common\.cuh\({line}\).*undefined_name'):
        cuda_runtime.compile_kernels(broken, 90, "ptx", cache=tmp_path)


def test_host_reads_the_layouts_the_kernels_use():
    """Constants and struct layouts come from the sources, in declaration order."""
    assert (cuda.BLOCK, cuda.WARPS, cuda.TR, cuda.TC) == (256, 8, 64, 128)
    assert struct_dtype("StepSums").names == ("w2", "wdw", "dw2", "g2")
    assert struct_dtype("TileRec").itemsize == 6 * 8
    assert all(struct_dtype(s)[0] == np.float64
               for s in ("AdamCoef", "AdampCoef", "AdafactorCoef", "TorchAdafactorCoef"))
    assert "vm" in struct_dtype("TensorRec").names   # AMSGrad's max_exp_avg_sq


def test_assembled_source_includes_each_header_once():
    source = cuda.source()
    assert source.count("struct TensorRec {") == 1
    assert source.count("__device__ __forceinline__ void adam_moments(") == 1
    assert "#include" not in source and "#pragma once" not in source


def test_half_to_float_is_exact(emulated_cuda):
    """Every float16 bit pattern (normals, subnormals, ±0, ±inf, NaN) widens as NumPy does."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    shapes = [(bits.size,)]
    group = {**REGISTRY["adamw"].defaults, "lr": 1.0, "betas": (0.0, 0.0), "eps": 1.0,
             "weight_decay": 0.0}
    layout = FlatLayout(shapes, [REGISTRY["adamw"].state_fields(s, None) for s in shapes])
    state = FlatState.zeros(layout)
    state.steps[:] = 1
    hyper = Hyper.from_groups([group_to_proto("adamw", group, 1.0)], [0])
    # beta1 = 0: exp_avg becomes 0 + (g - 0): g, but +0 for -0 (NaNs keep their bits).
    cuda.step("adamw", layout, state, bits.view(np.float16), np.ones(1, bool), hyper)
    g = bits.view(np.float16).astype(np.float32)
    with np.errstate(invalid="ignore"):
        want = np.float32(0) + np.float32(1) * (g - np.float32(0))   # m + (1-b1)(g - m), m = 0
    np.testing.assert_array_equal(state.fields["exp_avg"].view(np.uint32),
                                  want.view(np.uint32))


def test_import_needs_no_gpu():
    """Importing the backend imports no CuPy and compiles nothing (that happens on first use)."""
    code = ("import sys; import optserve.kernels.cuda as c; "
            "assert c.name == 'cuda' and 'adam_apply' in c.source(); "
            "assert 'cupy' not in sys.modules, 'cupy imported at module import'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
