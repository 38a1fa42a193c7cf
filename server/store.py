"""The shard's jobs: registration, lookup and the checks a spec must pass."""
from __future__ import annotations

import logging
import math
import threading
import time
from typing import AsyncIterable, Awaitable, Callable

import numpy as np

from optserve.proto import optimizers
from optserve.proto.errors import (FailedPrecondition, InvalidArgument, NotFound,
                                   ResourceExhausted, Unavailable)
from optserve.proto.spec import (MAX_DIMS, MAX_NAME_BYTES, WIRE_ITEMSIZE, dtype_name, numel,
                                 shard_tensors, spec_key)
from optserve.proto.v1 import optserve_pb2 as pb
from optserve.proto.wire import RawChunk
from optserve.server.config import Limits
from optserve.server.segments import Segment, SegmentBudget
from optserve.server.job import Job
from optserve.server.reply import Result

log = logging.getLogger("optserve.server")

# What a job keeps per worker outside its state: a lock, its barrier membership, session
# and last step (about 400 bytes measured; counted with room to spare).
WORKER_BOOKKEEPING_BYTES = 1024
# An unknown job's name is quoted in messages up to this many characters.
QUOTED_NAME_CHARS = 64


class ShardStore:
    def __init__(self, backend, barrier_timeout: float = 300.0, observer=None,
                 checkpointer=None, checkpoint_every: int = 0, limits: Limits = Limits()):
        self.backend = backend
        self.limits = limits
        self.observer = observer
        self.checkpointer = checkpointer
        self.checkpoint_every = checkpoint_every if checkpointer is not None else 0
        self.barrier_timeout = barrier_timeout
        self.segments = SegmentBudget(limits.shared_memory, limits.max_shared_memory_bytes)
        self.jobs: dict[str, Job] = {}
        self.deleting: set[str] = set()   # names whose DeleteJob is still cleaning up
        self.lock = threading.Lock()
        # Called once with the first device fault (the backend's is_fault): the shard stops.
        self.on_fault: Callable[[BaseException], None] | None = None
        self._faulted = False

    def check_fault(self, exc: BaseException) -> None:
        """Hands a device fault to `on_fault`: after one, no job's state can be trusted."""
        if self.backend.is_fault(exc) and self.on_fault is not None and not self._faulted:
            self._faulted = True
            self.on_fault(exc)

    def job(self, name: str) -> Job:
        try:
            return self.jobs[name]
        except KeyError:
            raise NotFound(f"unknown job {_quoted(name)} on this shard (never registered, "
                           "deleted, or lost in a restart: without --checkpoint-dir, or before "
                           "its first checkpoint)") from None

    def delete(self, name: str) -> None:
        """Forgets the job, its metric series and its checkpoints. The name stays reserved
        until they are gone: the cleanup is by name, and must not reach a new job's."""
        with self.lock:
            job = self.job(name)
            del self.jobs[name]
            self.deleting.add(name)
        try:
            job.delete()
            if self.checkpointer is not None:
                self.checkpointer.delete(name)
            job.observer.deleted(job)
        finally:
            with self.lock:
                self.deleting.discard(name)
        log.info("deleted job %r", name)

    async def step(self, header: pb.StepHeader, body: AsyncIterable[RawChunk],
                   send: Callable[[Result, Segment | None], Awaitable[None]]) -> None:
        """Runs a Step; `send` streams its result to the worker, timed as the send phase."""
        job = self.job(header.job)

        async def timed(result: Result, segment) -> None:
            start = time.perf_counter()
            await send(result, segment)
            job.observer.sent(job, len(result.payload), time.perf_counter() - start)
        await job.step(header, body, timed)

    def release_segments(self) -> None:
        """Closes every job's shared-memory segments: a stopped shard offers none."""
        for job in list(self.jobs.values()):
            job.release_segments()

    def _check_counts(self, spec: pb.JobSpec) -> None:
        """Refuses a spec with more workers, shards, tensors or groups than the shard takes,
        before anything is placed or allocated for them."""
        limits = self.limits
        for what, count, limit in (("workers", spec.num_workers, limits.max_workers),
                                   ("shards", spec.num_shards, limits.max_shards),
                                   ("tensors", len(spec.tensors), limits.max_tensors),
                                   ("parameter groups", len(spec.groups), limits.max_tensors)):
            if count > limit:
                raise ResourceExhausted(f"job spec: {count} {what}, over this shard's limit "
                                        f"of {limit}")

    def _host_bytes(self, spec: pb.JobSpec, numel: int, tensors: int, state: int) -> int:
        """What a job holds in host memory for its life (max_state_bytes bounds it): its
        parameters and optimizer state (`state` bytes), the gradient buffers its state keeps
        per worker, the results its retry cache keeps per worker (async; a sync round's
        workers share one) and the bookkeeping per worker."""
        workers = spec.num_workers
        cached = workers if spec.mode == pb.ASYNC else 1
        result = numel * WIRE_ITEMSIZE[spec.param_dtype or pb.FLOAT32] + 8 * tensors
        return (state + self.backend.worker_bytes(numel, tensors, workers) + cached * result
                + workers * WORKER_BOOKKEEPING_BYTES)

    def _check_limits(self, spec: pb.JobSpec, local: list[int]) -> None:
        """Refuses a new job that would take the shard over a limit, before allocating it."""
        params = sum(numel(spec.tensors[t].shape) for t in local)
        info = optimizers.get(spec.optimizer)
        state = 4 * params + 4 * sum(
            numel(shape) for t in local
            for shape in info.state_fields(tuple(spec.tensors[t].shape),
                                           spec.groups[spec.tensors[t].group]).values())
        need = self._host_bytes(spec, params, len(local), state)
        held = sum(self._host_bytes(j.spec, j.layout.numel, j.layout.num_tensors,
                                    j.layout.state_bytes()) for j in self.jobs.values())
        device = self.backend.device_bytes(params, len(local), state, spec.num_workers,
                                           WIRE_ITEMSIZE[spec.grad_dtype])
        held_device = sum(j.device_bytes for j in self.jobs.values())
        if len(self.jobs) >= self.limits.max_jobs:
            raise ResourceExhausted(f"this shard holds {len(self.jobs)} jobs, its limit")
        if params > self.limits.max_params_per_job:
            raise ResourceExhausted(f"job {spec.job!r} has {params} parameters on this shard, "
                                    f"over the limit of {self.limits.max_params_per_job}")
        if held + need > self.limits.max_state_bytes:
            raise ResourceExhausted(f"job {spec.job!r} needs {need} bytes of state ({state} for "
                                    f"parameters and optimizer state, the rest for its "
                                    f"{spec.num_workers} workers); the shard holds {held} of "
                                    f"its {self.limits.max_state_bytes}")
        if device and held_device + device > (self.limits.max_device_bytes or 0):
            raise ResourceExhausted(f"job {spec.job!r} needs {device} bytes of device memory; "
                                    f"the shard's jobs hold {held_device} of its "
                                    f"{self.limits.max_device_bytes}")

    def _new_job(self, spec: pb.JobSpec, shard: int, params: np.ndarray) -> Job:
        return Job(spec, shard, self.backend, params, self.barrier_timeout, self.observer,
                   self.checkpointer, self.checkpoint_every, self.check_fault, self.segments)

    def restore_all(self) -> None:
        """Restores every job from its newest checkpoint that verifies and loads. A defect
        in one falls back to the job's next older checkpoint, and stops no other job."""
        if self.checkpointer is None:
            return
        for directory, manifests in self.checkpointer.on_disk():
            for path in manifests:
                try:
                    job = self._restore(path)
                except Exception as e:
                    # the checks' own errors say what is wrong; anything else needs its type
                    log.warning("skipping checkpoint %s: %s", path,
                                e if isinstance(e, (ValueError, OSError)) else repr(e))
                    continue
                self.jobs[job.name] = job
                job.observer.registered(job)
                log.info("restored job %r at version %d from %s", job.name, job.version, directory)
                break
            else:
                if manifests:
                    log.error("none of the %d checkpoints in %s restores: its job is not "
                              "restored (the files stay as they are)", len(manifests), directory)

    def _restore(self, manifest_path) -> Job:
        manifest, spec, state = self.checkpointer.load(manifest_path)
        job = self._new_job(spec, manifest["shard"], state.param)
        with job.cond:
            job.restore(manifest["version"], state,
                        {int(w): s for w, s in manifest["worker_steps"].items()})
        return job

    def checkpoint_all(self) -> list[str]:
        """Checkpoints every job, whatever becomes of the others' checkpoints; returns the
        names of those whose checkpoint failed, each logged."""
        if self.checkpointer is None:
            return []
        failed = []
        for job in list(self.jobs.values()):
            try:
                job.checkpoint()
            except Exception as e:
                log.error("job %r: checkpoint at version %d failed, a restart restores its last "
                          "one that was written: %s: %s", job.name, job.version,
                          type(e).__name__, e)
                failed.append(job.name)
        return failed

    def registration_bytes(self, header: pb.RegisterHeader) -> int:
        """The bytes of initial parameters a registration carries, once its spec is valid
        and the job would fit (checked again when it is created)."""
        spec = header.spec
        self._check_counts(spec)
        validate_spec(spec, header.shard, header.worker)
        existing = self.jobs.get(spec.job)
        if existing is not None:
            _check_same_spec(existing, spec, header.shard)
        local = shard_tensors(spec, header.shard)
        if existing is None:
            self._check_limits(spec, local)
        return 4 * sum(numel(spec.tensors[t].shape) for t in local)

    def register(self, header: pb.RegisterHeader, raw: np.ndarray) -> pb.RegisterJobResponse:
        """Creates the job from the first complete registration, or joins the existing one;
        `raw` holds its initial parameters (registration_bytes of them)."""
        spec = header.spec
        local = shard_tensors(spec, header.shard)
        params = raw.view("<f4")
        if not np.isfinite(params).all():
            raise InvalidArgument(f"job {spec.job!r}: non-finite initial parameters")
        with self.lock:
            if spec.job in self.deleting:   # UNAVAILABLE: the client retries with backoff
                raise Unavailable(f"job {spec.job!r} is being deleted; register again shortly")
            job, created = self.jobs.get(spec.job), False
            if job is not None:
                _check_same_spec(job, spec, header.shard)
            else:
                self._check_limits(spec, local)
                job = self._new_job(spec, header.shard, params)
                self.jobs[spec.job], created = job, True
                job.observer.registered(job)   # under the lock: before any delete can run
        if created:
            _log_registered(job)
        version, last_step = job.join(header.worker, header.session, header.resume)
        return pb.RegisterJobResponse(created=created, version=version, tensors=job.tensors,
                                      last_step=last_step)


def validate_spec(spec: pb.JobSpec, shard: int, worker: int) -> None:
    def check(ok: bool, message: str) -> None:
        if not ok:
            raise InvalidArgument(f"job spec: {message}")

    check(bool(spec.job), "the job needs a name")
    check(len(spec.job.encode()) <= MAX_NAME_BYTES,
          f"the job name has {len(spec.job.encode())} UTF-8 bytes, at most {MAX_NAME_BYTES} may")
    info = optimizers.get(spec.optimizer)
    check(len(spec.tensors) > 0, "no tensors")
    check(len(spec.groups) > 0, "no parameter groups")
    names = [t.name for t in spec.tensors]
    check(all(names), "every tensor needs a name")
    for i, name in enumerate(names):
        check(len(name.encode()) <= MAX_NAME_BYTES, f"the name of tensor {i} has "
              f"{len(name.encode())} UTF-8 bytes, at most {MAX_NAME_BYTES} may")
    check(len(set(names)) == len(names), "tensor names must be unique")
    for t in spec.tensors:
        check(0 < len(t.shape) <= MAX_DIMS, f"tensor {t.name!r} has {len(t.shape)} dims; 1 to "
                                            f"{MAX_DIMS} may (scalars as [1])")
        check(all(d > 0 for d in t.shape),
              f"tensor {t.name!r} has shape {tuple(t.shape)}; dims must be positive")
        check(t.group < len(spec.groups), f"tensor {t.name!r} names group {t.group}, "
                                          f"there are {len(spec.groups)}")
    for h in spec.groups:
        info.validate(h)
    check(spec.num_workers >= 1, "num_workers must be >= 1")
    check(worker < spec.num_workers, f"worker {worker} out of range [0, {spec.num_workers})")
    check(spec.num_shards >= 1, "num_shards must be >= 1")
    check(shard < spec.num_shards, f"shard {shard} out of range [0, {spec.num_shards})")
    check(spec.grad_dtype in (pb.FLOAT32, pb.BFLOAT16, pb.FLOAT16), "grad_dtype must be set")
    check(spec.mode in (pb.SYNC, pb.ASYNC), f"unknown consistency mode {spec.mode}")
    check(spec.backup_workers < spec.num_workers,
          f"backup_workers ({spec.backup_workers}) must be fewer than the workers ({spec.num_workers})")
    check(spec.param_dtype in (pb.DTYPE_UNSPECIFIED, pb.FLOAT32, pb.BFLOAT16, pb.FLOAT16),
          "unknown param_dtype")
    check(math.isfinite(spec.barrier_timeout_s) and spec.barrier_timeout_s >= 0,
          "barrier_timeout_s must be >= 0")


def _quoted(name: str) -> str:
    """A job name from a request, quoted for a message: cut short when it is long (it may
    be any size, and messages are logged)."""
    if len(name) <= QUOTED_NAME_CHARS:
        return repr(name)
    return f"{name[:QUOTED_NAME_CHARS]!r}... ({len(name.encode())} UTF-8 bytes)"


def _check_same_spec(job: Job, spec: pb.JobSpec, shard: int) -> None:
    if shard != job.shard:
        raise FailedPrecondition(f"job {spec.job!r} is held here as shard {job.shard}, "
                                 f"not shard {shard}")
    if spec_key(spec) != job.key:
        raise FailedPrecondition(f"job {spec.job!r} is already registered with a different spec "
                                 f"({_spec_difference(job.spec, spec)})")


def _spec_difference(a: pb.JobSpec, b: pb.JobSpec) -> str:
    """The first field in which two specs differ, for the error message."""
    top = _diff_fields(a, b)
    if top:
        return top
    if len(a.tensors) != len(b.tensors):
        return f"{len(a.tensors)} tensors registered, {len(b.tensors)} sent"
    for x, y in zip(a.tensors, b.tensors):
        if x != y:
            return (f"tensor {x.name!r} {tuple(x.shape)} group {x.group} registered, "
                    f"{y.name!r} {tuple(y.shape)} group {y.group} sent")
    for g, (x, y) in enumerate(zip(a.groups, b.groups)):
        if x != y:
            return f"group {g} hyperparameters differ: {_diff_fields(x, y)}"
    return "they differ"


def _diff_fields(a, b) -> str:
    for descriptor in a.DESCRIPTOR.fields:
        x, y = getattr(a, descriptor.name), getattr(b, descriptor.name)
        if not descriptor.is_repeated and x != y:
            return f"{descriptor.name}: {x!r} registered, {y!r} sent"
    return ""


def _log_registered(job: Job) -> None:
    spec = job.spec
    log.info("registered job %r: optimizer=%s, %d of %d tensors (%d params) on shard %d/%d, "
             "%d worker(s), %s, gradients as %s, parameters back as %s, state %.1f MB on %s",
             spec.job, spec.optimizer, len(job.tensors), len(spec.tensors), job.layout.numel,
             job.shard, spec.num_shards, spec.num_workers, pb.ConsistencyMode.Name(spec.mode).lower(),
             dtype_name(spec.grad_dtype).lower(), dtype_name(job.param_dtype).lower(),
             job.layout.state_bytes() / 1e6, job.backend.name)

