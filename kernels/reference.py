"""The reference backend: each registered optimizer's NumPy reference, one tensor at a time.

This is the ground truth that every fast path (the numba CPU backend, the CUDA kernels) is
tested against. It favours the plain statement of each equation over speed and is never
what a benchmark reports as optserve's own figure. The references themselves live beside
their kernels (kernels/adam.py, ...) and follow docs/optimizers.md, with these
conventions, shared with the fast paths:
- `param` and every state buffer are float32 arrays, updated in place; `grad` is float32.
- `step` is this tensor's step count *after* incrementing (it starts at 1).
- Scalars are Python floats (float64); as in torch, a coefficient is formed in float64
  and applied to float32 data.
- State buffers use torch's names (`exp_avg`, `exp_avg_sq`, `exp_avg_sq_row`, ...).
"""
from __future__ import annotations

import sys
from typing import Any

import numpy as np

from optserve.kernels import registry
from optserve.kernels.backend import StepResult, StepSums, begin_step
from optserve.kernels.hyper import Hyper
from optserve.kernels.layout import FlatLayout, FlatState
from optserve.kernels.state import HostState, host_worker_bytes

name = "reference"
steps_in_parts = True


def step(optimizer: str, layout: FlatLayout, state: FlatState, grad: np.ndarray,
         active: Any, hyper: Hyper, *, sums: bool = True) -> StepResult:
    """Every active tensor through its optimizer's reference (the contract in
    kernels/backend.py); the step sums from float64 copies of θ before and after."""
    call = begin_step(registry.get(optimizer), layout, state, grad, active, hyper, sums)
    result = call.result
    for i in np.flatnonzero(call.active):
        p = layout.param_view(state.param, i)
        g = layout.param_view(grad, i)
        st = {name: layout.field_view(state, name, i) for name in layout.field_shapes[i]}
        before = p.astype(np.float64) if sums else None
        reports = call.kernel.reference(p, g, st, int(state.steps[i]), hyper.at(i))
        for report, value in reports.items():
            result.reports[report][i] = value
        if sums:
            _add_sums(result.sums, i, before, p.astype(np.float64) - before, g.astype(np.float64))
    return result


def _add_sums(out: StepSums, i: int, w: np.ndarray, dw: np.ndarray, g: np.ndarray) -> None:
    out.w2[i] = np.vdot(w, w)
    out.wdw[i] = np.vdot(w, dw)
    out.dw2[i] = np.vdot(dw, dw)
    out.g2[i] = np.vdot(g, g)


def new_state(layout: FlatLayout, params: np.ndarray) -> HostState:
    """A job's state in host memory, stepped by this backend."""
    return HostState(sys.modules[__name__], layout, params)


def device_bytes(numel: int, tensors: int, state_bytes: int, workers: int, wire_itemsize: int) -> int:
    return 0


def worker_bytes(numel: int, tensors: int, workers: int) -> int:
    return host_worker_bytes(numel, workers)


def device_capacity() -> None:
    return None


def set_device_limit(nbytes: int) -> None:
    pass


def device_report() -> None:
    return None


def is_fault(exc: BaseException) -> bool:
    return False
