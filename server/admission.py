"""Whether a Step may touch its job, and its gradient received: everything that happens to
a Step before any parameter or optimizer state is read or written.

Who calls (the worker is in range and held by this client's session), which step (a retry
of an answered step, one in order, or one too late or too stale), what it carries (its
tensors, its dtype, each group's hyperparameters), and its gradient, handed chunk by chunk
as it arrives to the job's state (kernels/state.py), which keeps one buffer per worker and
checks for NaN and Inf.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterable, Iterable

import numpy as np

from optserve.proto.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from optserve.proto.spec import DropReason, dtype_name
from optserve.proto.v1 import optserve_pb2 as pb
from optserve.proto.wire import RawChunk

log = logging.getLogger("optserve.server")

if TYPE_CHECKING:
    from optserve.server.job import Job
    from optserve.server.reply import Result
    from optserve.server.segments import Segment


@dataclass
class Contribution:
    """One worker's received gradient for one step."""
    worker: int
    step: int
    local: np.ndarray             # local tensor indices, ascending (its gradient is in the
                                  # job's state, under the worker)
    groups: list[pb.Hyperparameters]
    staleness: int = 0
    nonfinite: bool = False       # holds NaN/Inf and the job's policy is to skip the step
    reply_to: np.ndarray | None = None   # the reply region of the worker's segment


class Admission:
    """A job's gate: the checks, the sessions that hold its workers, and a lock per worker
    (the state keeps one gradient per worker: a sync round holds at most one per worker,
    averaged before the worker's call ends). The locks and uploads belong to the event loop."""

    def __init__(self, job: "Job"):
        self.job = job
        self.sessions: dict[int, str] = {}           # worker -> the client that holds it
        self.sessions_lock = threading.Lock()         # never held long: taken in the event loop
        self.worker_locks: dict[int, asyncio.Lock] = {}   # made at a worker's first step
        self.uploads: dict[int, tuple[str, asyncio.Task]] = {}   # worker -> (session, call)
        self.preempted: set[asyncio.Task] = set()    # uploads cancelled by preempt()

    def worker_lock(self, worker: int) -> asyncio.Lock:
        return self.worker_locks.setdefault(worker, asyncio.Lock())

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
        with self.sessions_lock:
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

    async def receive(self, header: pb.StepHeader, receiver, chunks: AsyncIterable[RawChunk]) -> float:
        """Receives the payload into `receiver` (from `open`); returns the seconds it took.
        Each chunk is handed to the state as it arrives, in the event loop (a copy of at
        most 4 MiB: measured, a hand-off to the worker pool per chunk cost more than it
        freed); between chunks the call holds no thread, and a newer client of its worker
        may pre-empt it."""
        start = time.perf_counter()
        me = asyncio.current_task()
        self.uploads[header.worker] = (header.session, me)
        try:
            async for chunk in chunks:
                receiver.add(chunk)
        except asyncio.CancelledError:
            if me not in self.preempted:
                raise
            self.preempted.discard(me)
            if hasattr(me, "uncancel"):   # Python 3.11+: else the task still counts as cancelled
                me.uncancel()
            raise Aborted(f"job {self.job.name!r}: worker {header.worker} is held by a newer "
                          "client (registered since); this client's upload is cancelled") from None
        finally:
            if self.uploads.get(header.worker, (None, None))[1] is me:
                del self.uploads[header.worker]
        return time.perf_counter() - start

    def preempt(self, worker: int, session: str) -> None:
        """Ends an upload of `worker` by an earlier client (one that hung, or whose process
        was restarted): `session` holds the worker now (check_session passed)."""
        upload = self.uploads.get(worker)
        if session and upload is not None and upload[0] != session:
            log.info("job %r: worker %d's upload by an earlier client is cancelled: a newer "
                     "client holds the worker", self.job.name, worker)
            self.preempted.add(upload[1])
            upload[1].cancel()

    def open(self, header: pb.StepHeader, segment: "Segment | None" = None):
        """Validates the header and readies the worker's buffer for its gradient: one that
        streams in, or one in the worker's segment."""
        job = self.job
        if header.dtype != job.spec.grad_dtype:
            raise InvalidArgument(
                f"job {job.name!r}: gradients must travel as {dtype_name(job.spec.grad_dtype)}, "
                f"got {dtype_name(header.dtype)}")
        local = self.local_indices(header.tensors)
        self.check_groups(header.groups)
        job.stepper.wait_unread(header.worker)   # the last step may still read its buffer
        what = f"job {job.name!r} step {header.step} gradient"
        if segment is not None:
            return job.state.receive_shared(header.worker, header.dtype, local,
                                            segment.gradient, what)
        return job.state.receive(header.worker, header.dtype, local, what)

    def decoded(self, header: pb.StepHeader, receiver, seconds: float) -> Contribution:
        """The received gradient, once complete; refused here when non-finite under the
        refuse policy."""
        job = self.job
        local = self.local_indices(header.tensors)
        here = receiver.finish()       # this shard's part; the header speaks for the rest
        finite = here and not header.nonfinite
        job.observer.received(job, receiver.total, seconds)
        if not finite and job.spec.nonfinite != pb.NONFINITE_SKIP:
            job.observer.skipped(job, DropReason.NONFINITE)
            if here:
                raise InvalidArgument(f"job {job.name!r}: the worker's gradient is non-finite "
                                      "in tensors held by another shard; nothing is applied")
            bad = job.state.first_nonfinite(header.worker, local)
            raise InvalidArgument(f"job {job.name!r}: non-finite gradient in tensor "
                                  f"{job.spec.tensors[job.tensors[bad]].name!r}")
        return Contribution(header.worker, header.step, local, self.check_groups(header.groups),
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
            sent_options, registered = job.info.fixed_options(h), job.info.fixed_options(reg)
            if sent_options != registered:   # the state the job keeps was built under them
                changed = ", ".join(f"{name} from {was} to {now}" for (name, was), (_, now)
                                    in zip(registered, sent_options) if was != now)
                raise InvalidArgument(f"job {job.name!r}: group {g} cannot change {changed} "
                                      "after registration (the optimizer state the job keeps "
                                      "depends on it)")
            out.append(h)
        return out

