"""Taking a step: the decisions under the job's lock (`Stepper.take`), then the arithmetic
(`Stepper.run`): one call of the job's state per part of whole tensors (the mean of the
workers' gradients in rank order, then the backend's kernels), each part's parameters
encoded into the reply as soon as it is stepped, the report for the metrics, and a
checkpoint when one is due.

A step whose reply fits one chunk runs inline on the handler thread (handing it off cost
more than it saved). A larger one takes its version at once and goes to the job's stepper
thread, which takes it in parts (at most MAX_PARTS, each at least one reply chunk), so that
the first parts' parameters are on the wire while the later ones are stepped. Until it is
done, everything else that reads or writes the state waits (`wait_idle`).
"""
from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from optserve.kernels import Hyper, StepResult
from optserve.kernels.state import Written
from optserve.proto.spec import WIRE_ITEMSIZE, DropReason
from optserve.proto.wire import CHUNK_BYTES
from optserve.server.admission import Contribution
from optserve.server.barrier import Round
from optserve.server.observer import StepReport
from optserve.server.reply import Progress, Result

if TYPE_CHECKING:
    from optserve.server.job import Job

log = logging.getLogger("optserve.server")

# A step on the stepper thread runs in parts of at least one reply chunk, and at most this
# many: each part is one backend call.
MAX_PARTS = 16


@dataclass
class StepWork:
    """A step as decided under the job's lock, for `run` to carry out."""
    version: int
    contributions: dict[int, Contribution]
    skip: bool                    # a non-finite gradient under the skip policy: no arithmetic
    active: np.ndarray            # bool per local tensor: what is stepped
    shown: np.ndarray             # local tensors whose parameters the reply carries, in order
    hyper: Hyper
    sums: bool                    # whether the observer wants the float64 step sums
    result: Result
    checkpoint: dict[int, int] | None   # worker steps, when a checkpoint is due at `version`


class Stepper:
    """A job's steps. While one runs on the stepper thread, `pending` > 0 and `reading`
    names the workers whose gradient buffers it still reads; all of it under job.cond."""

    def __init__(self, job: "Job"):
        self.job = job
        self.pending = 0
        self.reading: set[int] = set()
        self.idle_waiters = 0     # threads in wait_idle; new steps wait for them (gate)
        self._thread: ThreadPoolExecutor | None = None

    # ---- waiting (all with job.cond held) -----------------------------------------------
    def wait_idle(self) -> None:
        """Waits until no step runs on the stepper thread. While it waits, no new step
        starts (gate), or a busy async job would never be idle."""
        self.idle_waiters += 1
        try:
            self.job.cond.wait_for(lambda: self.pending == 0)
        finally:
            self.idle_waiters -= 1
            self.job.cond.notify_all()

    def gate(self) -> None:
        """Lets a new step start once no reader waits for the stepper to be idle."""
        self.job.cond.wait_for(lambda: not self.idle_waiters)

    def wait_unread(self, worker: int) -> None:
        """Waits until no running step reads `worker`'s gradient buffer (takes the lock)."""
        with self.job.cond:
            self.job.cond.wait_for(lambda: worker not in self.reading)

    def shutdown(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=False)

    # ---- deciding -----------------------------------------------------------------------
    def take(self, rnd: Round) -> Result:
        """Takes the round's step: the decisions here, the arithmetic in `run`. Called with
        job.cond held; the job's version moves on before this returns."""
        job = self.job
        skip = any(c.nonfinite for c in rnd.contributions.values())
        if skip:
            job.observer.skipped(job, DropReason.NONFINITE)
        n = job.layout.num_tensors
        active = np.zeros(n, bool)
        if not skip:
            for c in rnd.contributions.values():
                active[c.local] = True
        shown = np.arange(n) if skip else np.flatnonzero(active)
        first = rnd.contributions[min(rnd.contributions)]
        version = job.version + 1
        payload, in_rounds = self._reply_buffer(
            rnd, job.payload_bytes(shown, WIRE_ITEMSIZE[job.param_dtype]))
        result = Result(version, [job.tensors[k] for k in shown], payload, job.param_dtype,
                        DropReason.NONFINITE if skip else None, in_rounds_segment=in_rounds)
        due = not skip and job.checkpoint_every and version % job.checkpoint_every == 0
        steps_after = {**job.worker_step, **{w: c.step for w, c in rnd.contributions.items()}}
        work = StepWork(version, dict(rnd.contributions), skip, active, shown,
                        Hyper.from_groups(first.groups, job.seg_group,
                                          job.lr_divisor(first.staleness)),
                        not skip and job.observer.wants_sums(job), result,
                        steps_after if due else None)
        inline = (self.pending == 0 and len(result.payload) <= CHUNK_BYTES
                  or not job.backend.steps_in_parts)
        if inline:
            self.run(work)   # a failure raises here, before anything is settled
        else:
            result.progress = Progress()
        job.version = version
        job.settle(rnd, result)
        if not inline:
            self._submit(work)
        return result

    def _reply_buffer(self, rnd: Round, nbytes: int) -> tuple[np.ndarray, bool]:
        """Where the step writes its reply, and whether that is the job's rounds segment.
        When every worker of the round steps through shared memory and the state encodes
        into host memory, straight into shared memory (nothing to copy afterwards): the
        worker's own segment when it is alone, else the rounds segment, which they all read.
        Else a pooled buffer that each worker's call sends or copies.

        The rounds segment is written again by the next round, which needs every worker's
        next gradient, sent once it has read this reply: only a worker the round did not
        wait for (backup workers, on_timeout="proceed") can still be reading, and its next
        gradient is then late, answered with the job's parameters in full."""
        job, contributions = self.job, list(rnd.contributions.values())
        if getattr(job.state, "encodes_to_host", False) and all(
                c.reply_to is not None for c in contributions):
            if len(contributions) == 1:
                return contributions[0].reply_to[:nbytes], False
            if job.rounds is not None:
                return job.rounds.reply[:nbytes], True
        return job.state.reply_buffer(nbytes), False

    def _submit(self, work: StepWork) -> None:
        """Hands a settled step to the stepper thread. Called with job.cond held."""
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"optserve-step-{self.job.name}")
        try:
            self._thread.submit(self.run, work)
        except RuntimeError as exc:   # the interpreter is shutting down
            self._forget(work)
            work.result.progress.fail(exc)
            raise
        self.pending += 1
        self.reading |= set(work.contributions)

    # ---- doing --------------------------------------------------------------------------
    def run(self, work: StepWork) -> None:
        """Steps the tensors part by part, writing each part's parameters into the reply as
        soon as it is done, then reports and checkpoints. The reply's last part is released
        only then, so a worker whose step has returned sees its metrics and checkpoint. On
        the stepper thread, it ends by letting the next step (or any reader) go."""
        job, progress = self.job, work.result.progress
        last = None
        try:
            result, seconds, last = self._step_parts(work)
            if not work.skip:
                first = work.contributions[min(work.contributions)]
                job.observer.stepped(job, StepReport(
                    seconds, work.active, result, first.groups, len(work.contributions),
                    first.staleness, work.version, job.lr_divisor(first.staleness)))
        except BaseException as exc:
            if last is not None:   # no copy may still write into the payload once it is let go
                with contextlib.suppress(Exception):
                    last.wait()
            if progress is None:
                raise
            log.exception("job %r: step to version %d failed", job.name, work.version)
            job.faults(exc)
            self._forget(work)
            progress.fail(exc)
        else:
            self._checkpoint(work)
            if progress is not None:
                progress.advance(last)
            else:
                last.wait()
        finally:
            if progress is not None:
                with job.cond:
                    self.pending -= 1
                    self.reading -= set(work.contributions)
                    job.cond.notify_all()

    def _step_parts(self, work: StepWork) -> tuple[StepResult | None, float, Written]:
        """The step's arithmetic and its reply; returns the backend's per-tensor result, the
        seconds spent in the backend, and the reply's last piece, held back from readers."""
        job = self.job
        progress, payload = work.result.progress, work.result.payload
        result, seconds, written = None, 0.0, []
        parts = self._parts(work.shown, WIRE_ITEMSIZE[job.param_dtype])
        senders = {w: c.local for w, c in work.contributions.items()}
        try:
            for i, part in enumerate(parts):
                if not work.skip:
                    start = time.perf_counter()
                    job.state.steps[part] += 1
                    try:
                        out = job.state.step(job.spec.optimizer, senders, part, work.hyper, work.sums)
                    except BaseException:
                        job.state.steps[part] -= 1   # a backend that fails before it writes leaves no trace
                        raise
                    seconds += time.perf_counter() - start
                    if result is None:
                        result = out
                    else:
                        mask = np.zeros(job.layout.num_tensors, bool)
                        mask[part] = True
                        result.take(out, mask)
                written = job.state.encode(part, job.param_dtype, payload,
                                           written[-1].end if written else 0)
                if progress is not None:    # the last piece waits for `run`
                    for piece in written[:-1] if i == len(parts) - 1 else written:
                        progress.advance(piece)
        except BaseException:
            if written:          # no copy may still write into the payload once it is let go
                with contextlib.suppress(Exception):
                    written[-1].wait()
            raise
        return result, seconds, written[-1]

    def _parts(self, local: np.ndarray, itemsize: int) -> list[np.ndarray]:
        """`local` as runs of whole tensors of at least one reply chunk each (one run when
        the backend steps in one call), each stepped and sent as soon as it is done."""
        if not self.job.backend.steps_in_parts:
            return [local]
        nbytes = self.job.layout.sizes[local] * itemsize
        target = max(CHUNK_BYTES, int(nbytes.sum()) // MAX_PARTS)
        part = (np.cumsum(nbytes) - nbytes) // target   # where each tensor starts
        return np.split(local, np.flatnonzero(np.diff(part)) + 1)

    def _checkpoint(self, work: StepWork) -> None:
        """Writes the checkpoint due at this step, if one is. A failed write is logged, not
        raised: the step itself is taken, and the next due step tries again."""
        if work.checkpoint is None:
            return
        try:
            self.job.checkpointer.save(self.job, work.version, work.checkpoint)
        except Exception as e:
            log.exception("job %r: checkpoint at version %d failed, the next due step tries "
                          "again: %s: %s", self.job.name, work.version, type(e).__name__, e)

    def _forget(self, work: StepWork) -> None:
        """Takes a failed step's result out of the retry cache: a retry is then a late step
        (Admission.drop_reason) and gets the parameters as they are, not the failure again."""
        with self.job.cond:
            for w in work.contributions:
                if self.job.results.get(w, (0, None))[1] is work.result:
                    del self.job.results[w]
