"""A job's state where its backend keeps it, and everything a shard does with it.

A shard's Job never touches parameter or optimizer-state arrays itself: it speaks to a
`JobState` (kernels/backend.py's `Backend.new_state` makes one), which receives each
worker's gradient, takes a step over some of the tensors, encodes parameters for a reply,
and copies the state to and from the host for checkpoints and the state RPCs. `HostState`
below keeps everything in NumPy, for the CPU and reference backends; the CUDA backend's
`DeviceState` (kernels/cuda_state.py) keeps it on the GPU, so that a step moves only the
wire bytes over PCIe.
"""
from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Callable, Mapping, NamedTuple, Protocol

import numpy as np

from optserve.kernels import convert
from optserve.kernels.mean import mean as rank_mean
from optserve.kernels.layout import FlatLayout, FlatState
from optserve.proto.spec import WIRE_ITEMSIZE, WIRE_NAMES
from optserve.proto.v1 import optserve_pb2 as pb
from optserve.proto.wire import CHUNK_BYTES, Assembler, RawChunk

if TYPE_CHECKING:
    from optserve.kernels.backend import StepResult
    from optserve.kernels.hyper import Hyper


class GradientReceiver(Protocol):
    """One worker's gradient payload, taken chunk by chunk as it arrives."""
    total: int

    def add(self, chunk: RawChunk) -> None: ...

    def finish(self) -> bool:
        """Checks that the payload is complete; True when every value is finite."""


class Written(NamedTuple):
    """Reply bytes an `encode` has queued: `out[:end]` holds them once `wait()` returns."""
    end: int
    wait: Callable[[], None]


def _written() -> None:
    """The `wait` of bytes a host state wrote before encode returned."""


class JobState(Protocol):
    """A job's parameters, optimizer state and per-worker gradients, and what a shard does
    with them. Calls never overlap for one job (the Job serialises them)."""
    layout: FlatLayout
    steps: np.ndarray      # int64 per tensor, on the host: the step counts t

    def receive(self, worker: int, wire: int, tensors: np.ndarray, what: str) -> GradientReceiver:
        """A receiver for `worker`'s gradient of `tensors` (local, ascending), in wire dtype
        `wire`; it replaces that worker's previous gradient."""

    def receive_shared(self, worker: int, wire: int, tensors: np.ndarray, region: np.ndarray,
                       what: str) -> GradientReceiver:
        """A receiver for `worker`'s gradient of `tensors` that lies in `region` (uint8, a
        shared-memory segment's: every tensor at its place in the flat layout, as `wire`),
        taken by `finish()` alone (no chunks are added)."""

    def first_nonfinite(self, worker: int, tensors: np.ndarray) -> int:
        """The first of `tensors` whose received gradient holds a NaN or an Inf."""

    def step(self, optimizer: str, senders: Mapping[int, np.ndarray], part: np.ndarray,
             hyper: "Hyper", sums: bool) -> "StepResult":
        """Steps the tensors of `part` with the mean, in rank order, of the gradients of the
        workers in `senders` (worker -> the tensors it sent) that sent each tensor. Their
        step counts are already incremented."""

    def reply_buffer(self, nbytes: int) -> np.ndarray:
        """A pooled uint8 host buffer for a reply (pinned where a device copies into it)."""

    def encode(self, tensors: np.ndarray, dtype: int, out: np.ndarray, pos: int) -> list[Written]:
        """Writes the parameters of `tensors` into `out` from byte `pos` on, as `dtype`, and
        says when each piece is there, in order: a device copies them in the background,
        chunk by chunk, so the first can be sent while later ones copy. A later encode, a
        step or any other call may be made before they are there; `out` must live until the
        last piece's wait() has returned."""

    def host(self) -> FlatState:
        """The state on the host, as of now (the live arrays of a host state, a fresh copy of
        a device's); read only."""

    def load(self, state: FlatState) -> None:
        """Replaces parameters, every state buffer and the step counts."""

    def write(self, fields: Mapping[tuple[int, str], np.ndarray]) -> None:
        """Replaces state buffers: (local tensor, field name) -> values of its shape."""

    def release(self) -> None:
        """Lets go of everything the state holds outside Python objects (device memory)."""


class BufferPool:
    """Byte buffers for replies, which any number of readers hold for as long as they need
    (every worker of a sync round while its reply streams out, and the retry cache until
    the worker's next step). Writing to fresh memory costs a page fault per 4 KiB page (a new
    400 MB buffer took 214 ms to fill on this machine class, a used one 36 ms), so buffers
    are kept.

    `take(n)` hands out a new view of a pooled buffer. The buffer goes back to the pool
    when that view is gone: when nothing refers to it or to anything made from it (a
    memoryview or a slice holds its base), so a buffer is never reused while it is read.
    """

    def __init__(self, allocate: Callable[[int], np.ndarray] = lambda n: np.empty(n, np.uint8),
                 keep: int = 2):
        self.allocate = allocate
        self.keep = keep                  # spare buffers kept per size
        self._spare: dict[int, list[np.ndarray]] = {}
        self._lock = threading.RLock()    # re-entrant: a finalizer may run inside take()

    def take(self, nbytes: int) -> np.ndarray:
        with self._lock:
            spare = self._spare.get(nbytes)
            base = spare.pop() if spare else None
        if base is None:
            base = self.allocate(nbytes)
        view = base[:]
        weakref.finalize(view, self._give_back, base).atexit = False
        return view

    def _give_back(self, base: np.ndarray) -> None:
        with self._lock:
            spare = self._spare.setdefault(len(base), [])
            if len(spare) < self.keep:
                spare.append(base)


def host_worker_bytes(numel: int, workers: int) -> int:
    """What a HostState holds for its workers' gradients: a float32 buffer each and, with
    several workers, the sync mean."""
    return 4 * numel * (workers + (workers > 1))


class HostState:
    """A job's state in NumPy, stepped by a host backend (cpu or reference). Each worker's
    gradient is decoded into its own float32 buffer as it arrives, reused every step; a
    float32 gradient in a worker's segment is used where it lies."""

    # Replies may be encoded into any host memory, a worker's segment too (server/stepper.py).
    encodes_to_host = True

    def __init__(self, backend, layout: FlatLayout, params: np.ndarray):
        self.backend = backend
        self.layout = layout
        self.state = FlatState.zeros(layout)
        self.state.param[:] = params
        self.steps = self.state.steps
        self.grads: dict[int, np.ndarray] = {}
        self.in_segment: set[int] = set()         # workers whose grads are their segment's
        self.mean: np.ndarray | None = None       # sync rounds of several workers
        self.replies = BufferPool()

    def receive(self, worker: int, wire: int, tensors: np.ndarray, what: str) -> GradientReceiver:
        grad = self.grads.get(worker)
        if grad is None or worker in self.in_segment:   # never decode into a worker's memory
            grad = self.grads[worker] = np.empty(self.layout.numel, np.float32)
            self.in_segment.discard(worker)
        itemsize = WIRE_ITEMSIZE[wire]
        total = int(self.layout.sizes[tensors].sum()) * itemsize
        return Decoder(total, what, WIRE_NAMES[wire], itemsize, grad, self.layout.runs(tensors))

    def receive_shared(self, worker, wire, tensors, region, what):
        if wire != pb.FLOAT32:   # widened into the worker's own buffer, as if it streamed in
            return FromSegment(self.receive(worker, wire, tensors, what), region,
                               self.layout.runs(tensors), WIRE_ITEMSIZE[wire])
        return InPlace(self, worker, region.view(np.float32), self.layout.runs(tensors))

    def first_nonfinite(self, worker: int, tensors: np.ndarray) -> int:
        grad = self.grads[worker]
        return next(int(k) for k in tensors
                    if not np.isfinite(self.layout.param_view(grad, k)).all())

    def step(self, optimizer, senders, part, hyper, sums):
        grad = self._mean(senders, part)
        mask = np.zeros(self.layout.num_tensors, bool)
        mask[part] = True
        return self.backend.step(optimizer, self.layout, self.state, grad, mask, hyper, sums=sums)

    def _mean(self, senders: Mapping[int, np.ndarray], part: np.ndarray) -> np.ndarray:
        """The gradient of the `part` tensors: one worker's own buffer, or the mean over the
        workers that sent each tensor, summed in rank order. Averaging part by part keeps
        each part's gradients in the cache for the kernel that follows."""
        layout = self.layout
        ranks = sorted(senders)
        if len(ranks) == 1:
            return self.grads[ranks[0]]
        if self.mean is None:
            self.mean = np.empty(layout.numel, np.float32)
        sent = np.zeros((len(ranks), layout.num_tensors), bool)
        for i, w in enumerate(ranks):
            sent[i, senders[w]] = True
        if sent[:, part].all():   # the usual case: every worker sent every tensor
            spans = [(o, n, ranks) for o, n in layout.runs(part)]
        else:
            spans = [(int(layout.offsets[k]), int(layout.sizes[k]),
                      [w for i, w in enumerate(ranks) if sent[i, k]]) for k in part]
        for o, n, who in spans:
            if len(who) == 1:
                np.copyto(self.mean[o:o + n], self.grads[who[0]][o:o + n])
            else:
                rank_mean(self.mean[o:o + n], [self.grads[w][o:o + n] for w in who])
        return self.mean

    def reply_buffer(self, nbytes: int) -> np.ndarray:
        return self.replies.take(nbytes)

    def encode(self, tensors, dtype, out, pos):
        itemsize, fmt = WIRE_ITEMSIZE[dtype], WIRE_NAMES[dtype]
        for o, n in self.layout.runs(tensors):
            convert.encode(self.state.param[o:o + n], fmt, out[pos:pos + n * itemsize])
            pos += n * itemsize
        return [Written(pos, _written)]

    def host(self) -> FlatState:
        return self.state

    def load(self, state: FlatState) -> None:
        check_fits(self.layout, state)
        self.state.param[:] = state.param
        for name, buf in state.fields.items():
            self.state.fields[name][:] = buf
        self.state.steps[:] = state.steps

    def write(self, fields) -> None:
        for (k, name), values in fields.items():
            self.layout.field_view(self.state, name, k)[...] = values

    def release(self) -> None:
        self.grads.clear()
        self.mean = None


def check_fits(layout: FlatLayout, state: FlatState) -> None:
    """Refuses (ValueError) a state, such as a checkpoint's, whose buffers do not fit `layout`."""
    if state.param.shape != (layout.numel,) or state.steps.shape != (layout.num_tensors,):
        raise ValueError("checkpoint parameters do not fit the job's layout")
    if set(state.fields) != set(layout.field_totals):
        raise ValueError(f"checkpoint state buffers {sorted(state.fields)} do not fit the "
                         f"job's {sorted(layout.field_totals)}")
    for name, buf in state.fields.items():
        if buf.shape != (layout.field_totals[name],):
            raise ValueError(f"checkpoint buffer {name!r} does not fit the job's layout")


class FromSegment:
    """A gradient in a worker's segment handed to a stream's receiver, run by run, as the
    chunks of a stream would be: one decoding pass, the bytes read where they lie."""

    def __init__(self, receiver: GradientReceiver, region: np.ndarray,
                 runs: list[tuple[int, int]], itemsize: int):
        self.receiver, self.region, self.runs, self.itemsize = receiver, region, runs, itemsize
        self.total = receiver.total

    def finish(self) -> bool:
        pos, size = 0, self.itemsize
        for o, n in self.runs:
            for lo in range(o * size, (o + n) * size, CHUNK_BYTES):
                hi = min(lo + CHUNK_BYTES, (o + n) * size)
                self.receiver.add(RawChunk(pos, self.region[lo:hi]))
                pos += hi - lo
        return self.receiver.finish()


class InPlace:
    """A float32 gradient in a worker's segment, stepped where it lies: its sent values are
    checked (one read), never copied. The worker writes it only between its steps; one that
    writes during its own step harms only its job (server/segments.py)."""

    def __init__(self, state: HostState, worker: int, values: np.ndarray,
                 runs: list[tuple[int, int]]):
        self.state, self.worker, self.values, self.runs = state, worker, values, runs
        self.total = 4 * sum(n for _, n in runs)

    def finish(self) -> bool:
        finite = all(convert.all_finite(self.values[o:o + n]) for o, n in self.runs)
        self.state.grads[self.worker] = self.values
        self.state.in_segment.add(self.worker)
        return finite


class Decoder(Assembler):
    """Receives a gradient payload in a wire format and decodes each chunk into its place in
    `out` (float32) as it arrives, while its bytes are still in the cache and the next
    chunk is on its way. `runs` are the (start, length) element ranges of `out` that the
    payload fills, in payload order. An element cut in two by a chunk boundary is put
    together first. `finish()` says whether every value was finite."""

    def __init__(self, total_bytes: int, what: str, wire: str, itemsize: int, out: np.ndarray,
                 runs: list[tuple[int, int]]):
        super().__init__(total_bytes, what, out=out)
        self.wire, self.itemsize, self.runs = wire, itemsize, runs
        self.run, self.in_run = 0, 0               # where the next element goes
        self.split = np.empty(itemsize, np.uint8)  # the start of an element cut by a chunk end
        self.split_len = 0
        self.finite = True

    def _land(self, data: np.ndarray) -> None:
        if self.split_len:
            take = min(self.itemsize - self.split_len, len(data))
            self.split[self.split_len:self.split_len + take] = data[:take]
            self.split_len += take
            data = data[take:]
            if self.split_len < self.itemsize:
                return
            self._decode(self.split)
            self.split_len = 0
        whole = len(data) - len(data) % self.itemsize
        if whole:
            self._decode(data[:whole])
        self.split_len = len(data) - whole
        self.split[:self.split_len] = data[whole:]

    def _decode(self, raw: np.ndarray) -> None:
        """Decodes whole elements into the runs, continuing where the last chunk stopped."""
        size = self.itemsize
        pos, n = 0, len(raw) // size
        while pos < n:
            start, length = self.runs[self.run]
            take = min(length - self.in_run, n - pos)
            dst = self.buf[start + self.in_run:start + self.in_run + take]
            self.finite &= convert.decode(raw[pos * size:(pos + take) * size], self.wire, dst)
            pos += take
            self.in_run += take
            if self.in_run == length:
                self.run, self.in_run = self.run + 1, 0

    def finish(self) -> bool:
        super().finish()
        return self.finite
