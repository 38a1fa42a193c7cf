"""The fast CPU backend: every registered optimizer's numba kernels over a job's flat buffers.

Same contract and the same float32 arithmetic as the reference (kernels/reference.py);
only the schedule differs. AdamW, Adam, Lion, and AdamP when it does not project, come out
bit-identical to the reference; sums are accumulated in float64 here (float32 in the
reference), so Adafactor and projected AdamP agree to float32 rounding. The step sums the
metrics need (‖w‖², ⟨w, Δw⟩, ‖Δw‖², ‖g‖²) are summed inside the loop that writes θ, so
they cost no extra pass, and with step(..., sums=False) they cost nothing.

Each optimizer's kernels (kernels/<optimizer>.py) are `prange` loops over the tiles of
every active tensor (kernels/cpu_tiles.py): the number of kernel calls per step is fixed
whatever the number of tensors. Per-tensor scalars (lr/bc1, √bc2, α_t, ...) are formed in
float64 with vectorised NumPy and handed to the kernels as float32, as the reference does.
"""
from __future__ import annotations

import sys
import threading
from typing import Any

import numba
import numpy as np

from optserve.kernels import registry
from optserve.kernels.backend import StepResult, begin_step
from optserve.kernels.hyper import Hyper
from optserve.kernels.layout import FlatLayout, FlatState
from optserve.kernels.state import HostState, host_worker_bytes

name = "cpu"
# A step may be taken in several calls over disjoint sets of tensors at no extra cost: the
# state is stepped in place where it lies (the server streams each part as it is done).
steps_in_parts = True

# Steps over fewer active elements than this run on the calling thread alone: they gain
# little from more threads, and a parallel region waits for every thread to be scheduled,
# which on a machine whose other cores are busy (a shard beside its workers) can take a
# time slice. A 3K-parameter AdamW step took 0.14 ms either way on an idle 2-core machine,
# and at the 90th percentile 0.24 ms on one thread but 7.95 ms on two with the other core
# busy. (`optserve server --threads` sets the count for all steps.)
PARALLEL_MIN_ELEMENTS = 1 << 18

# Kernel calls are serialised: each already uses every core, and numba's workqueue
# threading layer (the fallback when neither TBB nor OpenMP is present) aborts on
# concurrent parallel launches from several Python threads.
_lock = threading.Lock()


def step(optimizer: str, layout: FlatLayout, state: FlatState, grad: np.ndarray,
         active: Any, hyper: Hyper, *, sums: bool = True) -> StepResult:
    """One step of every active tensor, in place (the contract in kernels/backend.py)."""
    call = begin_step(registry.get(optimizer), layout, state, grad, active, hyper, sums)
    if not call.active.any():
        return call.result
    threads = numba.get_num_threads()   # thread-local in numba: set for this call only
    if layout.sizes[call.active].sum() < PARALLEL_MIN_ELEMENTS:
        numba.set_num_threads(1)
    try:
        # Inactive tensors may have step 0 and arbitrary hyperparameters; their
        # coefficients are computed (vectorised) but never read.
        with _lock, np.errstate(all="ignore"):
            call.kernel.cpu(call)
    finally:
        numba.set_num_threads(threads)
    return call.result


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
