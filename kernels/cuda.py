"""The CUDA backend: every registered optimizer's kernels (kernels/csrc) over a job's flat
buffers, one launch per pass however many tensors the job has.

Same contract as the other backends (kernels/backend.py); the equations are the
reference's, restated beside each kernel, and every float32 operation is done in the
reference's order without FMA contraction. So AdamW, Adam, Lion, and AdamP when it does
not project, come out bit-identical to the reference; sums are float64 here (float32 in
the reference), so Adafactor and projected AdamP agree to float32 rounding, as the CPU
backend does.

A step: the host builds the optimizer's per-tensor coefficient table (float64, as the
reference forms its scalars), uploads it, and the optimizer's driver launches its passes
(`StepCall.kernel.cuda.run`). The tile and tensor tables of a view depend on the layout
alone, so they are built once (`plan`) and uploaded once per runtime. With sums asked for,
the kernels that write θ also write per-tile step sums, which `segment_sums` reduces per
tensor; one device-to-host copy of the per-tensor results ends the step (and is what
synchronises).

Gradients: float32 (the contract), or 16-bit gradients without a conversion pass:
float16 arrays, and bfloat16 given as uint16 bit patterns (or an ml_dtypes bfloat16 array);
the kernels widen them to float32 on load.

State: a shard's job keeps its state on the device (`new_state`: kernels/cuda_state.py),
which `step()` steps in place. `step()` also takes a FlatState of NumPy arrays (uploaded,
stepped and copied back), which the tests use.
"""
from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from optserve.kernels import registry
from optserve.kernels.backend import StepResult, StepSums, View, begin_step
from optserve.kernels.cuda_runtime import CupyRuntime, assemble, constant, flat, struct_dtype
from optserve.kernels.hyper import Hyper
from optserve.kernels.layout import FlatLayout, FlatState

name = "cuda"
# A job's state stays on the device: a step in parts costs a few launches more.
steps_in_parts = True

BLOCK, WARPS, TR, TC = (constant(k) for k in ("BLOCK", "WARPS", "TR", "TC"))
GK_F32, GK_BF16, GK_F16 = (constant(k) for k in ("GK_F32", "GK_BF16", "GK_F16"))


# The kernels of a job's state on the device (kernels/cuda_state.py), besides the optimizers'.
STATE_KERNELS = ("tile_totals", "count_nonfinite", "grad_mean", "encode_wire")


@functools.cache
def source() -> str:
    """The translation unit of every registered optimizer's kernels and the state's."""
    return assemble(["state.cu", *(k.cuda.source for k in registry.KERNELS.values())])


def kernel_names() -> tuple[str, ...]:
    """Every __global__ function of source()."""
    names = ("segment_sums", *STATE_KERNELS,
             *(n for k in registry.KERNELS.values() for n in k.cuda.kernels))
    return tuple(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------
# The runtime: CuPy by default; tests may install another with the same methods.
# ---------------------------------------------------------------------------------------

_runtime = None
_runtime_lock = threading.Lock()


def runtime():
    """The runtime in use: a CupyRuntime, created (and the module compiled) on first use."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = CupyRuntime(source())
        return _runtime


def use_runtime(rt):
    """Installs another runtime (tests, one over the CuPy test double); returns the one it
    replaces (None: not created yet)."""
    global _runtime
    with _runtime_lock:
        previous, _runtime = _runtime, rt
        return previous


def to_device(state: FlatState) -> FlatState:
    """A copy of `state` with param and fields on the device (steps stay on the host)."""
    rt = runtime()
    return FlatState(rt.upload(state.param), {k: rt.upload(v) for k, v in state.fields.items()},
                     state.steps)


def to_host(state: FlatState) -> FlatState:
    rt = runtime()
    return FlatState(rt.download(state.param), {k: rt.download(v) for k, v in state.fields.items()},
                     state.steps)


# ---------------------------------------------------------------------------------------
# Plans: tile and tensor tables per layout and view, built once (host) and uploaded once
# ---------------------------------------------------------------------------------------

@dataclass
class Plan:
    tiles: np.ndarray            # TileRec per tile
    tinfo: np.ndarray            # TensorRec per tensor
    n_row_slots: int
    n_col_slots: int
    n_rows: int                  # channel view: rows of every candidate
    batches: np.ndarray          # int64 [n, 2]: (tensor, batch) of factored tensors
    row_owner: np.ndarray        # int64: tensor of each exp_avg_sq_row entry
    col_owner: np.ndarray
    dev: dict = field(default_factory=dict)   # device copies and scratch, per runtime


def _view(shape, n: int, view: View) -> tuple[int, int, int, bool]:
    """(B, R, C, rows?) of a tensor in `view`; rows? = it has row (and column) sums."""
    if view is View.CHANNEL and len(shape) > 1 and n > 0:
        return 1, shape[0], n // shape[0], True
    if view is View.FACTORED and len(shape) >= 2 and n > 0:
        return math.prod(shape[:-2]), shape[-2], shape[-1], True
    return 1, -(-n // TC), TC, False


def _build_plan(layout: FlatLayout, view: View) -> Plan:
    n_t = layout.num_tensors
    tinfo = np.full(n_t, -1, struct_dtype("TensorRec")).view(np.recarray)
    missing = np.full(n_t, -1, np.int64)
    parts = []
    n_tiles = n_row_slots = n_col_slots = n_rows = 0
    batches = []
    for t, shape in enumerate(layout.shapes):     # once per layout, not per step
        n = int(layout.sizes[t])
        b, r, c, has_rows = _view(shape, n, view)
        kr, kc = -(-r // TR), -(-c // TC)
        ti = tinfo[t]
        ti.B, ti.R, ti.C, ti.n, ti.p = b, r, c, n, layout.offsets[t]
        ti.m = layout.fields.get("exp_avg", missing)[t]
        ti.v = layout.fields.get("exp_avg_sq", missing)[t]
        ti.vm = layout.fields.get("max_exp_avg_sq", missing)[t]
        ti.ndim, ti.kc, ti.kr, ti.tile0 = len(shape), kc, kr, n_tiles
        if view is View.FACTORED and has_rows:
            ti.row = layout.fields["exp_avg_sq_row"][t]
            ti.col = layout.fields["exp_avg_sq_col"][t]
            batches.append(np.stack([np.full(b, t), np.arange(b)], axis=1))
        elif has_rows:
            ti.row = n_rows
            n_rows += b * r
        if has_rows:
            ti.rslot, ti.cslot = n_row_slots, n_col_slots
            n_row_slots += b * r * kc
            n_col_slots += b * c * kr
        bb, rr, cc = (a.ravel() for a in np.meshgrid(np.arange(b), np.arange(0, r, TR),
                                                     np.arange(0, c, TC), indexing="ij"))
        tl = np.empty(bb.size, struct_dtype("TileRec"))
        tl["tensor"], tl["batch"], tl["r0"], tl["c0"] = t, bb, rr, cc
        tl["nr"], tl["nc"] = np.minimum(TR, r - rr), np.minimum(TC, c - cc)
        parts.append(tl)
        ti.ntiles = bb.size
        n_tiles += bb.size
    tiles = np.concatenate(parts) if parts else np.zeros(0, struct_dtype("TileRec"))

    def owners(field_name: str) -> np.ndarray:
        total = layout.field_totals.get(field_name, 0) if view is View.FACTORED else 0
        out = np.full(total, -1, np.int64)
        for t in range(n_t):
            o = int(layout.fields[field_name][t]) if total else -1
            if o >= 0:
                out[o:o + math.prod(layout.field_shapes[t][field_name])] = t
        return out

    return Plan(tiles, np.asarray(tinfo), n_row_slots, n_col_slots, n_rows,
                np.concatenate(batches).astype(np.int64) if batches else np.zeros((0, 2), np.int64),
                owners("exp_avg_sq_row"), owners("exp_avg_sq_col"))


def plan(layout: FlatLayout, view: View) -> Plan:
    return layout.memo(("cuda", view), lambda: _build_plan(layout, view))


def on_device(rt, plan: Plan) -> dict:
    """The plan's tables on the device, and its scratch buffers (allocated once)."""
    if plan.dev.get("rt") is not rt:
        nonempty = lambda a: a if a.size else np.zeros(1, np.int64)   # noqa: E731
        plan.dev = {
            "rt": rt,
            "tiles": rt.upload(nonempty(flat(plan.tiles))),
            "tinfo": rt.upload(flat(plan.tinfo)),
            "batches": rt.upload(nonempty(plan.batches.reshape(-1))),
            "row_owner": rt.upload(nonempty(plan.row_owner)),
            "col_owner": rt.upload(nonempty(plan.col_owner)),
            "tile_sums": rt.empty(len(plan.tiles) * 4, np.float64),
            "sums": rt.empty(len(plan.tinfo) * 4, np.float64),
        }
    return plan.dev


# ---------------------------------------------------------------------------------------
# One step
# ---------------------------------------------------------------------------------------

@dataclass
class CudaStep:
    """What an optimizer's CUDA driver works with: the device buffers of one step and the
    plan of the optimizer's view."""
    rt: Any
    plan: Plan
    dev: dict
    param: Any
    fields: dict[str, Any]
    grad: Any
    gkind: int
    with_sums: int
    block = BLOCK
    warps = WARPS

    @property
    def n_tiles(self) -> int:
        return len(self.plan.tiles)

    @property
    def n_tensors(self) -> int:
        return len(self.plan.tinfo)

    @property
    def tiles(self):
        return self.dev["tiles"]

    @property
    def tinfo(self):
        return self.dev["tinfo"]

    @property
    def tile_sums(self):
        return self.dev["tile_sums"]

    def field(self, name: str):
        """The state buffer `name`, or a 1-element stand-in when the job has none."""
        return self.fields.get(name) if name in self.fields else self.scratch("none", 1, np.float32)

    def scratch(self, key: str, n: int, dtype):
        """A device buffer of at least n elements kept with the plan."""
        buf = self.dev.get(key)
        if buf is None or buf.size < max(n, 1):
            buf = self.dev[key] = self.rt.empty(n, dtype)
        return buf

    def table(self, struct: str) -> np.recarray:
        """A zeroed per-tensor table of CUDA struct `struct`, to fill on the host."""
        return np.zeros(self.n_tensors, struct_dtype(struct)).view(np.recarray)

    def upload(self, table: np.ndarray):
        return self.rt.upload(flat(table))

    def download(self, dev, struct: str) -> np.ndarray:
        """The per-tensor table `dev` of CUDA struct `struct`, on the host."""
        dtype = struct_dtype(struct)
        words = dtype.itemsize // 8
        return self.rt.download(dev)[:self.n_tensors * words].view(dtype)

    def launch(self, kernel: str, grid: int, *args) -> None:
        self.rt.launch(kernel, grid, BLOCK, args)


def _grad_kind(grad) -> int:
    dt = grad.dtype
    if dt == np.float32:
        return GK_F32
    if dt == np.float16:
        return GK_F16
    if dt == np.uint16 or dt.name == "bfloat16":
        return GK_BF16
    raise TypeError(f"gradients must be float32, float16 or bfloat16 (uint16 bits), not {dt}")


def step(optimizer: str, layout: FlatLayout, state: FlatState, grad: Any, active: np.ndarray,
         hyper: Hyper, *, sums: bool = True) -> StepResult:
    """One step of every active tensor, in place (the contract in kernels/backend.py).

    `state` may hold NumPy arrays (uploaded and copied back) or device arrays (stepped in
    place); `grad` may be float32, float16 or bfloat16 bits (uint16), on the host or device.
    """
    call = begin_step(registry.get(optimizer), layout, state, grad, active, hyper, sums)
    if not call.active.any():
        return call.result
    gkind = _grad_kind(grad)
    rt = runtime()
    host = not rt.is_device_array(state.param)
    up = (lambda a: rt.upload(np.ascontiguousarray(a))) if host else (lambda a: a)
    if grad.dtype.name == "bfloat16":   # ml_dtypes' bfloat16: hand the kernels the bits
        grad = grad.view(np.uint16)
    the_plan = plan(layout, call.kernel.view)
    cs = CudaStep(rt, the_plan, on_device(rt, the_plan), up(state.param),
                  {k: up(v) for k, v in state.fields.items()},
                  grad if rt.is_device_array(grad) else rt.upload(np.ascontiguousarray(grad)),
                  gkind, int(sums))
    with np.errstate(all="ignore"):   # coefficients of inactive tensors are never read
        call.kernel.cuda.run(call, cs)
    if sums:
        cs.launch("segment_sums", cs.n_tensors, cs.tinfo, cs.tile_sums, cs.dev["sums"])
        got = cs.download(cs.dev["sums"], "StepSums")
        call.result.sums = StepSums(*(np.where(call.active, got[k], 0.0)
                                      for k in ("w2", "wdw", "dw2", "g2")))
    if host:
        rt.copy_into(state.param, cs.param)
        for k, v in state.fields.items():
            rt.copy_into(v, cs.fields[k])
    return call.result



def new_state(layout: FlatLayout, params: np.ndarray):
    """A job's state on the device (kernels/cuda_state.py)."""
    from optserve.kernels.cuda_state import DeviceState
    return DeviceState(runtime(), layout, params)


def device_bytes(numel: int, tensors: int, state_bytes: int, workers: int, wire_itemsize: int) -> int:
    """What a DeviceState of this job holds: its state, a gradient buffer per worker (wire
    dtype) with its NaN/Inf counts per tile and per tensor, the sync mean, the reply's
    encoding, and the plans' tables and scratch (at most about half a byte per parameter and
    2 KiB per tensor)."""
    mean = 4 * numel if workers > 1 else 0
    per_worker = wire_itemsize * numel + 8 * (numel // (TR * TC) + 2 * tensors)
    return state_bytes + workers * per_worker + mean + 4 * numel + numel // 2 + 2048 * tensors


def worker_bytes(numel: int, tensors: int, workers: int) -> int:
    """Host memory a DeviceState holds for its workers (their gradients are on the device)."""
    from optserve.kernels.cuda_state import host_bytes_per_worker
    return workers * host_bytes_per_worker(tensors)


def device_capacity() -> int:
    """The GPU's memory; the first call creates the runtime, which compiles the kernels."""
    return runtime().memory()[1]


def set_device_limit(nbytes: int) -> None:
    """Caps the device memory the shard's pool hands out."""
    runtime().limit(nbytes)


def device_report() -> dict[str, int]:
    """Device and page-locked bytes held, and bytes copied each way (CupyRuntime.report)."""
    return runtime().report()


def is_fault(exc: BaseException) -> bool:
    """CUDA runtime and driver errors, and running out of device memory (which admission
    should have prevented): after them the device state may be half-written."""
    import cupy
    faults = (cupy.cuda.runtime.CUDARuntimeError, cupy.cuda.memory.OutOfMemoryError)
    driver = getattr(getattr(cupy.cuda, "driver", None), "CUDADriverError", None)
    return isinstance(exc, faults + ((driver,) if driver else ()))
