"""A shard among machines: the interface it binds (--host) and the name it advertises
(--advertise-address), and logs a cluster's log pipeline can parse (--log-format json), on
real `python -m optserve server` processes and real gRPC calls."""
from __future__ import annotations

import datetime
import json
import signal
import socket
import subprocess
import sys

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from models import make_data, make_model
from optserve import local
from optserve.client import RemoteOptimizer
from optserve.server import ShardConfig, ShardServer
from optserve.server.app import EXIT_UNSAVED
from optserve.server.checkpoint import Checkpointer
from support import DEVICE

SERVING = health_pb2.HealthCheckResponse.SERVING


def steps(address: str, job: str, count: int = 2) -> None:
    x, y = make_data()
    model = make_model()
    opt = RemoteOptimizer(model.parameters(), "adamw", servers=[address], job=job, retries=0)
    for _ in range(count):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    opt.close()


def health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                         timeout=5).status


def json_lines(text: str) -> list[dict]:
    """Every line parsed as a JSON object with the four fields (a line that is not fails)."""
    records = []
    for line in text.splitlines():
        record = json.loads(line)
        assert {"time", "level", "logger", "message"} <= record.keys(), line
        assert datetime.datetime.fromisoformat(record["time"].replace("Z", "+00:00")).tzinfo
        records.append(record)
    return records


def test_workers_dial_the_advertised_address(tmp_path):
    """Bound to loopback, advertised as localhost: the "listening on" line and the logs give
    the advertised name, and a worker that dials it trains."""
    log = tmp_path / "shard.log"
    shard = local.start(local.shard_command("--device", DEVICE, "--host", "127.0.0.1",
                                            "--advertise-address", "localhost"), log)
    try:
        host, port = shard.address.rsplit(":", 1)
        assert host == "localhost"
        steps(shard.address, "advertised")
    finally:
        shard.stop()
    text = log.read_text()
    assert f"shard serving on localhost:{port} (bound to 127.0.0.1:{port}" in text
    assert f"shard on localhost:{port} stopped" in text


def test_a_shard_on_every_interface_advertises_its_host_name():
    server = ShardServer(ShardConfig(host="0.0.0.0", port=0, device=DEVICE)).start()
    try:
        assert server.address == f"{socket.gethostname()}:{server.port}"
        assert health(f"127.0.0.1:{server.port}") == SERVING   # bound on loopback too
    finally:
        server.stop(0)


def test_an_ipv6_address_is_bound_and_advertised_in_brackets():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    server = ShardServer(ShardConfig(host="::1", port=0, device=DEVICE)).start()
    try:
        assert server.address == f"[::1]:{server.port}"
        assert health(server.address) == SERVING
    finally:
        server.stop(0)


def test_json_logs_are_one_object_a_line(tmp_path):
    """`--log-format json`: stdout's "listening on" line and every line on stderr are JSON
    objects, a failure's traceback in `exception`. Every checkpoint of the job fails here (a
    file stands where its directory goes), so the log has tracebacks, and the shard exits
    EXIT_UNSAVED after SIGTERM."""
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    Checkpointer(checkpoints).job_dir("json-logs").write_text("not a directory")
    log = tmp_path / "stderr.log"
    shard = local.start(local.shard_command(
        "--device", DEVICE, "--log-format", "json", "--checkpoint-dir", str(checkpoints),
        "--checkpoint-every", "1", "--metrics-port", "0",
        "--health-port", str(local.free_port())), log)
    try:
        steps(shard.address, "json-logs")
        shard.proc.send_signal(signal.SIGTERM)
        assert shard.proc.wait(timeout=60) == EXIT_UNSAVED
    finally:
        shard.stop()
    stdout = shard.proc.stdout.read()
    records = json_lines(log.read_text())
    assert json_lines(stdout) == []   # nothing after the announcement, which was JSON too
    failed = [r for r in records if "exception" in r]
    assert failed and all(r["level"] == "ERROR" for r in failed)
    assert "Traceback (most recent call last)" in failed[0]["exception"]
    assert "FileExistsError" in failed[0]["exception"]
    assert "\n" not in json.dumps(failed[0])   # one line, however long the traceback
    messages = [r["message"] for r in records]
    assert any(m.startswith("shard serving on") for m in messages)
    assert any(m.startswith("received SIGTERM") for m in messages)


def test_json_logs_take_in_what_native_code_writes_to_stderr():
    """Native libraries (gRPC's C core) write to file descriptor 2 directly: in JSON mode
    those lines are records too, with the level of a glog-style line, and the last ones
    before the process exits still come out."""
    code = ("import os, sys; from optserve import logs; logs.configure('json'); "
            "os.write(2, b'E1203 12:00:00.000000 1 native.cc:1] from C\\n'); "
            "print('a plain print to stderr', file=sys.stderr); "
            "os.write(2, b'no newline at exit')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    records = json_lines(proc.stderr)
    assert [(r["logger"], r["level"], r["message"]) for r in records] == [
        ("stderr", "ERROR", "E1203 12:00:00.000000 1 native.cc:1] from C"),
        ("stderr", "WARNING", "a plain print to stderr"),
        ("stderr", "WARNING", "no newline at exit")]


def test_json_logs_of_a_shard_that_cannot_bind(tmp_path):
    """A startup failure (the port is taken): gRPC's own complaint and the shard's reason,
    both as JSON, and exit status 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(local.shard_command("--device", DEVICE, "--port", str(port),
                                                  "--log-format", "json"),
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    records = json_lines(proc.stderr)
    assert any(r["level"] == "ERROR" and f"could not bind 127.0.0.1:{port}" in r["message"]
               for r in records), proc.stderr
