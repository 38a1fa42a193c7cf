"""Optimizer math over a job's flat buffers.

`get_backend(device)` is the one place that chooses an implementation; every backend has
`step(optimizer, layout, state, grad, active, hyper, *, stats=True) -> dict`. `reference` is
the NumPy ground truth the fast paths are tested against.

The dict always holds "projected" and "clip" (per tensor, cheap). The float64 sums the
per-tensor metrics need, "w2", "wdw", "dw2" and "g2", are computed only with stats=True;
with stats=False every backend leaves those four keys out (absent, not zeros, so a
consumer that reads them without asking fails loudly instead of reporting zeros), skips
their arithmetic, and leaves θ and the state bit-for-bit as stats=True would.
"""
from __future__ import annotations

from optserve.kernels.layout import HYPER_KEYS, FlatLayout, FlatState

__all__ = ["HYPER_KEYS", "FlatLayout", "FlatState", "get_backend"]


def _cuda_available() -> bool:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no cupy, no driver, or no device: all mean "no GPU here"
        return False


def get_backend(device: str = "auto"):
    """The backend module for `device`: auto (cuda if a GPU is visible, else cpu), cpu, cuda,
    or reference (the NumPy ground truth, for debugging)."""
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
