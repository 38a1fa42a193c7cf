"""One job on one shard, and the path of its Step.

A Step goes: the admission checks and the gradient received (server/admission.py) -> in
sync mode, the barrier until the quorum has sent this step (server/barrier.py) -> the step
taken (server/stepper.py: the mean in rank order, the backend call, version += 1) -> every
worker answered with the same snapshot of the updated parameters (server/reply.py).
Nothing touches the state before the whole request has been validated, so a refused request
changes nothing. Everything else a job does is here: its lifecycle (restore, checkpoint,
roll back, delete), its membership, and the reads and writes of its state.

The admission, the barrier and the stepper are parts of one job: they share its lock
(`cond`), and each keeps its own fields, which the others read under that lock.
"""
from __future__ import annotations

import logging
import threading
from typing import AsyncIterable, Awaitable, Callable, Iterable

import numpy as np

from optserve.kernels import Backend, FlatLayout, FlatState
from optserve.proto import optimizers, state_codec
from optserve.proto.errors import FailedPrecondition, InvalidArgument, NotFound
from optserve.proto.spec import WIRE_ITEMSIZE, DropReason, shard_tensors, spec_key
from optserve.proto.v1 import optserve_pb2 as pb
from optserve.proto.wire import RawChunk
from optserve.server.admission import Admission, Contribution
from optserve.server.aio import offload
from optserve.server.barrier import Barrier, Round
from optserve.server.observer import NoObserver
from optserve.server.reply import Result
from optserve.server.segments import Segment, SegmentBudget, check_key
from optserve.server.stepper import Stepper

log = logging.getLogger("optserve.server")


class Job:
    def __init__(self, spec: pb.JobSpec, shard: int, backend: Backend, params: np.ndarray,
                 barrier_timeout: float, observer=None, checkpointer=None,
                 checkpoint_every: int = 0, faults=lambda exc: None,
                 segment_budget: SegmentBudget | None = None):
        self.spec = spec
        self.name = spec.job
        self.key = spec_key(spec)
        self.shard = shard
        self.backend = backend
        self.barrier_timeout = spec.barrier_timeout_s or barrier_timeout
        self.param_dtype = spec.param_dtype or pb.FLOAT32
        self.info = optimizers.get(spec.optimizer)
        self.tensors = shard_tensors(spec, shard)
        self.local_of = {t: k for k, t in enumerate(self.tensors)}
        shapes = [tuple(spec.tensors[t].shape) for t in self.tensors]
        self.seg_group = np.array([spec.tensors[t].group for t in self.tensors], np.int64)
        self.layout = FlatLayout(shapes, [self.info.state_fields(s, spec.groups[spec.tensors[t].group])
                                          for s, t in zip(shapes, self.tensors)])
        self.state = backend.new_state(self.layout, params)   # kernels/state.py
        self.device_bytes = backend.device_bytes(
            self.layout.numel, self.layout.num_tensors, self.layout.state_bytes(),
            spec.num_workers, WIRE_ITEMSIZE[spec.grad_dtype])
        self.faults = faults      # told of every failure of a step; stops the shard on a device fault
        self.version = 0
        self.cond = threading.Condition()
        self.worker_step: dict[int, int] = {}           # the last step each worker completed
        self.results: dict[int, tuple[int, Result]] = {}   # retry cache: worker -> (step, result)
        self.observer = observer or NoObserver()
        self.checkpointer = checkpointer
        self.checkpoint_every = checkpoint_every
        self.deleted = False
        self.segment_budget = segment_budget or SegmentBudget()
        self.segments: dict[int, Segment] = {}    # worker -> its shared-memory segment
        self.rounds: Segment | None = None        # sync, several workers: every worker's replies
        self.admission = Admission(self)
        self.barrier = Barrier(self)
        self.stepper = Stepper(self)

    @property
    def sync(self) -> bool:
        return self.spec.mode == pb.SYNC

    def payload_bytes(self, local: Iterable[int], itemsize: int) -> int:
        return int(sum(self.layout.sizes[k] for k in local)) * itemsize

    def lr_divisor(self, staleness: int) -> int:
        """The staleness of a stale gradient when the job scales lr by 1/staleness, else 1."""
        return staleness if self.spec.staleness_lr and staleness > 1 else 1

    def last_step(self, worker: int) -> int:
        """The last step of `worker` the job holds: sync steps are numbered by version."""
        return self.version if self.sync else self.worker_step.get(worker, 0)

    def check_not_deleted(self) -> None:
        if self.deleted:
            raise NotFound(f"job {self.name!r} was deleted")

    # ---- Step ---------------------------------------------------------------------------
    async def step(self, header: pb.StepHeader, chunks: AsyncIterable[RawChunk],
                   send: Callable[[Result, Segment | None], Awaitable[None]]) -> None:
        """One worker's Step, in the event loop: what waits (the gradient's next chunk, the
        rest of a sync round, a step of the same worker still running or still sending)
        holds no thread. The reply is sent before the worker's next step may start, so a
        worker holds at most one reply in flight. A step that names the worker's segment
        (server/segments.py) has its gradient there, and its reply goes there."""
        gate = self.admission
        worker = gate.check_worker(header.worker)
        gate.check_session(worker, header.session)
        gate.preempt(worker, header.session)
        segment = (check_key(self.segments.get(worker), self.name, worker,
                             header.shared_memory_key) if header.shared_memory_key else None)
        async with gate.worker_lock(worker):
            early, receiver = await offload(self._begin, worker, header, segment)
            if early is not None:
                async for _ in chunks:   # the gradient of an answered step is not needed
                    pass
                return await send(early, segment)
            seconds = 0.0 if segment else await gate.receive(header, receiver, chunks)
            c, outcome = await offload(self._received, header, receiver, seconds, segment)
            if isinstance(outcome, Round):
                outcome = await self.barrier.wait(outcome, c)
            await send(outcome, segment)

    def _begin(self, worker: int, header: pb.StepHeader, segment: Segment | None):
        """(the answer, None) for a step answered already, else (None, the receiver)."""
        early = self._answered_early(worker, header)
        if early is not None:
            return early, None
        self.admission.check_order(worker, header)
        return None, self.admission.open(header, segment)

    def _received(self, header: pb.StepHeader, receiver, seconds: float, segment: Segment | None):
        c = self.admission.decoded(header, receiver, seconds)
        if segment is not None:
            c.reply_to = segment.reply
        return c, self._submit(c, header.version)

    def _answered_early(self, worker: int, header: pb.StepHeader) -> Result | None:
        return (self.admission.answered(worker, header.step)
                or self._rolled_back(worker, header.version))

    def _submit(self, c: Contribution, version: int) -> Result | Round:
        """A received gradient: dropped, stepped (async mode, or the last of a sync round),
        or added to its round (whose step `Barrier.wait` then waits for)."""
        with self.cond:
            reason = self.admission.drop_reason(c, version)
            if reason:
                return self._drop(c, reason)
            self.stepper.gate()
            self.check_not_deleted()
            if not self.sync:
                return self.stepper.take(Round(c.step, {c.worker: c}))
            return self.barrier.arrive(c)

    def settle(self, rnd: Round, result: Result) -> None:
        """Hands a taken step's result to its workers and the retry cache (lock held)."""
        rnd.result = result
        for w, c in rnd.contributions.items():
            self.results[w] = (c.step, result)
            self.worker_step[w] = c.step
        self.barrier.settled(rnd)
        rnd.settled.set()
        self.cond.notify_all()

    def _rolled_back(self, worker: int, version: int) -> Result | None:
        """The worker holds a version newer than the job's: the shard came back from a
        checkpoint. It gets the job's parameters and is told where the job stands."""
        with self.cond:
            if version <= self.version:
                return None
            self.stepper.wait_idle()
            self.observer.skipped(self, DropReason.ROLLED_BACK)
            log.info("job %r: worker %d is at version %d, the job at %d: rolled back",
                     self.name, worker, version, self.version)
            return Result(self.version, list(self.tensors), self._snapshot(self.param_dtype),
                          self.param_dtype, DropReason.ROLLED_BACK, self.last_step(worker))

    def _drop(self, c: Contribution, reason: DropReason) -> Result:
        """Answers a gradient that is not applied with the job's parameters (lock held)."""
        self.observer.skipped(self, reason)
        self.barrier.join(c.worker)   # it is alive after all: wait for it again
        if not self.sync:
            self.worker_step[c.worker] = c.step
        self.stepper.wait_idle()
        result = Result(self.version, list(self.tensors), self._snapshot(self.param_dtype),
                        self.param_dtype, reason)
        self.results[c.worker] = (c.step, result)
        log.info("job %r: dropped %s gradient of worker %d for step %d (version %d)",
                 self.name, reason.value, c.worker, c.step, self.version)
        return result

    def _snapshot(self, dtype: int) -> np.ndarray:
        """Every parameter of the job, back to back as `dtype` bytes, in a pooled buffer."""
        every = np.arange(self.layout.num_tensors)
        out = self.state.reply_buffer(self.payload_bytes(every, WIRE_ITEMSIZE[dtype]))
        self.state.encode(every, dtype, out, 0)[-1].wait()
        return out

    # ---- membership ---------------------------------------------------------------------
    def attach(self, worker: int, session: str) -> pb.AttachSharedMemoryResponse:
        """A new shared-memory segment for `worker`, replacing its last one, for the client
        that holds the worker; or why there is none."""
        self.admission.check_worker(worker)
        with self.admission.sessions_lock:
            holder = self.admission.sessions.get(worker)
        if not session or holder != session:
            raise FailedPrecondition(f"job {self.name!r}: worker {worker} is not held by this "
                                     "client: register it (RegisterJob) before attaching")
        reply_bytes = self.layout.numel * WIRE_ITEMSIZE[self.param_dtype]
        if self.sync and self.spec.num_workers > 1 and self.rounds is None:
            rounds = self.segment_budget.new(f"job {self.name!r} rounds", 0, reply_bytes)
            if isinstance(rounds, str):
                return pb.AttachSharedMemoryResponse(reason=rounds)
            with self.cond:
                rounds, self.rounds = (rounds, None) if self.rounds else (None, rounds)
            if rounds is not None:   # another worker's attach made it first
                self.segment_budget.free(rounds)
        made = self.segment_budget.new(
            f"job {self.name!r} worker {worker}",
            self.layout.numel * WIRE_ITEMSIZE[self.spec.grad_dtype], reply_bytes)
        if isinstance(made, str):
            return pb.AttachSharedMemoryResponse(reason=made)
        with self.cond:
            if self.deleted:
                self.segment_budget.free(made)
                self.check_not_deleted()
            old, self.segments[worker] = self.segments.get(worker), made
            rounds = self.rounds
        if old is not None:
            self.segment_budget.free(old)
        return pb.AttachSharedMemoryResponse(host=made.describe(),
                                             rounds=rounds.describe() if rounds else None)

    def join(self, worker: int, session: str = "", resume: bool = False) -> tuple[int, int]:
        """A worker (re)joins, held from now on by the client of `session`; returns (version,
        the last step it completed). A rank an earlier client held, in a job that has taken
        steps, joins only with `resume`."""
        with self.cond:
            self.check_not_deleted()
            if self.version and not resume and self._held_before(worker, session):
                raise FailedPrecondition(
                    f"job {self.name!r} has taken {self.version} steps and rank {worker} was held "
                    "by an earlier client: pass resume=True to continue the job with this process "
                    "(a restarted worker), or delete the job first (opt.delete_job() or "
                    "optserve.client.delete_job) to start over")
            if session:
                with self.admission.sessions_lock:
                    self.admission.sessions[worker] = session
            self.barrier.join(worker)
            return self.version, self.last_step(worker)

    def _held_before(self, worker: int, session: str) -> bool:
        """Whether another client held `worker` (a job restored from a checkpoint knows its
        workers by their steps, not their clients)."""
        holder = self.admission.sessions.get(worker)
        if holder is not None:
            return holder != session
        return worker in self.worker_step

    def leave(self, worker: int, session: str = "") -> None:
        """Sync steps stop waiting for `worker`. A client that no longer holds the worker
        cannot make it leave."""
        self.admission.check_worker(worker)
        self.admission.check_session(worker, session)
        with self.cond:
            self.check_not_deleted()
            self.barrier.leave(worker)
        log.info("job %r: worker %d left; %d present", self.name, worker, len(self.barrier.members))

    # ---- lifecycle ----------------------------------------------------------------------
    def restore(self, version: int, state: FlatState, worker_steps: dict[int, int]) -> None:
        """Takes a checkpoint's state as the job's own. Call with the lock held (or unshared)."""
        self.stepper.wait_idle()
        self.state.load(state)
        self.version = version
        self.worker_step = dict(worker_steps)
        self.results.clear()
        self.barrier.reset()
        self.cond.notify_all()

    def checkpoint(self) -> int:
        """Writes a checkpoint now; returns its version."""
        if self.checkpointer is None:
            raise FailedPrecondition("this shard has no --checkpoint-dir")
        with self.cond:
            self.stepper.wait_idle()
            self.check_not_deleted()
            self.checkpointer.save(self, self.version, self.worker_step)
            return self.version

    def roll_back(self, version: int, worker: int = 0) -> tuple[int, int]:
        """Returns the job to its checkpoint at `version` (a no-op when already there);
        returns the version and `worker`'s last step the job now holds."""
        self.admission.check_worker(worker)
        if self.checkpointer is None:
            raise FailedPrecondition("this shard has no --checkpoint-dir")
        with self.cond:
            self.stepper.wait_idle()   # the stepper writes (and prunes) checkpoints
            self.check_not_deleted()
            if version == self.version:
                return version, self.last_step(worker)
            if version not in self.checkpointer.versions(self.name):
                raise FailedPrecondition(f"job {self.name!r} has no checkpoint at version {version} "
                                         f"(has {self.checkpointer.versions(self.name)})")
            manifest, _spec, state = self.checkpointer.load_version(self.name, version)
            self.restore(version, state, {int(w): s for w, s in manifest["worker_steps"].items()})
            log.info("job %r rolled back to version %d", self.name, version)
            return version, self.last_step(worker)

    def delete(self) -> None:
        """Ends the job: a step already running finishes, steps waiting for the rest of their
        round and any later ones fail with NOT_FOUND. The caller forgets the job."""
        with self.cond:
            self.deleted = True
            self.barrier.wake()
            self.cond.notify_all()
            self.stepper.wait_idle()
        self.stepper.shutdown()
        self.state.release()
        self.release_segments()

    def release_segments(self) -> None:
        with self.cond:
            segments, self.segments = list(self.segments.values()), {}
            if self.rounds is not None:
                segments.append(self.rounds)
                self.rounds = None
        for segment in segments:
            self.segment_budget.free(segment)

    # ---- reads and writes ---------------------------------------------------------------
    def pull(self) -> Result:
        with self.cond:
            self.stepper.wait_idle()
            self.check_not_deleted()
            return Result(self.version, list(self.tensors), self._snapshot(pb.FLOAT32))

    def get_state(self) -> tuple[pb.StateHeader, bytes]:
        """The optimizer state of every tensor, in the wire form (proto/state_codec.py)."""
        with self.cond:
            self.stepper.wait_idle()
            self.check_not_deleted()
            host = self.state.host()
            header = pb.StateHeader(job=self.name, optimizer=self.spec.optimizer,
                                    version=self.version, tensors=self.tensors,
                                    steps=[int(s) for s in host.steps])
            payload = state_codec.pack(header, (
                (t, name, self.layout.field_view(host, name, k))
                for k, t in enumerate(self.tensors)
                for name in sorted(self.layout.field_shapes[k])))
            return header, payload

    def state_upload_bytes(self, header: pb.StateHeader) -> int:
        """The bytes a SetOptimizerState carries, once its header matches the job."""
        if header.optimizer != self.spec.optimizer:
            raise FailedPrecondition(f"job {self.name!r} runs {self.spec.optimizer}, "
                                     f"the state is for {header.optimizer!r}")
        if len(header.steps) != len(header.tensors):
            raise InvalidArgument("state header: steps and tensors differ in length")
        local = self.admission.local_indices(header.tensors)
        expected = {(self.tensors[k], name): shape
                    for k in local for name, shape in self.layout.field_shapes[k].items()}
        state_codec.check_layout(header, expected, f"job {self.name!r}",
                                 {t: self.spec.tensors[t].name for t, _ in expected})
        return header.total_bytes

    def set_state(self, header: pb.StateHeader, raw: np.ndarray) -> int:
        """Replaces the optimizer state of every tensor the header lists, all or nothing;
        `raw` is the payload (state_upload_bytes of it)."""
        self.state_upload_bytes(header)
        local = self.admission.local_indices(header.tensors)
        values = state_codec.unpack(header, raw)
        for (t, name), arr in values.items():
            tensor = self.spec.tensors[t].name
            if not np.isfinite(arr).all():
                raise InvalidArgument(f"non-finite optimizer state {name!r} for tensor {tensor!r}")
            if (name.startswith("exp_avg_sq") or name == "max_exp_avg_sq") and (arr < 0).any():
                raise InvalidArgument(f"negative second moment {name!r} for tensor {tensor!r}")
        with self.cond:
            self.stepper.wait_idle()
            self.check_not_deleted()
            self.state.write({(self.local_of[t], name): arr for (t, name), arr in values.items()})
            for k, s in zip(local, header.steps):
                self.state.steps[k] = s
            return self.version
