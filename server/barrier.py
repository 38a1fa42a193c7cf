"""The sync barrier: a step's gradients gather in one Round until the quorum of present
workers (all but `backup_workers` of them) has sent one; the round is then stepped once and
every worker in it is answered with the same result. A worker that leaves (or is presumed
gone after a timeout with proceed_on_timeout) is no longer waited for."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from optserve.proto.errors import DeadlineExceeded
from optserve.server.admission import Contribution
from optserve.server.reply import Result

if TYPE_CHECKING:
    from optserve.server.job import Job

log = logging.getLogger("optserve.server")


@dataclass
class Round:
    """The gradients of one step: one worker's (async), or a sync step's quorum."""
    step: int
    contributions: dict[int, Contribution] = field(default_factory=dict)
    result: Result | None = None


class Barrier:
    """The workers a sync step waits for, and the round being gathered; under job.cond."""

    def __init__(self, job: "Job"):
        self.job = job
        self.members = set(range(job.spec.num_workers))
        self.round: Round | None = None

    def settled(self, rnd: Round) -> None:
        """`rnd` was stepped: the next sync step gathers a new round."""
        if self.round is rnd:
            self.round = None

    def reset(self) -> None:
        """Forgets the round being gathered (the job restored a checkpoint)."""
        self.round = None

    def quorum(self) -> int:
        return max(1, len(self.members) - self.job.spec.backup_workers)

    def complete(self, rnd: Round) -> bool:
        return bool(rnd.contributions) and len(rnd.contributions) >= self.quorum()

    def join(self, worker: int) -> None:
        self.members.add(worker)
        self.job.observer.members_changed(self.job)

    def leave(self, worker: int) -> None:
        """Stops waiting for `worker`; a waiting round may now be complete."""
        self.members.discard(worker)
        self.job.observer.members_changed(self.job)
        if self.round is not None and self.complete(self.round):
            self.job.stepper.take(self.round)

    def arrive(self, c: Contribution) -> Result:
        """Adds `c` to this step's round and waits until the round is stepped, or the
        barrier times out. Called with job.cond held."""
        job = self.job
        self.members.add(c.worker)
        if self.round is None:
            self.round = Round(c.step)
        rnd = self.round
        rnd.contributions[c.worker] = c
        if self.complete(rnd):
            job.observer.waited(job, 0.0)
            return job.stepper.take(rnd)
        start = time.perf_counter()
        job.cond.wait_for(lambda: rnd.result is not None or job.deleted,
                          timeout=job.barrier_timeout)
        job.observer.waited(job, time.perf_counter() - start)
        if rnd.result is not None:
            return rnd.result
        job.check_not_deleted()
        return self._timed_out(rnd, c)

    def _timed_out(self, rnd: Round, c: Contribution) -> Result:
        """Proceed with the workers present, or withdraw this gradient and fail the step."""
        job = self.job
        missing = sorted(self.members - set(rnd.contributions))
        if job.spec.proceed_on_timeout:
            log.warning("job %r: step %d waited %.3gs; presuming workers %s gone, stepping with %d",
                        job.name, rnd.step, job.barrier_timeout, missing, len(rnd.contributions))
            self.members -= set(missing)
            job.observer.members_changed(job)
            return job.stepper.take(rnd)
        del rnd.contributions[c.worker]
        if not rnd.contributions:
            self.round = None
        raise DeadlineExceeded(
            f"job {job.name!r}: step {c.step} timed out after {job.barrier_timeout:g}s "
            f"waiting for workers {missing}; nothing was applied, retry the step")
