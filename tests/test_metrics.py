"""The shard's Prometheus metrics, scraped over HTTP from a real shard, against float64 math."""
from __future__ import annotations

import math
import shutil
import subprocess
import urllib.request

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from models import make_data, make_model
from optserve.client import RemoteOptimizer
from optserve.server import ShardConfig, ShardServer
from optserve.server.metrics import ShardMetrics, angular_step, tensor_series
from support import DEVICE, skip_or_fail


@pytest.fixture
def metered():
    """A shard with its metrics served over HTTP on a free port, and a scrape function."""
    server = ShardServer(ShardConfig(port=0, device=DEVICE, max_tensor_series=4)).start()
    port = server.serve_metrics(0)

    def scrape(raw: bool = False) -> dict[tuple[str, tuple], float] | str:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        if raw:
            return text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    yield server, scrape
    server.stop(grace=0)


def sample(samples, name, **labels):
    return samples[(name, tuple(sorted(labels.items())))]


def f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy().ravel()


@pytest.mark.usefixtures("step_path")
@pytest.mark.parametrize("lr", [1e-2, 1e-5, 1e-8])
def test_per_tensor_metrics_match_float64_math(metered, lr):
    """Weight norm, effective step (down to angles of ~1e-6 and below), update ratio and
    gradient norm of every tensor, against float64 math on the parameters before and after."""
    server, scrape = metered
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8, bias=False))
    opt = RemoteOptimizer(model.named_parameters(), "adamw", servers=[server.address],
                          job=f"m{lr:g}", lr=lr, weight_decay=0.0)
    model(torch.randn(16, 64)).square().mean().backward()
    before = {n: f64(p) for n, p in model.named_parameters()}
    grads = {n: f64(p.grad) for n, p in model.named_parameters()}
    opt.step()
    samples = scrape()
    for name, p in model.named_parameters():
        w0, w1 = before[name], f64(p)
        angle = np.linalg.norm(w1 / np.linalg.norm(w1) - w0 / np.linalg.norm(w0))
        labels = dict(training_job=f"m{lr:g}", tensor=name)
        assert sample(samples, "optserve_effective_step", **labels) == pytest.approx(angle, rel=1e-6)
        assert sample(samples, "optserve_weight_norm", **labels) == pytest.approx(
            np.linalg.norm(w1), rel=1e-9)
        assert sample(samples, "optserve_update_ratio", **labels) == pytest.approx(
            np.linalg.norm(w1 - w0) / np.linalg.norm(w0), rel=1e-6)
        assert sample(samples, "optserve_grad_norm", **labels) == pytest.approx(
            np.linalg.norm(grads[name]), rel=1e-6)
    if lr == 1e-8:  # the point of the careful formula: sqrt(2 - 2cos) in float32 gives 0 here
        assert 0 < sample(samples, "optserve_effective_step", training_job="m1e-08",
                          tensor="0.weight") < 1e-6
    opt.close()


def test_angular_step_for_tiny_angles():
    rng = np.random.default_rng(0)
    for angle in (1e-2, 1e-4, 1e-6, 1e-7):
        w0 = rng.standard_normal(4096)
        dw = angle * np.linalg.norm(w0) / 64 * rng.standard_normal(4096)
        w1 = w0 + dw
        truth = np.linalg.norm(w1 / np.linalg.norm(w1) - w0 / np.linalg.norm(w0))
        got = angular_step(np.array([w0 @ w0]), np.array([w0 @ dw]), np.array([dw @ dw]))[0]
        assert got == pytest.approx(truth, rel=1e-7)


def test_series_beyond_the_cap_are_aggregated_by_prefix(metered):
    """More tensors than --max-tensor-series (4 here): series per name prefix, whose norm is
    the norm of the concatenated tensors."""
    server, scrape = metered
    x, y = make_data()
    model = make_model()  # conv, bn (2), fc1 (2), fc2 (2): 7 tensors
    opt = RemoteOptimizer(model.named_parameters(), "adamp", servers=[server.address],
                          job="capped", lr=1e-3)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    projected = adamp_would_project(model)
    opt.step()
    samples = scrape()
    names = [n for n, _ in model.named_parameters()]
    assert sorted(set(tensor_series(names, 4))) == ["bn.*", "conv.*", "fc1.*", "fc2.*"]
    fc1 = np.concatenate([f64(model.fc1.weight), f64(model.fc1.bias)])
    assert sample(samples, "optserve_weight_norm", training_job="capped",
                  tensor="fc1.*") == pytest.approx(np.linalg.norm(fc1), rel=1e-9)
    assert ("optserve_weight_norm",
            (("tensor", "fc1.weight"), ("training_job", "capped"))) not in samples
    assert sample(samples, "optserve_stepped_tensors", training_job="capped") == 7
    # conv is scale-invariant (a BatchNorm follows), so its gradient is orthogonal to it
    assert projected >= 1 and sample(samples, "optserve_adamp_projected_tensors",
                                     training_job="capped") == projected
    opt.close()


def adamp_would_project(model: torch.nn.Module) -> int:
    """How many tensors the `adamp` package projects in its next step, from its own
    cosine test (channel view, then layer view) on the current weights and gradients."""
    from adamp import AdamP
    oracle = AdamP(model.parameters())
    delta, eps = oracle.defaults["delta"], oracle.defaults["eps"]
    count = 0
    for p in model.parameters():
        if p.dim() > 1:
            count += any(oracle._cosine_similarity(p.grad, p.data, eps, view).max()
                         < delta / math.sqrt(view(p.data).size(1))
                         for view in (oracle._channel_view, oracle._layer_view))
    return count


def test_service_metrics(metered):
    server, scrape = metered
    x, y = make_data()
    model = make_model()
    opt = RemoteOptimizer(model.parameters(), "adafactor", servers=[server.address], job="svc")
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.fc2.bias.grad[0] = float("nan")
    with pytest.raises(Exception, match="non-finite"):
        opt.step()
    samples = scrape()
    assert sample(samples, "optserve_steps_total", training_job="svc") == 3
    assert sample(samples, "optserve_job_version", training_job="svc") == 3
    assert sample(samples, "optserve_skipped_steps_total", training_job="svc",
                  reason="nonfinite") == 1
    step = "StepShared" if opt.data_paths == ["shared_memory"] else "Step"
    assert sample(samples, "optserve_rpcs_total", method=step, code="OK") == 3
    assert sample(samples, "optserve_rpcs_total", method=step, code="INVALID_ARGUMENT") == 1
    assert sample(samples, "optserve_rpcs_total", method="RegisterJob", code="OK") == 1
    for phase in ("receive", "wait", "compute", "send"):
        assert sample(samples, "optserve_step_phase_seconds_count", training_job="svc",
                      phase=phase) >= 3
    n = sum(p.numel() for p in model.parameters())
    assert sample(samples, "optserve_received_bytes_total", training_job="svc") == 4 * 4 * n
    assert sample(samples, "optserve_sent_bytes_total", training_job="svc") == 3 * 4 * n
    assert sample(samples, "optserve_adafactor_clip_ratio", training_job="svc") >= 1
    assert sample(samples, "optserve_state_bytes", training_job="svc") > 4 * n
    assert sample(samples, "optserve_shard_up") == 1
    assert sample(samples, "optserve_learning_rate", training_job="svc", group="0") == 0.0
    opt.close()


def test_step_sums_are_computed_only_for_a_metrics_refresh(monkeypatch):
    """--metrics-every 2: the backend is asked for the float64 step sums on versions 2 and 4
    only, and the per-tensor gauges after version 3 still show version 2's step."""
    server = ShardServer(ShardConfig(port=0, device=DEVICE, metrics_every=2)).start()
    port = server.serve_metrics(0)
    asked = []
    backend_step = server.backend.step

    def spy(*args, sums=True):
        asked.append(sums)
        return backend_step(*args, sums=sums)

    monkeypatch.setattr(server.backend, "step", spy)
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(16, 4)
        opt = RemoteOptimizer(model.named_parameters(), "adamw", servers=[server.address],
                              job="every2", lr=1e-2)
        norms = []
        for _ in range(4):
            opt.zero_grad()
            model(torch.randn(8, 16)).square().mean().backward()
            opt.step()
            norms.append(np.linalg.norm(f64(model.weight)))
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for family in text_string_to_metric_families(text) for s in family.samples}
            shown = samples.get(("optserve_weight_norm",
                                 (("tensor", "weight"), ("training_job", "every2"))))
            if len(norms) == 1:
                assert shown is None            # version 1: no refresh yet
            else:                               # the last even version's norm
                assert shown == pytest.approx(norms[len(norms) // 2 * 2 - 1], rel=1e-9)
        assert asked == [False, True, False, True]
        opt.close()
    finally:
        server.stop(grace=0)


def test_the_exposition_fits_a_standard_prometheus_scrape(metered):
    """What a shard serves passes `promtool check metrics`; the training job is in
    `training_job` (a target's own `job` would collide with the scrape's), there is no
    `_created` series, and every counter of bytes is named `<what>_bytes_total`."""
    server, scrape = metered
    model = torch.nn.Linear(8, 4)
    opt = RemoteOptimizer(model.named_parameters(), "adamw", servers=[server.address],
                          job="lint", lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 8)).square().mean().backward()
        opt.step()
    opt.close()
    text = scrape(raw=True)
    families = list(text_string_to_metric_families(text))
    samples = [s for f in families for s in f.samples]
    assert not [s.name for s in samples if s.name.endswith("_created")]
    assert not [s for s in samples if "job" in s.labels]
    per_job = {s.name for s in samples if s.labels.get("training_job") == "lint"}
    assert {"optserve_steps_total", "optserve_received_bytes_total",
            "optserve_sent_bytes_total", "optserve_weight_norm"} <= per_job
    bytes_counters = [f.name for f in families if f.type == "counter" and "bytes" in f.name]
    assert bytes_counters and all(name.endswith("_bytes") for name in bytes_counters), \
        bytes_counters
    promtool = shutil.which("promtool")
    if promtool is None:
        skip_or_fail("promtool is not installed (apt-get install prometheus)")
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60)
    assert lint.returncode == 0 and not (lint.stdout + lint.stderr).strip(), \
        lint.stdout + lint.stderr


def test_device_copies_are_a_bytes_total_counter():
    """The GPU backend's copy counter, as a scrape reads it (the collector is fed a report
    here, as the CUDA backend's device_report would)."""
    from prometheus_client import generate_latest
    metrics = ShardMetrics()
    metrics.watch_device(lambda: dict(device=1, device_limit=2, pinned=3, h2d=40, d2h=50))
    samples = {(s.name, tuple(s.labels.items())): s.value for f in text_string_to_metric_families(
        generate_latest(metrics.registry).decode()) for s in f.samples}
    assert samples[("optserve_device_copy_bytes_total", (("direction", "h2d"),))] == 40
    assert samples[("optserve_device_memory_bytes", (("kind", "pinned"),))] == 3


def test_only_the_shards_registry_drops_created_series():
    """Other registries in the process (a worker's, the library's default) keep
    prometheus_client's own setting: the shard does not turn `_created` off globally."""
    from prometheus_client import CollectorRegistry, Counter, generate_latest
    shard, other = ShardMetrics(), CollectorRegistry()
    shard.steps.labels("j").inc()
    Counter("other_events", "a counter of another library user", registry=other).inc()
    assert b"optserve_steps_created" not in generate_latest(shard.registry)
    assert b"other_events_created" in generate_latest(other)
