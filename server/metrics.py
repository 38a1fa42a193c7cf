"""Every Prometheus metric a shard exports, defined in one place.

Label values come from closed sets: job names (bounded by the shard's job limit), tensor
names (capped per job, see `tensor_series`), phases, reasons, RPC methods and status codes.
Worker ids and step numbers are never labels.

The training job's label is `training_job` (JOB), not `job`: Prometheus gives every scraped
series the scrape config's `job`, and a target's own `job` label would be renamed
`exported_job` by a standard scrape (or, with `honor_labels`, replace the scrape's).
Counters of bytes end in `_bytes_total`, and the registry leaves out the `_created` series
(`ShardRegistry`).
"""
from __future__ import annotations

import copy
import functools
from enum import Enum

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase

from optserve.kernels.backend import SUM_NAMES, Report
from optserve.proto.spec import DropReason
from optserve.proto.v1 import optserve_pb2 as pb

# Phase latency buckets: from sub-millisecond steps of small models to multi-second steps
# of 100M-parameter ones.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0, 60.0)
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


# The label of the training job on every per-job series (see the module's docstring).
JOB = "training_job"
# Metric types whose prometheus_client wrappers add a `<name>_created` sample.
_WITH_CREATED = frozenset({"counter", "histogram", "summary"})


def _without_created(families):
    """The metric families less their `_created` samples (the time a counter or histogram
    series was first touched): a second series per counter that no dashboard or alert reads,
    and that prometheus_client only turns off process-wide (disable_created_metrics)."""
    for family in families:
        if family.type in _WITH_CREATED:
            created = family.name + "_created"
            if any(s.name == created for s in family.samples):
                family = copy.copy(family)   # the samples list is new, the rest shared
                family.samples = [s for s in family.samples if s.name != created]
        yield family


class ShardRegistry(CollectorRegistry):
    """A CollectorRegistry that exports no `_created` series, for this registry only: other
    registries in the process (a worker's, the library's default) keep the library's setting."""

    def collect(self):
        return _without_created(super().collect())

    def restricted_registry(self, names):
        """What /metrics?name[]=... serves: filtered the same way."""
        inner = super().restricted_registry(names)
        return _Restricted(inner)


class _Restricted:
    def __init__(self, inner):
        self._inner = inner

    def collect(self):
        return _without_created(self._inner.collect())


class Phase(str, Enum):
    """The phases of a Step's latency (optserve_step_phase_seconds)."""
    RECEIVE = "receive"   # the gradient in, decoded
    WAIT = "wait"         # sync: the barrier
    COMPUTE = "compute"   # the backend's arithmetic
    SEND = "send"         # the parameters out


class ShardMetrics:
    """The shard's metrics in their own registry, so tests can build a fresh one."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or ShardRegistry()
        r = self.registry
        t = (JOB, "tensor")
        self.weight_norm = Gauge("optserve_weight_norm", "L2 norm of the weights after the "
                                 "last step, ||w_{t+1}||", t, registry=r)
        self.effective_step = Gauge(
            "optserve_effective_step", "Angular update ||w_{t+1}/||w_{t+1}|| - w_t/||w_t||||, "
            "the effective step size of the AdamP paper", t, registry=r)
        self.update_ratio = Gauge("optserve_update_ratio", "Update-to-weight ratio "
                                  "||w_{t+1} - w_t|| / ||w_t||", t, registry=r)
        self.grad_norm = Gauge("optserve_grad_norm", "L2 norm of the (averaged) gradient "
                               "applied in the last step", t, registry=r)
        self.learning_rate = Gauge("optserve_learning_rate", "Learning rate applied in the last "
                                   "step, per parameter group (after staleness_lr; 0 for "
                                   "Adafactor's relative_step, which sets its own)",
                                   (JOB, "group"), registry=r)
        self.projected_tensors = Gauge("optserve_adamp_projected_tensors", "AdamP: tensors "
                                       "whose update was projected in the last step", (JOB,),
                                       registry=r)
        self.stepped_tensors = Gauge("optserve_stepped_tensors", "Tensors stepped in the last "
                                     "step", (JOB,), registry=r)
        self.clip_ratio = Gauge("optserve_adafactor_clip_ratio", "Adafactor: mean over the "
                                "tensors of the clipping divisor max(1, RMS(U)/d) in the last step",
                                (JOB,), registry=r)
        self.clipped_tensors = Gauge("optserve_adafactor_clipped_tensors", "Adafactor: tensors "
                                     "whose update was clipped in the last step", (JOB,),
                                     registry=r)

        self.step_seconds = Histogram("optserve_step_phase_seconds", "Step latency by phase: "
                                      "receive, wait (barrier), compute, send", (JOB, "phase"),
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.barrier_wait = Histogram("optserve_barrier_wait_seconds", "Time a sync step's "
                                      "gradient waited for the quorum", (JOB,),
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.staleness = Histogram("optserve_staleness_versions", "Async: versions between the "
                                   "gradient's parameters and the job's", (JOB,),
                                   buckets=STALENESS_BUCKETS, registry=r)
        self.bytes_received = Counter("optserve_received_bytes_total", "Gradient bytes "
                                      "received by Step", (JOB,), registry=r)
        self.bytes_sent = Counter("optserve_sent_bytes_total", "Parameter bytes sent in Step "
                                  "replies", (JOB,), registry=r)
        self.steps = Counter("optserve_steps_total", "Optimizer steps applied", (JOB,), registry=r)
        self.skipped = Counter("optserve_skipped_steps_total", "Gradients received but not "
                               "applied, by reason", (JOB, "reason"), registry=r)
        self.version = Gauge("optserve_job_version", "Parameter version of the job", (JOB,),
                             registry=r)
        self.state_bytes = Gauge("optserve_state_bytes", "Bytes of parameters and optimizer state "
                                 "held", (JOB,), registry=r)
        self.workers = Gauge("optserve_active_workers", "Workers a sync step waits for",
                             (JOB,), registry=r)
        self.jobs = Gauge("optserve_active_jobs", "Jobs held by this shard", registry=r)
        self.rpcs = Counter("optserve_rpcs_total", "RPCs handled, by method and status code",
                            ("method", "code"), registry=r)
        self.up = Gauge("optserve_shard_up", "1 while the shard serves", registry=r)
        self.inflight = Gauge("optserve_inflight_bytes", "Bytes held by uploads and downloads "
                              "in flight outside the jobs' state (--max-inflight-bytes)",
                              registry=r)
        self.shared_memory = Gauge("optserve_shared_memory_bytes", "Bytes of the workers' "
                                   "shared-memory segments (--max-shared-memory-bytes)",
                                   registry=r)

    def watch_device(self, report) -> None:
        """Exports a device backend's memory and PCIe traffic, read at each scrape from
        `report()` (Backend.device_report)."""
        self.registry.register(_DeviceCollector(report))

    def forget_job(self, job: str) -> None:
        """Removes every series labelled with training job `job`."""
        for metric in vars(self).values():
            if isinstance(metric, MetricWrapperBase) and JOB in metric._labelnames:
                metric.remove_by_labels({JOB: job})


class _DeviceCollector:
    def __init__(self, report):
        self.report = report

    def collect(self):
        r = self.report()
        memory = GaugeMetricFamily("optserve_device_memory_bytes", "Memory the shard holds for "
                                   "a GPU, by kind: device (in arrays), device_limit (the pool's "
                                   "cap, --max-device-bytes), pinned (page-locked host staging)",
                                   labels=["kind"])
        for kind in ("device", "device_limit", "pinned"):
            memory.add_metric([kind], r[kind])
        yield memory
        copies = CounterMetricFamily("optserve_device_copy_bytes", "Bytes copied between host "
                                     "and GPU, by direction (h2d, d2h)", labels=["direction"])
        for direction in ("h2d", "d2h"):
            copies.add_metric([direction], r[direction])
        yield copies


def tensor_series(names: list[str], cap: int) -> list[str]:
    """The series label of each tensor: its own name while a job has at most `cap` tensors,
    else the longest dotted name prefix that keeps the number of series within the cap
    ("layers.3.attn.q.weight" -> "layers.3.attn" -> "layers.3" -> "layers")."""
    if len(names) <= cap:
        return list(names)
    parts = [n.split(".") for n in names]
    for depth in range(max(len(p) for p in parts) - 1, 0, -1):
        labels = [".".join(p[:depth]) + ".*" for p in parts]
        if len(set(labels)) <= cap:
            return labels
    return ["*"] * len(names)


def angular_step(w2: np.ndarray, wdw: np.ndarray, dw2: np.ndarray) -> np.ndarray:
    """||w1/||w1|| - w0/||w0|||| from float64 sums, w1 = w0 + dw, accurate for tiny angles.

    With a = ||w0||, b = ||w1||: a·b·(w1/b - w0/a) = (a - b)·w0 + a·dw, so the squared angle
    is ((a - b)² + 2(a - b)<w0, dw>/a + ||dw||²) / b², where a - b = -(2<w0,dw> + ||dw||²)/(a + b)
    carries no cancellation (unlike sqrt(2 - 2cos))."""
    a = np.sqrt(w2)
    b2 = np.maximum(w2 + 2 * wdw + dw2, 0.0)
    b = np.sqrt(b2)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = -(2 * wdw + dw2) / (a + b)
        sq = (d * d + 2 * d * wdw / a + dw2) / b2
        return np.where((a > 0) & (b > 0), np.sqrt(np.maximum(sq, 0.0)), 0.0)


def _unless_deleted(method):
    """Drops a job's update that comes after the job was deleted (a reply still streaming
    out), which would otherwise bring its series back."""
    @functools.wraps(method)
    def update(self, job, *args):
        if not job.deleted:
            method(self, job, *args)
    return update


class MetricsRecorder:
    """Turns what jobs measure into the shard's metrics (the Job's observer).

    Per-tensor gauges are refreshed every `every` steps of a job; tensors are mapped to at
    most `max_series` series per job by `tensor_series`, and their sums are added per
    series, so an aggregated series is exactly the norm or angle of the concatenated tensors.
    """

    def __init__(self, metrics: ShardMetrics, every: int = 1, max_series: int = 256):
        self.m = metrics
        self.every = max(1, every)
        self.max_series = max_series
        # per job: series labels, each tensor's series, and each series' four gauges, looked
        # up at its first refresh and kept (a labels() lookup per tensor per step cost more
        # than a small step's math); a series appears only once it has values
        self._series: dict[str, tuple[list[str], np.ndarray, list[tuple | None]]] = {}

    def registered(self, job) -> None:
        names = [job.spec.tensors[t].name for t in job.tensors]
        labels = tensor_series(names, self.max_series)
        unique = sorted(set(labels))
        index = np.array([unique.index(label) for label in labels], np.int64)
        self._series[job.name] = (unique, index, [None] * len(unique))
        self.m.jobs.inc()
        self.m.state_bytes.labels(job.name).set(job.layout.state_bytes())
        self.m.workers.labels(job.name).set(len(job.barrier.members))
        self.m.version.labels(job.name).set(job.version)
        # Series of closed label sets exist from the start, at zero: a rate() over a counter
        # that appears with its first increment would miss that increment.
        for reason in DropReason:
            self.m.skipped.labels(job.name, reason.value)
        for phase in Phase:
            self.m.step_seconds.labels(job.name, phase.value)

    @_unless_deleted
    def received(self, job, nbytes: int, seconds: float) -> None:
        self.m.bytes_received.labels(job.name).inc(nbytes)
        self.m.step_seconds.labels(job.name, Phase.RECEIVE.value).observe(seconds)

    @_unless_deleted
    def waited(self, job, seconds: float) -> None:
        self.m.barrier_wait.labels(job.name).observe(seconds)
        self.m.step_seconds.labels(job.name, Phase.WAIT.value).observe(seconds)

    @_unless_deleted
    def sent(self, job, nbytes: int, seconds: float) -> None:
        self.m.bytes_sent.labels(job.name).inc(nbytes)
        self.m.step_seconds.labels(job.name, Phase.SEND.value).observe(seconds)

    @_unless_deleted
    def skipped(self, job, reason: DropReason) -> None:
        self.m.skipped.labels(job.name, reason.value).inc()

    @_unless_deleted
    def members_changed(self, job) -> None:
        self.m.workers.labels(job.name).set(len(job.barrier.members))

    def deleted(self, job) -> None:
        self._series.pop(job.name, None)
        self.m.forget_job(job.name)
        self.m.jobs.dec()

    def wants_sums(self, job) -> bool:
        """Whether the step about to be taken (version job.version + 1) needs the backend's
        float64 step sums: only when it refreshes the per-tensor gauges (see stepped)."""
        return self._refreshes(job.version + 1)

    def _refreshes(self, version: int) -> bool:
        return version % self.every == 0

    @_unless_deleted
    def stepped(self, job, report) -> None:
        """`report` is the job's StepReport for the step just taken."""
        name = job.name
        self.m.steps.labels(name).inc()
        self.m.version.labels(name).set(report.version)
        self.m.step_seconds.labels(name, Phase.COMPUTE.value).observe(report.compute_seconds)
        if job.spec.mode == pb.ASYNC:
            self.m.staleness.labels(name).observe(report.staleness)
        for g, h in enumerate(report.groups):
            self.m.learning_rate.labels(name, str(g)).set(h.lr / report.lr_divisor)
        active = report.active
        self.m.stepped_tensors.labels(name).set(int(active.sum()))
        for kind, values in report.result.reports.items():
            self._report(name, kind, values[active])
        if self._refreshes(report.version):   # the sums asked for in wants_sums
            self._tensor_gauges(job, report)

    def _report(self, job: str, kind: Report, values: np.ndarray) -> None:
        """An optimizer's own per-tensor report, over the tensors just stepped."""
        if kind is Report.PROJECTED:
            self.m.projected_tensors.labels(job).set(int(values.sum()))
        elif kind is Report.CLIP and values.size:
            self.m.clip_ratio.labels(job).set(float(values.mean()))
            self.m.clipped_tensors.labels(job).set(int((values > 1).sum()))

    def _tensor_gauges(self, job, report) -> None:
        labels, index, gauges = self._series[job.name]
        active = report.active
        sums = {}
        for key in SUM_NAMES:
            total = np.zeros(len(labels))
            np.add.at(total, index[active], getattr(report.result.sums, key)[active])
            sums[key] = total
        seen = np.zeros(len(labels), bool)
        seen[index[active]] = True
        w2, wdw, dw2 = sums["w2"], sums["wdw"], sums["dw2"]
        new_norm = np.sqrt(np.maximum(w2 + 2 * wdw + dw2, 0.0))
        step = angular_step(w2, wdw, dw2)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(w2 > 0, np.sqrt(dw2 / w2), 0.0)
        values = list(zip(new_norm.tolist(), step.tolist(), ratio.tolist(),
                          np.sqrt(sums["g2"]).tolist()))
        for i in np.flatnonzero(seen).tolist():
            if gauges[i] is None:
                gauges[i] = tuple(g.labels(job.name, labels[i]) for g in (
                    self.m.weight_norm, self.m.effective_step, self.m.update_ratio,
                    self.m.grad_norm))
            for gauge, value in zip(gauges[i], values[i]):
                gauge.set(value)

