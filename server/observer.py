"""What a job tells whoever watches it (the metrics recorder, server/metrics.py): the
observer's methods, and the report of one finished step."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from optserve.kernels import StepResult
from optserve.proto.v1 import optserve_pb2 as pb


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


class NoObserver:
    """Observes nothing: a job without metrics. Also the list of what an observer is told
    (`Job.observer`): received, waited and sent take bytes and seconds of those phases,
    skipped a DropReason, stepped a StepReport; wants_sums says whether the next step
    should compute the float64 step sums."""

    def registered(self, job): pass
    def received(self, job, nbytes, seconds): pass
    def waited(self, job, seconds): pass
    def sent(self, job, nbytes, seconds): pass
    def skipped(self, job, reason): pass
    def members_changed(self, job): pass
    def deleted(self, job): pass
    def stepped(self, job, report): pass
    def wants_sums(self, job): return False
