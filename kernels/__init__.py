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
from optserve.kernels.hyper import DecayMode, Hyper
from optserve.kernels.layout import FlatLayout, FlatState

__all__ = ["Backend", "DecayMode", "FlatLayout", "FlatState", "Hyper", "Report", "StepResult",
           "StepSums", "get_backend"]

log = logging.getLogger("optserve.kernels")


def _cuda_available() -> bool:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception as e:  # no cupy, no driver, or no device: all mean "no GPU here"
        log.debug("no CUDA GPU: %s: %s", type(e).__name__, e)
        return False


def get_backend(device: str = "auto") -> Backend:
    """The backend for `device`: auto (cuda if a GPU is visible, else cpu), cpu, cuda, or
    reference (the NumPy ground truth, for debugging)."""
    if device == "auto":
        device = "cuda" if _cuda_available() else "cpu"
    if device == "cpu":
        from optserve.kernels import cpu
        return cpu
    if device == "reference":
        from optserve.kernels import reference
        return reference
    if device == "cuda":
        if not _cuda_available():
            raise ValueError("device 'cuda' asked for, but no CUDA GPU is visible to CuPy "
                             "(pip install -e '.[cuda]' on a machine with a GPU); use --device cpu")
        from optserve.kernels import cuda
        return cuda
    raise ValueError(f"unknown device {device!r}; choose auto, cpu, cuda or reference")
