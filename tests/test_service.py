"""The service around the optimizer: the proto contract, health, reflection, the shard
process's lifecycle and the dependency boundaries between worker and shard."""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from models import make_data, make_model
from optserve import local
from optserve.client import RemoteOptimizer
from support import DEVICE

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_generated_code_matches_proto(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), str(tmp_path)], check=True)
    committed = ROOT / "proto" / "v1"
    generated = sorted(p.name for p in tmp_path.iterdir())
    assert generated == sorted(p.name for p in committed.iterdir() if p.is_file()
                               and not p.name.endswith(".pyc"))
    for name in generated:
        assert (tmp_path / name).read_bytes() == (committed / name).read_bytes(), (
            f"proto/v1/{name} is stale: run `python proto/generate.py`")


def test_health_and_reflection(shard):
    channel = grpc.insecure_channel(shard.address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "optserve.v1.Optimizer"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")])))
    names = {s.name for s in reply.list_services_response.service}
    assert {"optserve.v1.Optimizer", "grpc.health.v1.Health"} <= names
    channel.close()


def test_server_process_logs_jobs_and_exits_cleanly_on_sigterm(tmp_path):
    shard = local.start(local.shard_command("--grace", "2", "--device", DEVICE, "--threads", "1"),
                        tmp_path / "shard.log")
    proc = shard.proc
    try:
        model = make_model()
        opt = RemoteOptimizer(model.parameters(), "adamp", servers=[shard.address],
                              job="lifecycle")
        x, y = make_data()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        log = (tmp_path / "shard.log").read_text()
        assert "registered job 'lifecycle': optimizer=adamp" in log
        assert "received SIGTERM" in log
    finally:
        proc.kill()


BLOCK = "import sys\nfor m in {mods!r}: sys.modules[m] = None\n"


@pytest.mark.parametrize("module,blocked", [
    ("optserve.server", ["torch"]),
    ("optserve.client", ["cupy", "numba", "prometheus_client"]),
])
def test_dependency_boundaries(module, blocked):
    """The shard runs without torch; a worker needs neither cupy, numba nor prometheus."""
    code = BLOCK.format(mods=blocked) + f"import {module}\n"
    if module == "optserve.server":
        code += (f"s = optserve.server.ShardServer(optserve.server.ShardConfig(port=0, device={DEVICE!r})).start()\n"
                 "s.stop(0)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_demo_compare_shows_adamp_keeping_scale_invariant_norms_flat(tmp_path):
    """The science demo, short, as a user runs it: on conv weights followed by BatchNorm,
    AdamP's projection keeps the norm from growing the way Adam+L2's does, so its effective
    step is larger than AdamW's; Adafactor's factored state and Lion's one buffer are smaller
    than Adam's two; at ε = 1e-3, torch's placement of ε takes a first step several times
    Keras's. The plot goes where it says, in the temporary directory by default, and nothing
    else is left there."""
    import re
    from optserve import compare
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "optserve", "demo", "--compare", "--steps", "40",
         "--device", DEVICE], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "TMPDIR": str(tmp)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(
        r"^  (\S+) +(\S+) +(\S+) +([-+][\d.]+)% +(\S+) +(\S+) rad +([\d,]+) B$",
        proc.stdout, re.M)}
    assert list(rows) == list(compare.RUNS), proc.stdout
    growth = {k: float(r[2]) for k, r in rows.items()}
    step = {k: float(r[3]) for k, r in rows.items()}
    state = {k: int(r[5].replace(",", "")) for k, r in rows.items()}
    assert growth["AdamP"] < 0.5 * growth["Adam+L2"], growth
    assert step["AdamP"] > 1.02 * step["AdamW"], step      # the same update, a smaller norm
    n = sum(p.numel() for p in demo_model().parameters())
    assert state["AdamW"] == state["AdamP"] == 8 * n       # exp_avg and exp_avg_sq, float32
    assert state["Lion"] == 4 * n                          # exp_avg only
    assert state["Adafactor"] < state["AdamW"] / 4
    eps = {m.group(1): [float(v) for v in m.group(2).split()] for m in re.finditer(
        r"^  (torch ε|Keras ε̂) +((?:[\d.e+-]+ +)+)[\d.]+$", proc.stdout, re.M)}
    assert list(eps) == list(compare.EPS_RUNS), proc.stdout
    assert eps["torch ε"][0] > 2 * eps["Keras ε̂"][0], eps   # the effective step at step 1
    (plot,) = re.findall(r"^plot: (.+)$", proc.stdout, re.M)
    assert pathlib.Path(plot) == tmp / "optserve" / "compare.png"
    assert pathlib.Path(plot).stat().st_size > 10_000
    assert not list(tmp.glob("optserve-*")), list(tmp.iterdir())   # the shard's log folder


def demo_model():
    from optserve.demo import make_model
    return make_model()


def test_the_compare_plot_draws_every_run_in_its_panels(tmp_path):
    from optserve.compare import EPS_RUNS, RUNS, plot

    def runs(labels):
        return [dict(label=label, start_norm=1.0, norms=[1.0 + k * i / 100 for i in range(1, 31)],
                     angles=[0.01 / (k + 1)] * 30) for k, label in enumerate(labels)]

    figure = plot(runs(RUNS), runs(EPS_RUNS), tmp_path / "compare.png")
    drawn = [[line.get_label() for line in axes.get_lines()] for axes in figure.axes]
    assert drawn == [list(RUNS), list(RUNS), list(EPS_RUNS)]
    assert (tmp_path / "compare.png").stat().st_size > 10_000


def test_the_wheel_carries_everything_a_shard_loads(tmp_path):
    """What `pip install .` installs, as the image does: the proto and the CUDA sources (an
    editable install would hide a file the wheel leaves out)."""
    import zipfile
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True, timeout=300,
                   capture_output=True)
    names = set(zipfile.ZipFile(next(tmp_path.glob("optserve-*.whl"))).namelist())
    sources = {f"optserve/kernels/csrc/{p.name}" for p in (ROOT / "kernels" / "csrc").iterdir()}
    assert sources and sources <= names, sources - names
    assert "optserve/proto/optserve/v1/optserve.proto" in names
