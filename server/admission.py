"""Whether a Step may touch its job, and its gradient received: everything that happens to
a Step before any parameter or optimizer state is read or written.

Who calls (the worker is in range and held by this client's session), which step (a retry
of an answered step, one in order, or one too late or too stale), what it carries (its
tensors, its dtype, each group's hyperparameters), and its gradient, decoded into the
worker's own buffer chunk by chunk as it arrives and checked for NaN and Inf on the way.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import numpy as np

from optserve.kernels import convert
from optserve.proto.errors import FailedPrecondition, InvalidArgument, NotFound
from optserve.proto.spec import WIRE_ITEMSIZE, WIRE_NAMES, DropReason, dtype_name
from optserve.proto.v1 import optserve_pb2 as pb
from optserve.proto.wire import Assembler, RawChunk

if TYPE_CHECKING:
    from optserve.server.job import Job
    from optserve.server.reply import Result


@dataclass
class Contribution:
    """One worker's received gradient for one step."""
    worker: int
    step: int
    local: np.ndarray             # local tensor indices, ascending
    grad: np.ndarray              # float32, full flat layout (only `local` segments valid)
    groups: list[pb.Hyperparameters]
    staleness: int = 0
    nonfinite: bool = False       # holds NaN/Inf and the job's policy is to skip the step


class Admission:
    """A job's gate: the checks, the sessions that hold its workers, and one gradient
    buffer per worker (reused every step under that worker's lock; a sync round holds at
    most one gradient per worker, averaged before the worker's call ends)."""

    def __init__(self, job: "Job"):
        self.job = job
        self.sessions: dict[int, str] = {}           # worker -> the client that holds it
        self.worker_locks = [threading.Lock() for _ in range(job.spec.num_workers)]
        self.grads: dict[int, np.ndarray] = {}

    def check_worker(self, worker: int) -> int:
        if worker >= self.job.spec.num_workers:
            raise InvalidArgument(f"job {self.job.name!r}: worker {worker} out of range, "
                                  f"the job has {self.job.spec.num_workers} workers")
        return worker

    def check_session(self, worker: int, session: str) -> None:
        """A worker is held by the client that registered it last (a job restored from a
        checkpoint knows none: the first to step holds it)."""
        if not session:
            return
        with self.job.cond:
            holder = self.sessions.setdefault(worker, session)
        if holder != session:
            raise FailedPrecondition(
                f"job {self.job.name!r}: worker {worker} is held by another client that "
                "registered it later (a second process with the same rank, or a restarted "
                "worker); this client's steps are refused")

    def answered(self, worker: int, step: int) -> "Result | None":
        """A retried step is answered from the result it already produced."""
        with self.job.cond:
            done = self.job.results.get(worker)
            if done is not None and done[0] == step:
                return done[1]
        return None

    def check_order(self, worker: int, header: pb.StepHeader) -> None:
        job = self.job
        with job.cond:
            if job.sync:
                ok = header.step <= job.version + 1   # earlier ones are late, not wrong
                expected = job.version + 1
            else:   # the last step again: its result was forgotten (a failed step), so it is late
                expected = job.worker_step.get(worker, 0) + 1
                ok = header.step == expected or 1 <= header.step == expected - 1
            if not ok:
                raise FailedPrecondition(
                    f"job {job.name!r}: step {header.step} from worker {worker} is out of "
                    f"order; the job is at version {job.version} and expects step {expected}")

    def receive(self, header: pb.StepHeader, chunks: Iterable[RawChunk]) -> Contribution:
        """Validates the header, receives the whole payload and decodes it. No state is touched."""
        job = self.job
        if header.dtype != job.spec.grad_dtype:
            raise InvalidArgument(
                f"job {job.name!r}: gradients must travel as {dtype_name(job.spec.grad_dtype)}, "
                f"got {dtype_name(header.dtype)}")
        local = self.local_indices(header.tensors)
        groups = self.check_groups(header.groups)
        job.stepper.wait_unread(header.worker)   # the last step may still read its buffer
        grad = self.grads.get(header.worker)
        if grad is None:
            grad = self.grads[header.worker] = np.empty(job.layout.numel, np.float32)
        itemsize = WIRE_ITEMSIZE[header.dtype]
        decoder = Decoder(job.payload_bytes(local, itemsize),
                          f"job {job.name!r} step {header.step} gradient",
                          WIRE_NAMES[header.dtype], itemsize, grad, job.layout.runs(local))
        start = time.perf_counter()
        for chunk in chunks:
            decoder.add(chunk)
        finite = decoder.finish()
        job.observer.received(job, decoder.total, time.perf_counter() - start)
        if not finite and job.spec.nonfinite != pb.NONFINITE_SKIP:
            job.observer.skipped(job, DropReason.NONFINITE)
            bad = next(k for k in local if not np.isfinite(job.layout.param_view(grad, k)).all())
            raise InvalidArgument(f"job {job.name!r}: non-finite gradient in tensor "
                                  f"{job.spec.tensors[job.tensors[bad]].name!r}")
        return Contribution(header.worker, header.step, local, grad, groups,
                            nonfinite=not finite)

    def drop_reason(self, c: Contribution, version: int) -> DropReason | None:
        """LATE for a step already taken (in sync mode, without this worker), STALE for an
        async gradient older than max_staleness. Called with the job's lock held."""
        job = self.job
        if job.sync:
            return DropReason.LATE if c.step <= job.version else None
        if c.step <= job.worker_step.get(c.worker, 0):
            return DropReason.LATE
        c.staleness = job.version - version
        if job.spec.HasField("max_staleness") and c.staleness > job.spec.max_staleness:
            return DropReason.STALE
        return None

    def local_indices(self, tensors: Iterable[int]) -> np.ndarray:
        """The job's local indices of spec tensors placed on this shard, ascending."""
        job = self.job
        out = []
        for t in tensors:
            if t not in job.local_of:
                if t >= len(job.spec.tensors):
                    raise NotFound(f"job {job.name!r} has no tensor with index {t}")
                raise NotFound(f"job {job.name!r}: tensor {job.spec.tensors[t].name!r} "
                               f"is not placed on shard {job.shard}")
            out.append(job.local_of[t])
        local = np.array(out, np.int64)
        if len(local) and (np.diff(local) <= 0).any():
            raise InvalidArgument(f"job {job.name!r}: tensor indices must be ascending and unique")
        return local

    def check_groups(self, groups) -> list[pb.Hyperparameters]:
        """This step's hyperparameters, validated as at registration; lr₀ is the registered one."""
        job = self.job
        registered = job.spec.groups
        if len(groups) != len(registered):
            raise InvalidArgument(f"job {job.name!r}: {len(groups)} parameter groups sent, "
                                  f"the job has {len(registered)}")
        out = []
        for g, (sent, reg) in enumerate(zip(groups, registered)):
            h = pb.Hyperparameters()
            h.CopyFrom(sent)
            h.initial_lr = reg.initial_lr
            job.info.validate(h)
            if h.HasField("adafactor_beta1") != reg.HasField("adafactor_beta1"):
                raise InvalidArgument(f"job {job.name!r}: group {g} cannot switch Adafactor's "
                                      "beta1 between None and a value after registration")
            out.append(h)
        return out


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
