"""Optimizer math over a job's flat buffers (`optserve.kernels`).

One module per optimizer (`adam`, `adamp`, `adafactor`, ...) holds its NumPy reference, its
numba CPU kernels and its CUDA driver (kernels in `csrc/`), and registers them
(`registry`). A backend runs every registered optimizer: `reference` (the ground truth),
`cpu` (numba) or `cuda` (CuPy); `kernels/backend.py` is their contract, and
`get_backend(device)` the one place that picks one.
"""
from __future__ import annotations

import logging

from optserve.kernels.backend import Backend, Report, StepResult, StepSums
from optserve.kernels.hyper import DecayMode, EpsMode, Hyper
from optserve.kernels.layout import FlatLayout, FlatState

__all__ = ["Backend", "DecayMode", "EpsMode", "FlatLayout", "FlatState", "Hyper", "Report",
           "StepResult", "StepSums", "get_backend"]

log = logging.getLogger("optserve.kernels")


# CUDA runtime errors that mean the machine cannot run CuPy's CUDA at all.
_INSUFFICIENT_DRIVER, _NO_DEVICE = 35, 100


def why_no_gpu() -> str | None:
    """None when CuPy sees a GPU, else why not, in words an operator can act on."""
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (pip install 'optserve[cuda]')"
    try:
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return None
        return "no CUDA GPU is visible"
    except Exception as e:   # CUDARuntimeError, or a driver library that cannot be loaded
        status = getattr(e, "status", None)
        if status == _INSUFFICIENT_DRIVER:
            try:
                driver = cupy.cuda.runtime.driverGetVersion()
            except Exception:
                driver = 0
            need = cupy.cuda.runtime.runtimeGetVersion()
            return (f"the NVIDIA driver is too old: it supports CUDA {driver // 1000}.{driver % 1000 // 10} "
                    f"and this CuPy needs CUDA {need // 1000}.{need % 1000 // 10} (update the driver, "
                    "or install the cupy-cudaXXx wheel of the CUDA the driver has)")
        if status == _NO_DEVICE:
            return "no CUDA GPU is visible"
        return f"CuPy cannot use a GPU: {type(e).__name__}: {e}"


def get_backend(device: str = "auto") -> Backend:
    """The backend for `device`: auto (cuda if a GPU is visible, else cpu), cpu, cuda, or
    reference (the NumPy ground truth, for debugging)."""
    if device == "auto":
        reason = why_no_gpu()
        if reason:
            log.info("device auto: %s; the CPU backend steps", reason)
        device = "cpu" if reason else "cuda"
    if device == "cpu":
        from optserve.kernels import cpu
        return cpu
    if device == "reference":
        from optserve.kernels import reference
        return reference
    if device == "cuda":
        reason = why_no_gpu()
        if reason:
            raise ValueError(f"device 'cuda' asked for, but {reason}; use --device cpu")
        from optserve.kernels import cuda
        return cuda
    raise ValueError(f"unknown device {device!r}; choose auto, cpu, cuda or reference")
