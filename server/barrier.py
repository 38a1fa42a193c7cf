"""The sync barrier: a step's gradients gather in one Round until the quorum of present
workers (all but `backup_workers` of them) has sent one; the round is then stepped once and
every worker in it is answered with the same result. A worker that leaves (or is presumed
gone after a timeout with proceed_on_timeout) is no longer waited for. The workers of an
incomplete round wait in the event loop (`Barrier.wait`), holding no thread: a sync job may
have thousands of them."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from optserve.proto.errors import DeadlineExceeded
from optserve.server.admission import Contribution
from optserve.server.aio import Signal, offload
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
    settled: Signal = field(default_factory=Signal)   # set with the result, or on delete


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

    def wake(self) -> None:
        """Ends the wait of the round being gathered (the job was deleted)."""
        if self.round is not None:
            self.round.settled.set()

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

    def arrive(self, c: Contribution) -> Result | Round:
        """Adds `c` to this step's round: the step's result when `c` completes the round,
        else the round, for `wait`. Called with job.cond held."""
        job = self.job
        self.members.add(c.worker)
        if self.round is None:
            self.round = Round(c.step)
        rnd = self.round
        rnd.contributions[c.worker] = c
        if self.complete(rnd):
            job.observer.waited(job, 0.0)
            return job.stepper.take(rnd)
        return rnd

    async def wait(self, rnd: Round, c: Contribution) -> Result:
        """Waits until `rnd` is stepped, or the barrier times out. A call cancelled while it
        waits withdraws its gradient, whose buffer its worker's next step will refill."""
        job = self.job
        start = time.perf_counter()
        try:
            await rnd.settled.wait(job.barrier_timeout)
        except asyncio.CancelledError:
            await offload(self._withdraw, rnd, c)
            raise
        job.observer.waited(job, time.perf_counter() - start)
        return await offload(self._outcome, rnd, c)

    def _outcome(self, rnd: Round, c: Contribution) -> Result:
        with self.job.cond:
            if rnd.result is not None:
                return rnd.result
            self.job.check_not_deleted()
            return self._timed_out(rnd, c)

    def _withdraw(self, rnd: Round, c: Contribution) -> None:
        """Takes `c` out of a round not yet stepped."""
        with self.job.cond:
            if rnd.result is None and rnd.contributions.get(c.worker) is c:
                del rnd.contributions[c.worker]
                if not rnd.contributions and self.round is rnd:
                    self.round = None

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
        self._withdraw(rnd, c)
        raise DeadlineExceeded(
            f"job {job.name!r}: step {c.step} timed out after {job.barrier_timeout:g}s "
            f"waiting for workers {missing}; nothing was applied, retry the step")
