"""The contract between a shard and the optimizer math: what a backend is, what one step
call takes and returns, and what an optimizer must provide to be registered.

A backend steps a job's flat buffers (`FlatLayout`, `FlatState`) in place:

    backend.step(optimizer, layout, state, grad, active, hyper, sums=True) -> StepResult

`active[i]` says which tensors take the step (their counts in `state.steps` are already
incremented); the others stay bit-for-bit as they were. Every backend runs the same
preamble (`begin_step`) and hands the optimizer's `Kernel` record a `StepCall`.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np
import numpy.typing as npt

from optserve.kernels.hyper import Hyper
from optserve.kernels.layout import FlatLayout, FlatState
from optserve.proto import optimizers

if TYPE_CHECKING:
    from optserve.kernels.state import JobState
    from optserve.proto.optimizers import OptimizerInfo


class View(Enum):
    """How an optimizer's kernels see each tensor, as a batch of matrices (B, R, C)."""
    FLAT = "flat"            # elementwise: the tensor as one run of numel values
    CHANNEL = "channel"      # (1, shape[0], numel/shape[0]) for ndim > 1: per output channel
    FACTORED = "factored"    # (prod(shape[:-2]), shape[-2], shape[-1]) for ndim >= 2


class Report(Enum):
    """What an optimizer reports per tensor besides the step sums; a closed set, each with
    its metrics in server/metrics.py."""
    PROJECTED = "projected"   # bool: AdamP removed the radial part of the update
    CLIP = "clip"             # float64: Adafactor's clipping divisor max(1, RMS(U)/d)

    @property
    def dtype(self) -> type:
        return bool if self is Report.PROJECTED else np.float64

    @property
    def neutral(self) -> Any:
        """The value of a tensor that was not stepped."""
        return False if self is Report.PROJECTED else 1.0


SUM_NAMES = ("w2", "wdw", "dw2", "g2")


@dataclass
class StepSums:
    """float64 sums over each tensor, for the metrics: w2 = ‖w_t‖², wdw = ⟨w_t, Δw⟩,
    dw2 = ‖Δw‖², g2 = ‖g‖², with Δw = w_{t+1} − w_t. Zero for tensors not stepped."""
    w2: npt.NDArray[np.float64]
    wdw: npt.NDArray[np.float64]
    dw2: npt.NDArray[np.float64]
    g2: npt.NDArray[np.float64]

    @classmethod
    def zeros(cls, n: int) -> "StepSums":
        return cls(*(np.zeros(n, np.float64) for _ in SUM_NAMES))

    def add_tiles(self, tensor_of: np.ndarray, tile_sums: np.ndarray) -> None:
        """Adds per-tile sums (one row per tile, columns in SUM_NAMES order) to their tensors."""
        for i, name in enumerate(SUM_NAMES):
            getattr(self, name)[:] += np.bincount(tensor_of, tile_sums[:, i], len(self.w2))


@dataclass
class StepResult:
    """What one step call measured, per tensor: the optimizer's reports, and the step sums
    when they were asked for (None otherwise: a reader that did not ask fails loudly
    instead of reading zeros)."""
    reports: dict[Report, np.ndarray]
    sums: StepSums | None

    @classmethod
    def empty(cls, kernel: "Kernel", n: int, sums: bool) -> "StepResult":
        return cls({r: np.full(n, r.neutral, r.dtype) for r in kernel.reports},
                   StepSums.zeros(n) if sums else None)

    def take(self, part: "StepResult", mask: np.ndarray) -> None:
        """Takes the values of the tensors in `mask` from `part` (a step taken in parts)."""
        for report, values in part.reports.items():
            self.reports[report][mask] = values[mask]
        if self.sums is not None and part.sums is not None:
            for name in SUM_NAMES:
                getattr(self.sums, name)[mask] = getattr(part.sums, name)[mask]


@dataclass
class StepCall:
    """One backend call as an optimizer's kernel driver sees it."""
    kernel: "Kernel"
    layout: FlatLayout
    state: FlatState
    grad: Any                  # float32 (or, on CUDA, 16-bit bits) over the flat layout
    active: npt.NDArray[np.bool_]
    hyper: Hyper
    steps: npt.NDArray[np.float64]   # each tensor's step count t, at least 1
    result: StepResult

    @property
    def sums(self) -> bool:
        return self.result.sums is not None


@dataclass(frozen=True)
class CudaKernels:
    """An optimizer's CUDA kernels: its source file in kernels/csrc, the __global__
    functions it defines, and the host driver that launches them (see kernels/cuda.py)."""
    source: str
    kernels: tuple[str, ...]
    run: Callable


@dataclass(frozen=True)
class Kernel:
    """Everything one optimizer brings, registered in kernels/registry.py.

    reference(param, grad, state, step, hyper, i) steps tensor i alone in NumPy (the ground
    truth) and returns its reports; cpu(call) steps every active tensor of a StepCall with
    numba; cuda drives the CUDA kernels. All three follow the equations in
    docs/optimizers.md.
    """
    name: str
    view: View
    reports: tuple[Report, ...]
    reference: Callable[..., dict[Report, Any]]
    cpu: Callable[[StepCall], None]
    cuda: CudaKernels

    @property
    def info(self) -> "OptimizerInfo":
        """The API side: accepted hyperparameters, validation, state fields."""
        return optimizers.get(self.name)


class Backend(Protocol):
    """One implementation of every registered optimizer (kernels.get_backend picks one)."""
    name: str
    # True when a step may be split into calls over disjoint sets of tensors at no extra
    # cost, so that a shard can stream the first part's parameters while it steps the next.
    steps_in_parts: bool

    def step(self, optimizer: str, layout: FlatLayout, state: FlatState, grad: Any,
             active: npt.ArrayLike, hyper: Hyper, *, sums: bool = True) -> StepResult: ...

    def new_state(self, layout: FlatLayout, params: np.ndarray) -> "JobState":
        """A job's state (kernels/state.py), kept where this backend steps it."""

    def device_bytes(self, numel: int, tensors: int, state_bytes: int, workers: int,
                     wire_itemsize: int) -> int:
        """Device memory a job of this size holds (0 for a host backend)."""

    def worker_bytes(self, numel: int, tensors: int, workers: int) -> int:
        """Host memory a job's state holds for its workers' gradients once each has sent
        one, beyond its parameters and optimizer state."""

    def device_capacity(self) -> int | None:
        """The device's memory in bytes; None for a host backend."""

    def set_device_limit(self, nbytes: int) -> None:
        """Caps the device memory the backend allocates (nothing for a host backend)."""

    def device_report(self) -> dict[str, int] | None:
        """Bytes held on the device ("device", "device_limit") and page-locked ("pinned"),
        and bytes copied to and from it so far ("h2d", "d2h"); None for a host backend."""

    def is_fault(self, exc: BaseException) -> bool:
        """Whether `exc` is a fault of the device: its state can no longer be trusted, and
        the shard must stop (to be restarted from its checkpoints)."""


def begin_step(kernel: Kernel, layout: FlatLayout, state: FlatState, grad: Any,
               active: npt.ArrayLike, hyper: Hyper, sums: bool) -> StepCall:
    """The preamble every backend runs: the result to fill (neutral values for tensors that
    are not stepped) and each tensor's step count as float64 (at least 1, so that the
    coefficients of inactive tensors, computed but never read, stay finite)."""
    active = np.asarray(active, bool)
    if active.shape != (layout.num_tensors,):
        raise ValueError(f"active has shape {active.shape}, the layout {layout.num_tensors} tensors")
    return StepCall(kernel, layout, state, grad, active, hyper,
                    np.maximum(state.steps, 1).astype(np.float64),
                    StepResult.empty(kernel, layout.num_tensors, sums))
