"""A job's state on the GPU: parameters and every optimizer buffer live in device memory for
the life of the job, so that a step moves only the wire bytes over PCIe.

Per step:
- each gradient chunk goes from gRPC's buffer into one of two page-locked slots of its
  worker and from there to the worker's device buffer (in the wire dtype) by an async copy
  on the job's stream, while the next chunk is received; the kernels widen 16-bit values
  as they load them;
- once the payload is in, one kernel counts NaN and Inf per tensor (a few bytes come back);
- a sync step's mean over the workers, in rank order, runs on the device (bit-identical to
  the CPU backend's), then the optimizer's kernels (kernels/cuda.py);
- the reply's parameters are encoded in the wire dtype on the device and copied into a
  page-locked reply buffer on a second stream, with an event per reply chunk: the first
  chunk is on the wire while later ones copy and the next part steps.
Host copies of the state exist only for checkpoints and the state RPCs (`host`, `load`,
`write`). Every operation of a job goes to its own stream, so jobs on one GPU overlap.
"""
from __future__ import annotations

import contextlib
from typing import Mapping

import numpy as np

from optserve.kernels import cuda
from optserve.kernels.backend import StepResult, View
from optserve.kernels.hyper import Hyper
from optserve.kernels.layout import FlatLayout, FlatState
from optserve.kernels.state import BufferPool, FromSegment, Written, check_fits
from optserve.proto.spec import WIRE_ITEMSIZE
from optserve.proto.v1 import optserve_pb2 as pb
from optserve.proto.wire import CHUNK_BYTES, Assembler

# The device dtype of a gradient in each wire dtype (bfloat16 as its bits), and the kernels'
# encoding constant.
_DEVICE_DTYPE = {pb.FLOAT32: np.float32, pb.BFLOAT16: np.uint16, pb.FLOAT16: np.float16}
_KIND = {pb.FLOAT32: cuda.GK_F32, pb.BFLOAT16: cuda.GK_BF16, pb.FLOAT16: cuda.GK_F16}
# Page-locked slots per worker: a chunk lands in one while the other's copy runs.
SLOTS = 2


def host_bytes_per_worker(tensors: int) -> int:
    """Host memory a DeviceState holds per worker: its page-locked slots and NaN/Inf counts."""
    return SLOTS * CHUNK_BYTES + 8 * tensors


class DeviceState:
    """The JobState (kernels/state.py) of the CUDA backend."""

    def __init__(self, rt, layout: FlatLayout, params: np.ndarray):
        self.rt = rt
        self.layout = layout
        self.stream = rt.stream()
        self.steps = np.zeros(layout.num_tensors, np.int64)
        self.grads: dict[int, object] = {}            # worker -> its gradient, wire dtype
        self.slots: dict[int, list[_Slot]] = {}       # worker -> its page-locked chunk slots
        self.nonfinite: dict[int, np.ndarray] = {}    # worker -> NaN/Inf count per tensor
        self.mean = None                              # float32, sync steps of several workers
        self.wire = None                              # the reply's parameters, wire dtype
        self.copier = rt.stream()                     # copies replies out while steps go on
        self.replied = None                           # the event of the last reply copy
        self.replies = BufferPool(rt.pinned)
        self.param, self.fields = None, {}
        self.load(FlatState(params, {k: np.zeros(n, np.float32)
                                     for k, n in layout.field_totals.items()}, self.steps))

    # ---- receiving ----------------------------------------------------------------------
    def receive(self, worker: int, wire: int, tensors: np.ndarray, what: str) -> "_Receiver":
        grad = self.grads.get(worker)
        if grad is None or grad.dtype != _DEVICE_DTYPE[wire]:
            grad = self.grads[worker] = self.rt.empty(self.layout.numel, _DEVICE_DTYPE[wire])
        if worker not in self.slots:
            self.slots[worker] = [_Slot(self.rt) for _ in range(SLOTS)]
        return _Receiver(self, worker, grad, WIRE_ITEMSIZE[wire], tensors, what)

    def _count_nonfinite(self, worker: int, tensors: np.ndarray) -> np.ndarray:
        """NaN and Inf per tensor in `worker`'s gradient of `tensors` (waits for the copies)."""
        grad = self.grads[worker]
        plan = cuda.plan(self.layout, View.FLAT)
        dev = cuda.on_device(self.rt, plan)
        with self.stream:
            mask = self._mask(tensors)
            # per worker: several workers' gradients may be checked at once
            per_tile = _scratch(self.rt, dev, f"nonfinite_tiles:{worker}", len(plan.tiles), np.float64)
            per_tensor = _scratch(self.rt, dev, f"nonfinite:{worker}", self.layout.num_tensors,
                                  np.float64)
            self.rt.launch("count_nonfinite", len(plan.tiles), cuda.BLOCK,
                           (dev["tiles"], dev["tinfo"], mask, grad, _kind(grad), per_tile))
            self.rt.launch("tile_totals", self.layout.num_tensors, cuda.BLOCK,
                           (dev["tinfo"], per_tile, per_tensor))
            counts = self.rt.download(per_tensor)[:self.layout.num_tensors]
        self.nonfinite[worker] = counts
        return counts

    def receive_shared(self, worker, wire, tensors, region, what):
        # uploaded from the segment as from a stream's chunks; the pinned slots stay the
        # only memory the copies read
        return FromSegment(self.receive(worker, wire, tensors, what), region,
                           self.layout.runs(tensors), WIRE_ITEMSIZE[wire])

    def first_nonfinite(self, worker: int, tensors: np.ndarray) -> int:
        counts = self.nonfinite[worker]
        return next(int(k) for k in tensors if counts[k])

    # ---- stepping -----------------------------------------------------------------------
    def step(self, optimizer: str, senders: Mapping[int, np.ndarray], part: np.ndarray,
             hyper: Hyper, sums: bool) -> StepResult:
        mask = np.zeros(self.layout.num_tensors, bool)
        mask[part] = True
        with self.stream:
            ranks = sorted(senders)
            grad = self.grads[ranks[0]] if len(ranks) == 1 else self._mean(senders, part)
            state = FlatState(self.param, self.fields, self.steps)
            return cuda.step(optimizer, self.layout, state, grad, mask, hyper, sums=sums)

    def _mean(self, senders: Mapping[int, np.ndarray], part: np.ndarray):
        """The float32 mean over the workers that sent each tensor of `part`, in rank order
        (the CPU backend's HostState._mean, on the device). Called on the job's stream."""
        ranks = sorted(senders)
        n_t = self.layout.num_tensors
        sent = np.zeros((len(ranks), n_t), np.float64)
        for i, w in enumerate(ranks):
            sent[i, senders[w]] = 1.0
        if self.mean is None:
            self.mean = self.rt.empty(self.layout.numel, np.float32)
        plan = cuda.plan(self.layout, View.FLAT)
        dev = cuda.on_device(self.rt, plan)
        pointers = np.array([self.grads[w].data.ptr for w in ranks], np.uint64)
        first = self.grads[ranks[0]]
        self.rt.launch("grad_mean", len(plan.tiles), cuda.BLOCK,
                       (dev["tiles"], dev["tinfo"], self._mask(part), self.rt.upload(pointers),
                        len(ranks), self.rt.upload(sent.reshape(-1)), n_t, _kind(first), self.mean))
        return self.mean

    def _mask(self, tensors: np.ndarray):
        mask = np.zeros(self.layout.num_tensors, np.float64)
        mask[tensors] = 1.0
        return self.rt.upload(mask)

    # ---- replying -----------------------------------------------------------------------
    def reply_buffer(self, nbytes: int) -> np.ndarray:
        return self.replies.take(nbytes)

    def encode(self, tensors: np.ndarray, dtype: int, out: np.ndarray, pos: int) -> list[Written]:
        """Encodes `tensors` on the job's stream, then copies them into `out` on the reply
        stream, one event per reply chunk (proto/wire.py's CHUNK_BYTES): the step goes on
        to its next part while these copy, and each chunk can be sent once its event has
        fired. Returns at once."""
        itemsize = WIRE_ITEMSIZE[dtype]
        if self.wire is None:
            self.wire = self.rt.empty(self.layout.numel * 4, np.uint8)
        plan = cuda.plan(self.layout, View.FLAT)
        dev = cuda.on_device(self.rt, plan)
        try:
            with self.stream:
                # A new reply (pos 0) may overwrite what the last one has yet to copy; the
                # parts of one reply write apart.
                if pos == 0 and self.replied is not None:
                    self.stream.wait_event(self.replied)
                self.rt.launch("encode_wire", len(plan.tiles), cuda.BLOCK,
                               (dev["tiles"], dev["tinfo"], self._mask(tensors), self.param,
                                self.wire, _KIND[dtype]))
            encoded = self.rt.event()
            encoded.record(self.stream)
            self.copier.wait_event(encoded)
            written = []
            for o, n in self.layout.runs(tensors):
                src, end = o * itemsize, pos + n * itemsize
                while pos < end:
                    upto = min(end, (pos // CHUNK_BYTES + 1) * CHUNK_BYTES)
                    self.rt.d2h(out[pos:upto], self.wire, src, self.copier)
                    src, pos = src + upto - pos, upto
                    if pos % CHUNK_BYTES == 0:
                        written.append(self._mark(pos))
            if not written or written[-1].end != pos:
                written.append(self._mark(pos))
        except BaseException:
            with contextlib.suppress(Exception):   # no copy may outlive `out` unseen
                self.copier.synchronize()
            raise
        return written

    def _mark(self, end: int) -> Written:
        self.replied = self.rt.event()
        self.replied.record(self.copier)
        return Written(end, self.replied.synchronize)

    # ---- the host side ------------------------------------------------------------------
    def host(self) -> FlatState:
        with self.stream:
            state = FlatState(self.rt.download(self.param),
                              {k: self.rt.download(v) for k, v in self.fields.items()},
                              self.steps.copy())
        return state

    def load(self, state: FlatState) -> None:
        check_fits(self.layout, state)
        with self.stream:
            self.param = self.rt.upload(np.ascontiguousarray(state.param, np.float32))
            self.fields = {k: self.rt.upload(np.ascontiguousarray(v, np.float32))
                           for k, v in state.fields.items()}
        self.stream.synchronize()
        self.steps[:] = state.steps

    def write(self, fields: Mapping[tuple[int, str], np.ndarray]) -> None:
        values = [(k, name, np.ascontiguousarray(v, np.float32).reshape(-1))
                  for (k, name), v in fields.items()]
        for k, name, flat in values:
            self.rt.h2d(self.fields[name], 4 * int(self.layout.fields[name][k]), flat, self.stream)
        self.stream.synchronize()   # `values` may go once this returns

    def release(self) -> None:
        self.stream.synchronize()
        self.copier.synchronize()
        self.param, self.fields, self.grads, self.slots = None, {}, {}, {}
        self.mean = self.wire = None
        self.rt.release_cached()


class _Slot:
    """A page-locked staging buffer of one chunk, and the event of the copy that last read it."""

    def __init__(self, rt):
        self.buf = rt.pinned(CHUNK_BYTES)
        self.copied = None


class _Receiver(Assembler):
    """One worker's gradient payload: each chunk is put into the worker's next free slot and
    copied from there to its place in the device buffer while the next chunk arrives. The
    payload's bytes fill the runs of `tensors` in the flat layout, in order; a chunk that
    spans runs is copied in pieces (raw bytes: an element cut by a chunk end needs nothing)."""

    def __init__(self, state: DeviceState, worker: int, grad, itemsize: int,
                 tensors: np.ndarray, what: str):
        self.state, self.worker, self.grad, self.tensors = state, worker, grad, tensors
        self.runs = [(o * itemsize, n * itemsize) for o, n in state.layout.runs(tensors)]
        super().__init__(sum(n for _, n in self.runs), what, out=np.empty(0, np.uint8))
        self.run, self.in_run = 0, 0               # where the next byte goes
        self.turn = 0                              # the next slot

    def _land(self, data: np.ndarray) -> None:
        state = self.state
        slots = state.slots[self.worker]
        slot = slots[self.turn % len(slots)]
        self.turn += 1
        if slot.copied is not None:
            slot.copied.synchronize()              # the slot's last copy has read it
        staged = slot.buf[:len(data)]
        staged[:] = data
        pos = 0
        while pos < len(data):
            start, length = self.runs[self.run]
            take = min(length - self.in_run, len(data) - pos)
            state.rt.h2d(self.grad, start + self.in_run, staged[pos:pos + take], state.stream)
            pos += take
            self.in_run += take
            if self.in_run == length:
                self.run, self.in_run = self.run + 1, 0
        slot.copied = state.rt.event()
        slot.copied.record(state.stream)

    def finish(self) -> bool:
        super().finish()
        return not self.state._count_nonfinite(self.worker, self.tensors)[self.tensors].any()


def _kind(grad) -> int:
    return {np.dtype(np.float32): cuda.GK_F32, np.dtype(np.uint16): cuda.GK_BF16,
            np.dtype(np.float16): cuda.GK_F16}[np.dtype(grad.dtype)]


def _scratch(rt, dev: dict, key: str, n: int, dtype):
    buf = dev.get(key)
    if buf is None or buf.size < max(n, 1):
        buf = dev[key] = rt.empty(n, dtype)
    return buf
