"""One job's state on one shard, and the rules of its Step.

A Step goes: validate the header -> receive every chunk into a buffer -> decode and check
the gradient -> admit it (in order? late? too stale?) -> [sync] wait until the quorum of
workers has sent this step -> average in rank order -> the backend call(s) over the flat
state -> version += 1 -> answer everyone with the same snapshot of the updated parameters.
Nothing touches the state before the whole request has been validated, so a refused
request changes nothing.

A step whose reply spans several chunks runs on the job's stepper thread, in parts of
whole tensors: each part is stepped, its parameters are encoded into the reply, and the
handlers stream that part while the next one is stepped (Result.chunks). Until it is
done, everything else that reads or writes the state waits (_wait_idle).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from optserve.kernels import FlatLayout, FlatState, Hyper, StepResult, convert
from optserve.proto import optimizers
from optserve.proto.errors import (DeadlineExceeded, FailedPrecondition, InvalidArgument,
                                   NotFound)
from optserve.proto.spec import WIRE_ITEMSIZE, WIRE_NAMES, dtype_name, shard_tensors, spec_key
from optserve.proto.v1 import optserve_pb2 as pb
from optserve.proto.wire import CHUNK_BYTES, Assembler, RawChunk, chunked
from optserve.server.payloads import Decoder, Progress, SnapshotPool

log = logging.getLogger("optserve.server")

# Why a gradient was received but not applied; a closed set (metric labels use it).
LATE, STALE, NONFINITE, ROLLED_BACK = "late", "stale", "nonfinite", "rolled_back"

# A step on the stepper thread runs in parts of at least one reply chunk, and at most this
# many: each part is one backend call.
MAX_PARTS = 16


@dataclass
class Result:
    """What a step answers: parameters (in the job's param wire dtype) after it."""
    version: int
    tensors: list[int]            # spec indices, in payload order
    payload: np.ndarray           # uint8, from the job's SnapshotPool
    dtype: int = pb.FLOAT32
    dropped: str = ""             # "" when applied, else LATE, STALE, NONFINITE or ROLLED_BACK
    last_step: int = 0
    progress: Progress | None = None   # while the step still writes the payload

    def chunks(self) -> Iterator[RawChunk]:
        """The payload in chunks, each as soon as the step has written it."""
        for chunk in chunked(self.payload):
            if self.progress is not None:
                self.progress.wait(chunk.offset + len(chunk.data))
            yield chunk


@dataclass
class Contribution:
    worker: int
    step: int
    local: np.ndarray             # local tensor indices, ascending
    grad: np.ndarray              # float32, full flat layout (only `local` segments valid)
    groups: list[pb.Hyperparameters]
    staleness: int = 0
    nonfinite: bool = False       # holds NaN/Inf and the job's policy is to skip the step


@dataclass
class Round:
    """Gradients gathered for one sync step."""
    step: int
    contributions: dict[int, Contribution] = field(default_factory=dict)
    result: Result | None = None


@dataclass
class StepReport:
    """What one finished step measured, for the job's observer (the metrics recorder)."""
    compute_seconds: float
    active: np.ndarray            # bool per local tensor
    result: StepResult            # the backend's per-tensor reports and sums
    groups: list[pb.Hyperparameters]
    workers: int
    staleness: int
    version: int                  # the version the step produced
    lr_divisor: int               # the groups' lr was applied divided by this (staleness_lr)


@dataclass
class StepWork:
    """A step as decided under the job's lock, for _run_step to carry out."""
    version: int
    contributions: dict[int, Contribution]
    skip: bool                    # a non-finite gradient under the skip policy: no arithmetic
    active: np.ndarray            # bool per local tensor: what is stepped
    shown: np.ndarray             # local tensors whose parameters the reply carries, in order
    hyper: Hyper
    sums: bool                    # whether the observer wants the float64 step sums
    result: Result
    checkpoint: dict[int, int] | None   # worker steps, when a checkpoint is due at `version`


class NoObserver:
    """Observes nothing: a job without metrics."""

    def registered(self, job): pass
    def received(self, job, nbytes, seconds): pass
    def waited(self, job, seconds): pass
    def sent(self, job, nbytes, seconds): pass
    def skipped(self, job, reason): pass
    def members_changed(self, job): pass
    def deleted(self, job): pass
    def stepped(self, job, report): pass
    def wants_sums(self, job): return False


class Job:
    def __init__(self, spec: pb.JobSpec, shard: int, backend, params: np.ndarray,
                 barrier_timeout: float, observer=None, checkpointer=None,
                 checkpoint_every: int = 0):
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
        self.state = FlatState.zeros(self.layout)
        self.state.param[:] = params
        self.version = 0
        self.cond = threading.Condition()
        self.round: Round | None = None
        self.members = set(range(spec.num_workers))   # workers a sync step waits for
        self.worker_step: dict[int, int] = {}
        self.sessions: dict[int, str] = {}           # worker -> the client that holds it
        self.results: dict[int, tuple[int, Result]] = {}
        self.worker_locks = [threading.Lock() for _ in range(spec.num_workers)]
        # Each worker's gradient lands in its own buffer, reused every step under its worker
        # lock: a sync round holds at most one gradient per worker, averaged before the
        # worker's call ends.
        self.grads: dict[int, np.ndarray] = {}
        self.mean_grad: np.ndarray | None = None      # sync rounds of several workers
        self.snapshots = SnapshotPool()
        self.observer = observer or NoObserver()
        self.checkpointer = checkpointer
        self.checkpoint_every = checkpoint_every
        # While a step runs on the stepper, `pending` > 0 and `reading` names the workers
        # whose gradient buffers it still reads.
        self.pending = 0
        self.reading: set[int] = set()
        self.idle_waiters = 0     # threads in _wait_idle; new steps wait for them (_apply)
        self._stepper: ThreadPoolExecutor | None = None
        self.deleted = False

    def _wait_idle(self) -> None:
        """Waits until no step is running on the stepper. Call with the lock held. While it
        waits, no new step starts, or a busy async job would never be idle."""
        self.idle_waiters += 1
        try:
            self.cond.wait_for(lambda: self.pending == 0)
        finally:
            self.idle_waiters -= 1
            self.cond.notify_all()

    def restore(self, version: int, state: FlatState, worker_steps: dict[int, int]) -> None:
        """Takes a checkpoint's state as the job's own. Call with the lock held (or unshared)."""
        self._wait_idle()
        for name, buf in [("param", state.param), *state.fields.items()]:
            mine = self.state.param if name == "param" else self.state.fields.get(name)
            if mine is None or mine.shape != buf.shape:
                raise ValueError(f"checkpoint buffer {name!r} does not fit the job's layout")
        self.state.param[:] = state.param
        for name, buf in state.fields.items():
            self.state.fields[name][:] = buf
        self.state.steps[:] = state.steps
        self.version = version
        self.worker_step = dict(worker_steps)
        self.results.clear()
        self.round = None
        self.cond.notify_all()

    def checkpoint(self) -> int:
        """Writes a checkpoint now; returns its version."""
        if self.checkpointer is None:
            raise FailedPrecondition("this shard has no --checkpoint-dir")
        with self.cond:
            self._wait_idle()
            self._check_not_deleted()
            self.checkpointer.save(self, self.version, self.worker_step)
            return self.version

    def roll_back(self, version: int, worker: int = 0) -> tuple[int, int]:
        """Returns the job to its checkpoint at `version` (a no-op when already there);
        returns the version and `worker`'s last step the job now holds."""
        self._check_worker(worker)
        if self.checkpointer is None:
            raise FailedPrecondition("this shard has no --checkpoint-dir")
        with self.cond:
            self._wait_idle()   # the stepper writes (and prunes) checkpoints
            self._check_not_deleted()
            if version == self.version:
                return version, self._last_step(worker)
            if version not in self.checkpointer.versions(self.name):
                raise FailedPrecondition(f"job {self.name!r} has no checkpoint at version {version} "
                                         f"(has {self.checkpointer.versions(self.name)})")
            manifest, _spec, state = self.checkpointer.load_version(self.name, version)
            self.restore(version, state, {int(w): s for w, s in manifest["worker_steps"].items()})
            log.info("job %r rolled back to version %d", self.name, version)
            return version, self._last_step(worker)

    def _last_step(self, worker: int) -> int:
        """The last step of `worker` the job holds: sync steps are numbered by version."""
        return self.version if self.sync else self.worker_step.get(worker, 0)

    @property
    def sync(self) -> bool:
        return self.spec.mode == pb.SYNC

    def payload_bytes(self, local: Iterable[int], itemsize: int) -> int:
        return int(sum(self.layout.sizes[k] for k in local)) * itemsize

    def delete(self) -> None:
        """Ends the job: a step already running finishes, steps waiting for the rest of their
        round and any later ones fail with NOT_FOUND. The caller forgets the job."""
        with self.cond:
            self.deleted = True
            self.cond.notify_all()
            self._wait_idle()
        if self._stepper is not None:
            self._stepper.shutdown(wait=False)

    def _check_not_deleted(self) -> None:
        if self.deleted:
            raise NotFound(f"job {self.name!r} was deleted")

    # ---- membership ---------------------------------------------------------------------
    def join(self, worker: int, session: str = "") -> tuple[int, int]:
        """A worker (re)joins, held from now on by the client of `session`; returns (version,
        the last step it completed)."""
        with self.cond:
            self._check_not_deleted()
            if session:
                self.sessions[worker] = session
            self.members.add(worker)
            self.observer.members_changed(self)
            return self.version, self._last_step(worker)

    def leave(self, worker: int, session: str = "") -> None:
        """Sync steps stop waiting for `worker`; a waiting round may now be complete. A client
        that no longer holds the worker cannot make it leave."""
        self._check_worker(worker)
        self._check_session(worker, session)
        with self.cond:
            self._check_not_deleted()
            self.members.discard(worker)
            self.observer.members_changed(self)
            if self.round is not None and self._quorum_reached(self.round):
                self._finish(self.round)
        log.info("job %r: worker %d left; %d present", self.name, worker, len(self.members))

    def _quorum(self) -> int:
        return max(1, len(self.members) - self.spec.backup_workers)

    def _quorum_reached(self, rnd: Round) -> bool:
        return bool(rnd.contributions) and len(rnd.contributions) >= self._quorum()

    # ---- Step ---------------------------------------------------------------------------
    def step(self, header: pb.StepHeader, chunks: Iterable[RawChunk]) -> Result:
        worker = self._check_worker(header.worker)
        self._check_session(worker, header.session)
        with self.worker_locks[worker]:
            cached = self._cached_result(worker, header.step)
            if cached is not None:
                _drain(chunks)
                return cached
            rolled_back = self._rolled_back(worker, header.version)
            if rolled_back is not None:
                _drain(chunks)
                return rolled_back
            self._check_order(worker, header)
            contribution = self._receive(header, chunks)
            with self.cond:
                reason = self._drop_reason(contribution, header.version)
                if reason:
                    return self._drop(contribution, reason)
            return self._apply(contribution)

    def _check_worker(self, worker: int) -> int:
        if worker >= self.spec.num_workers:
            raise InvalidArgument(f"job {self.name!r}: worker {worker} out of range, "
                                  f"the job has {self.spec.num_workers} workers")
        return worker

    def _check_session(self, worker: int, session: str) -> None:
        """A worker is held by the client that registered it last (a job restored from a
        checkpoint knows none: the first to step holds it)."""
        if not session:
            return
        with self.cond:
            holder = self.sessions.setdefault(worker, session)
        if holder != session:
            raise FailedPrecondition(
                f"job {self.name!r}: worker {worker} is held by another client that registered "
                "it later (a second process with the same rank, or a restarted worker); this "
                "client's steps are refused")

    def _cached_result(self, worker: int, step: int) -> Result | None:
        """A retried step is answered from the result it already produced."""
        with self.cond:
            done = self.results.get(worker)
            if done is not None and done[0] == step:
                return done[1]
        return None

    def _rolled_back(self, worker: int, version: int) -> Result | None:
        """The worker holds a version newer than the job's: the shard came back from a
        checkpoint. It gets the job's parameters and is told where the job stands."""
        with self.cond:
            if version <= self.version:
                return None
            self._wait_idle()
            self.observer.skipped(self, ROLLED_BACK)
            log.info("job %r: worker %d is at version %d, the job at %d: rolled back",
                     self.name, worker, version, self.version)
            return Result(self.version, list(self.tensors),
                          self._snapshot(np.arange(self.layout.num_tensors), self.param_dtype),
                          self.param_dtype, ROLLED_BACK, self._last_step(worker))

    def _check_order(self, worker: int, header: pb.StepHeader) -> None:
        with self.cond:
            if self.sync:
                ok = header.step <= self.version + 1   # earlier ones are late, not wrong
                expected = self.version + 1
            else:   # the last step again: its result was forgotten (_forget), so it is late
                expected = self.worker_step.get(worker, 0) + 1
                ok = header.step == expected or 1 <= header.step == expected - 1
            if not ok:
                raise FailedPrecondition(
                    f"job {self.name!r}: step {header.step} from worker {worker} is out of order; "
                    f"the job is at version {self.version} and expects step {expected}")

    def _drop_reason(self, c: Contribution, version: int) -> str:
        """LATE for a step already taken (in sync mode, without this worker), STALE for an
        async gradient older than max_staleness. Called with the lock held."""
        if self.sync:
            return LATE if c.step <= self.version else ""
        if c.step <= self.worker_step.get(c.worker, 0):
            return LATE
        c.staleness = self.version - version
        if self.spec.HasField("max_staleness") and c.staleness > self.spec.max_staleness:
            return STALE
        return ""

    def _drop(self, c: Contribution, reason: str) -> Result:
        self.observer.skipped(self, reason)
        self.members.add(c.worker)  # it is alive after all: wait for it again
        self.observer.members_changed(self)
        if not self.sync:
            self.worker_step[c.worker] = c.step
        self._wait_idle()
        all_local = np.arange(self.layout.num_tensors)
        result = Result(self.version, list(self.tensors),
                        self._snapshot(all_local, self.param_dtype), self.param_dtype, reason)
        self.results[c.worker] = (c.step, result)
        log.info("job %r: dropped %s gradient of worker %d for step %d (version %d)",
                 self.name, reason, c.worker, c.step, self.version)
        return result

    def _receive(self, header: pb.StepHeader, chunks: Iterable[RawChunk]) -> Contribution:
        """Validates the header, receives the whole payload and decodes it. No state is touched."""
        if header.dtype != self.spec.grad_dtype:
            raise InvalidArgument(
                f"job {self.name!r}: gradients must travel as {dtype_name(self.spec.grad_dtype)}, "
                f"got {dtype_name(header.dtype)}")
        local = self._local_indices(header.tensors)
        groups = self._check_groups(header.groups)
        with self.cond:   # the last step may still read this worker's buffer
            self.cond.wait_for(lambda: header.worker not in self.reading)
        grad = self.grads.get(header.worker)
        if grad is None:
            grad = self.grads[header.worker] = np.empty(self.layout.numel, np.float32)
        itemsize = WIRE_ITEMSIZE[header.dtype]
        decoder = Decoder(self.payload_bytes(local, itemsize),
                          f"job {self.name!r} step {header.step} gradient",
                          WIRE_NAMES[header.dtype], itemsize, grad, self._runs(local))
        start = time.perf_counter()
        for chunk in chunks:
            decoder.add(chunk)
        finite = decoder.finish()
        self.observer.received(self, decoder.total, time.perf_counter() - start)
        if not finite and self.spec.nonfinite != pb.NONFINITE_SKIP:
            self.observer.skipped(self, NONFINITE)
            bad = next(k for k in local if not np.isfinite(self.layout.param_view(grad, k)).all())
            raise InvalidArgument(f"job {self.name!r}: non-finite gradient in tensor "
                                  f"{self.spec.tensors[self.tensors[bad]].name!r}")
        return Contribution(header.worker, header.step, local, grad, groups,
                            nonfinite=not finite)

    def _runs(self, local: np.ndarray) -> list[tuple[int, int]]:
        """The (start, length) ranges of the flat layout that the `local` tensors fill, in
        order, neighbours merged."""
        runs: list[tuple[int, int]] = []
        for k in local:
            o, n = int(self.layout.offsets[k]), int(self.layout.sizes[k])
            if runs and runs[-1][0] + runs[-1][1] == o:
                runs[-1] = (runs[-1][0], runs[-1][1] + n)
            else:
                runs.append((o, n))
        return runs

    def _local_indices(self, tensors: Iterable[int]) -> np.ndarray:
        out = []
        for t in tensors:
            if t not in self.local_of:
                if t >= len(self.spec.tensors):
                    raise NotFound(f"job {self.name!r} has no tensor with index {t}")
                raise NotFound(f"job {self.name!r}: tensor {self.spec.tensors[t].name!r} "
                               f"is not placed on shard {self.shard}")
            out.append(self.local_of[t])
        local = np.array(out, np.int64)
        if len(local) and (np.diff(local) <= 0).any():
            raise InvalidArgument(f"job {self.name!r}: tensor indices must be ascending and unique")
        return local

    def _check_groups(self, groups) -> list[pb.Hyperparameters]:
        registered = self.spec.groups
        if len(groups) != len(registered):
            raise InvalidArgument(f"job {self.name!r}: {len(groups)} parameter groups sent, "
                                  f"the job has {len(registered)}")
        out = []
        for g, (sent, reg) in enumerate(zip(groups, registered)):
            h = pb.Hyperparameters()
            h.CopyFrom(sent)
            h.initial_lr = reg.initial_lr   # lr₀ is the one recorded at registration
            self.info.validate(h)
            if h.HasField("adafactor_beta1") != reg.HasField("adafactor_beta1"):
                raise InvalidArgument(f"job {self.name!r}: group {g} cannot switch Adafactor's "
                                      "beta1 between None and a value after registration")
            out.append(h)
        return out

    def _apply(self, c: Contribution) -> Result:
        with self.cond:
            self.cond.wait_for(lambda: not self.idle_waiters)
            self._check_not_deleted()
            if not self.sync:
                return self._finish(Round(c.step, {c.worker: c}))
            self.members.add(c.worker)
            if self.round is None:
                self.round = Round(c.step)
            rnd = self.round
            rnd.contributions[c.worker] = c
            if self._quorum_reached(rnd):
                self.observer.waited(self, 0.0)
                return self._finish(rnd)
            start = time.perf_counter()
            self.cond.wait_for(lambda: rnd.result is not None or self.deleted,
                               timeout=self.barrier_timeout)
            self.observer.waited(self, time.perf_counter() - start)
            if rnd.result is not None:
                return rnd.result
            self._check_not_deleted()
            return self._barrier_timed_out(rnd, c)

    def _barrier_timed_out(self, rnd: Round, c: Contribution) -> Result:
        """Proceed with the workers present, or withdraw this gradient and fail the step."""
        missing = sorted(self.members - set(rnd.contributions))
        if self.spec.proceed_on_timeout:
            log.warning("job %r: step %d waited %.3gs; presuming workers %s gone, stepping with %d",
                        self.name, rnd.step, self.barrier_timeout, missing, len(rnd.contributions))
            self.members -= set(missing)
            self.observer.members_changed(self)
            return self._finish(rnd)
        del rnd.contributions[c.worker]
        if not rnd.contributions:
            self.round = None
        raise DeadlineExceeded(
            f"job {self.name!r}: step {c.step} timed out after {self.barrier_timeout:g}s "
            f"waiting for workers {missing}; nothing was applied, retry the step")

    def _finish(self, rnd: Round) -> Result:
        """Takes the round's step: the decisions here, the arithmetic in _run_step. A step
        whose reply fits one chunk runs inline; a larger one on the stepper thread, so its
        reply starts streaming after its first part. Called with the lock held."""
        skip = any(c.nonfinite for c in rnd.contributions.values())
        if skip:
            self.observer.skipped(self, NONFINITE)
        active = np.zeros(self.layout.num_tensors, bool)
        if not skip:
            for c in rnd.contributions.values():
                active[c.local] = True
        shown = np.arange(self.layout.num_tensors) if skip else np.flatnonzero(active)
        first = rnd.contributions[min(rnd.contributions)]
        sums = not skip and self.observer.wants_sums(self)
        version = self.version + 1
        itemsize = WIRE_ITEMSIZE[self.param_dtype]
        result = Result(version, [self.tensors[k] for k in shown],
                        self.snapshots.take(self.payload_bytes(shown, itemsize)),
                        self.param_dtype, NONFINITE if skip else "")
        due = not skip and self.checkpoint_every and version % self.checkpoint_every == 0
        steps_after = {**self.worker_step, **{w: c.step for w, c in rnd.contributions.items()}}
        work = StepWork(version, dict(rnd.contributions), skip, active, shown,
                        self._hyper(first.groups, first.staleness), sums, result,
                        steps_after if due else None)
        inline = (self.pending == 0 and len(result.payload) <= CHUNK_BYTES
                  or not self.backend.steps_in_parts)
        if inline:
            self._run_step(work)   # a failure raises here, before anything is settled
        else:
            result.progress = Progress()
        self.version = version
        self._settle(rnd, result)
        if not inline:
            self._submit(work)
        return result

    def _submit(self, work: StepWork) -> None:
        """Hands a settled step to the stepper thread. Called with the lock held."""
        if self._stepper is None:
            self._stepper = ThreadPoolExecutor(1, thread_name_prefix=f"optserve-step-{self.name}")
        try:
            self._stepper.submit(self._run_step, work)
        except RuntimeError as exc:   # the interpreter is shutting down
            self._forget(work)
            work.result.progress.fail(exc)
            raise
        self.pending += 1
        self.reading |= set(work.contributions)

    def _run_step(self, work: StepWork) -> None:
        """Steps the tensors part by part, writing each part's parameters into the reply as
        soon as it is done, then reports and checkpoints. The reply's last part is released
        only then, so a worker whose step has returned sees its metrics and checkpoint. On
        the stepper, it ends by letting the next step (or any reader of the state) go."""
        progress = work.result.progress
        try:
            result, seconds = self._step_parts(work)
            if not work.skip:
                first = work.contributions[min(work.contributions)]
                self.observer.stepped(self, StepReport(
                    seconds, work.active, result, first.groups, len(work.contributions),
                    first.staleness, work.version, self._lr_divisor(first.staleness)))
        except BaseException as exc:
            if progress is None:
                raise
            log.exception("job %r: step to version %d failed", self.name, work.version)
            self._forget(work)
            progress.fail(exc)
        else:
            self._checkpoint(work)
            if progress is not None:
                progress.advance(len(work.result.payload))
        finally:
            if progress is not None:
                with self.cond:
                    self.pending -= 1
                    self.reading -= set(work.contributions)
                    self.cond.notify_all()

    def _checkpoint(self, work: StepWork) -> None:
        """Writes the checkpoint due at this step, if one is. A failed write is logged, not
        raised: the step itself is taken, and the next due step tries again."""
        if work.checkpoint is None:
            return
        try:
            self.checkpointer.save(self, work.version, work.checkpoint)
        except Exception:
            log.exception("job %r: checkpoint at version %d failed", self.name, work.version)

    def _forget(self, work: StepWork) -> None:
        """Takes a failed step's result out of the retry cache: a retry is then a late step
        (_drop_reason) and gets the parameters as they are, not the failure again."""
        with self.cond:
            for w in work.contributions:
                if self.results.get(w, (0, None))[1] is work.result:
                    del self.results[w]

    def _step_parts(self, work: StepWork) -> tuple[dict, float]:
        """The step's arithmetic and its reply; returns the backend's per-tensor statistics
        and the seconds spent in the backend."""
        progress, payload = work.result.progress, work.result.payload
        result, seconds, pos = None, 0.0, 0
        parts = self._parts(work.shown, WIRE_ITEMSIZE[self.param_dtype])
        for i, part in enumerate(parts):
            if not work.skip:
                grad = self._average(work.contributions, part)
                mask = np.zeros(self.layout.num_tensors, bool)
                mask[part] = True
                start = time.perf_counter()
                self.state.steps[part] += 1
                try:
                    out = self.backend.step(self.spec.optimizer, self.layout, self.state, grad,
                                            mask, work.hyper, sums=work.sums)
                except BaseException:
                    self.state.steps[part] -= 1   # a backend that fails before it writes leaves no trace
                    raise
                seconds += time.perf_counter() - start
                if result is None:
                    result = out
                else:
                    result.take(out, mask)
            pos = self._encode(part, self.param_dtype, payload, pos)
            if progress is not None and i < len(parts) - 1:   # the last waits for _run_step
                progress.advance(pos)
        return result, seconds

    def _parts(self, local: np.ndarray, itemsize: int) -> list[np.ndarray]:
        """`local` as runs of whole tensors of at least one reply chunk each (one run when
        the backend steps in one call), each stepped and sent as soon as it is done."""
        if not self.backend.steps_in_parts:
            return [local]
        nbytes = self.layout.sizes[local] * itemsize
        target = max(CHUNK_BYTES, int(nbytes.sum()) // MAX_PARTS)
        part = (np.cumsum(nbytes) - nbytes) // target   # where each tensor starts
        return np.split(local, np.flatnonzero(np.diff(part)) + 1)

    def _settle(self, rnd: Round, result: Result) -> None:
        """Hands the round's result to its workers and the retry cache."""
        rnd.result = result
        for w, c in rnd.contributions.items():
            self.results[w] = (c.step, result)
            self.worker_step[w] = c.step
        if self.round is rnd:
            self.round = None
        self.cond.notify_all()

    def _average(self, contributions: dict[int, Contribution], part: np.ndarray) -> np.ndarray:
        """The gradient of the `part` tensors: one worker's own buffer, or the mean over the
        workers that sent each tensor, summed in rank order. Averaging part by part keeps
        each part's gradients in the cache for the kernel that follows."""
        ranks = sorted(contributions)
        if len(ranks) == 1:
            return contributions[ranks[0]].grad
        if self.mean_grad is None:
            self.mean_grad = np.empty(self.layout.numel, np.float32)
        sent = np.zeros((len(ranks), self.layout.num_tensors), bool)
        for i, w in enumerate(ranks):
            sent[i, contributions[w].local] = True
        if sent[:, part].all():   # the usual case: every worker sent every tensor
            spans = [(o, n, ranks) for o, n in self._runs(part)]
        else:
            spans = [(int(self.layout.offsets[k]), int(self.layout.sizes[k]),
                      [w for i, w in enumerate(ranks) if sent[i, k]]) for k in part]
        for o, n, senders in spans:
            mean = self.mean_grad[o:o + n]
            np.copyto(mean, contributions[senders[0]].grad[o:o + n])
            for w in senders[1:]:
                mean += contributions[w].grad[o:o + n]
            mean /= np.float32(len(senders))
        return self.mean_grad

    def _hyper(self, groups: list[pb.Hyperparameters], staleness: int) -> Hyper:
        return Hyper.from_groups(groups, self.seg_group, self._lr_divisor(staleness))

    def _lr_divisor(self, staleness: int) -> int:
        """The staleness of a stale gradient when the job scales lr by 1/staleness, else 1."""
        return staleness if self.spec.staleness_lr and staleness > 1 else 1

    def _snapshot(self, local: np.ndarray, dtype: int) -> np.ndarray:
        """The parameters of the `local` tensors, back to back as `dtype` bytes."""
        out = self.snapshots.take(self.payload_bytes(local, WIRE_ITEMSIZE[dtype]))
        self._encode(local, dtype, out, 0)
        return out

    def _encode(self, local: np.ndarray, dtype: int, out: np.ndarray, pos: int) -> int:
        """Writes the parameters of the `local` tensors into `out` from byte `pos` on, as
        `dtype`; returns where they end."""
        itemsize, fmt = WIRE_ITEMSIZE[dtype], WIRE_NAMES[dtype]
        for o, n in self._runs(local):
            convert.encode(self.state.param[o:o + n], fmt, out[pos:pos + n * itemsize])
            pos += n * itemsize
        return pos

    # ---- reads and writes ---------------------------------------------------------------
    def pull(self) -> Result:
        with self.cond:
            self._wait_idle()
            self._check_not_deleted()
            return Result(self.version, list(self.tensors),
                          self._snapshot(np.arange(self.layout.num_tensors), pb.FLOAT32))

    def state_header_and_payload(self) -> tuple[pb.StateHeader, bytes]:
        with self.cond:
            self._wait_idle()
            self._check_not_deleted()
            header = pb.StateHeader(job=self.name, optimizer=self.spec.optimizer,
                                    version=self.version, tensors=self.tensors,
                                    steps=[int(s) for s in self.state.steps])
            parts, offset = [], 0
            for k, t in enumerate(self.tensors):
                for name, shape in sorted(self.layout.field_shapes[k].items()):
                    data = self.layout.field_view(self.state, name, k).tobytes()
                    header.entries.add(tensor=t, field=name, shape=shape, offset=offset)
                    parts.append(data)
                    offset += len(data)
            header.total_bytes = offset
            return header, b"".join(parts)

    def set_state(self, header: pb.StateHeader, chunks: Iterable[RawChunk]) -> int:
        """Replaces the optimizer state of every tensor the header lists, all or nothing."""
        if header.optimizer != self.spec.optimizer:
            raise FailedPrecondition(f"job {self.name!r} runs {self.spec.optimizer}, "
                                     f"the state is for {header.optimizer!r}")
        if len(header.steps) != len(header.tensors):
            raise InvalidArgument("state header: steps and tensors differ in length")
        local = self._local_indices(header.tensors)
        expected = self._expected_entries(local)
        got = {(e.tensor, e.field): e for e in header.entries}
        if set(got) != set(expected) or len(got) != len(header.entries):
            raise InvalidArgument(f"job {self.name!r}: state entries {sorted(got)} do not match "
                                  f"the expected fields {sorted(expected)}")
        total = 0
        for e in sorted(header.entries, key=lambda e: e.offset):
            shape = expected[(e.tensor, e.field)]
            if tuple(e.shape) != shape:
                raise InvalidArgument(f"job {self.name!r}: state {e.field!r} of tensor "
                                      f"{self.spec.tensors[e.tensor].name!r} has shape "
                                      f"{tuple(e.shape)}, expected {shape}")
            if e.offset != total:
                raise InvalidArgument(f"state entries must be contiguous: {e.field!r} of tensor "
                                      f"{e.tensor} at byte {e.offset}, expected {total}")
            total += 4 * math.prod(shape)
        if header.total_bytes != total:  # checked before anything is allocated
            raise InvalidArgument(f"state payload declared as {header.total_bytes} bytes, "
                                  f"its entries need {total}")
        raw = Assembler(header.total_bytes, f"job {self.name!r} optimizer state")
        for chunk in chunks:
            raw.add(chunk)
        payload = raw.finish()
        values = {}
        for key, shape in expected.items():
            e = got[key]
            arr = payload[e.offset:e.offset + 4 * math.prod(shape)].view("<f4")
            if not np.isfinite(arr).all():
                raise InvalidArgument(f"non-finite optimizer state {key[1]!r} for tensor "
                                      f"{self.spec.tensors[key[0]].name!r}")
            if key[1].startswith("exp_avg_sq") and (arr < 0).any():
                raise InvalidArgument(f"negative second moment {key[1]!r} for tensor "
                                      f"{self.spec.tensors[key[0]].name!r}")
            values[key] = arr
        with self.cond:
            self._wait_idle()
            self._check_not_deleted()
            for (t, name), arr in values.items():
                self.layout.field_view(self.state, name, self.local_of[t]).reshape(-1)[:] = arr
            for k, s in zip(local, header.steps):
                self.state.steps[k] = s
            return self.version

    def _expected_entries(self, local: np.ndarray) -> dict[tuple[int, str], tuple[int, ...]]:
        return {(self.tensors[k], name): shape
                for k in local for name, shape in self.layout.field_shapes[k].items()}


def _drain(chunks: Iterable[RawChunk]) -> None:
    for _ in chunks:
        pass
