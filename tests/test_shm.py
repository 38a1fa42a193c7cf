"""The shared-memory data plane (server/segments.py, client/shm.py): negotiated with a shard
on this host, fallen back from by itself where the segment is out of reach or not offered,
the same results as torch's on both paths, and a worker's segment a place where a worker
can harm nothing but its own job.

The end-to-end, oracle, error and fault suites run on both paths: `make test` runs them
once as they are (shared memory, the default on one host) and once with
OPTSERVE_SHARED_MEMORY=0 (the gRPC stream). This file runs against the CUDA backend too,
whose state takes a segment's gradient as it takes a stream's chunks."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import torch

from models import make_data, make_model
from optserve.client import RemoteOptimizer
from optserve.proto.v1 import optserve_pb2 as pb
from optserve.proto.v1 import optserve_pb2_grpc as pb_grpc
from optserve.server import ShardConfig, ShardServer
from optserve.server.config import Limits
from support import DEVICE
from test_errors import JOB, refused, send_step, snapshot, step_header

LR = 1e-2


def _oracle_run(opt, model, steps: int = 5) -> None:
    """Steps `opt` and torch's AdamW on the same gradients; the parameters must agree."""
    reference = make_model()
    torch_opt = torch.optim.AdamW(reference.parameters(), lr=LR)
    x, y = make_data()
    for _ in range(steps):
        for m, o in ((model, opt), (reference, torch_opt)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def _shard(**limits) -> ShardServer:
    return ShardServer(ShardConfig(port=0, device=DEVICE, limits=Limits(**limits))).start()


def _fds_named(pid: int, name: str) -> int:
    """How many of the process's file descriptors are memfds called `name`."""
    found = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found += os.readlink(f"/proc/{pid}/fd/{fd}").startswith(f"/memfd:{name}")
        except FileNotFoundError:   # closed meanwhile
            pass
    return found


# ---- negotiation and fallback -------------------------------------------------------------

def test_a_worker_on_the_shards_host_steps_through_shared_memory(shard):
    model = make_model()
    with RemoteOptimizer(model.parameters(), "adamw", servers=[shard.address], job="shm",
                         lr=LR, shared_memory=True) as opt:
        assert opt.data_paths == ["shared_memory"]
        _oracle_run(opt, model)
        assert shard.metrics.shared_memory._value.get() > 0


@pytest.mark.parametrize("why", ["worker off", "shard off", "over the shard's limit"])
def test_without_a_segment_the_steps_stream_and_agree_with_torch(why):
    limits = {"shard off": dict(shared_memory=False),
              "over the shard's limit": dict(max_shared_memory_bytes=4096)}.get(why, {})
    server = _shard(**limits)
    try:
        model = make_model()
        with RemoteOptimizer(model.parameters(), "adamw", servers=[server.address], job="shm",
                             lr=LR, shared_memory=why != "worker off") as opt:
            assert opt.data_paths == ["grpc"]
            _oracle_run(opt, model)
    finally:
        server.stop(grace=0)


def test_a_worker_in_another_pid_namespace_falls_back_to_grpc(shard, tmp_path):
    """A container of its own: /proc/<shard pid> is not the shard there (it is absent, or
    another process whose key does not match), so the worker streams."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True).returncode:
        pytest.skip("cannot make a PID namespace here (needs unshare and CAP_SYS_ADMIN)")
    script = tmp_path / "worker.py"
    script.write_text(f"""
import sys, torch
sys.path[:0] = {[os.path.dirname(__file__)]!r}
from models import make_model
from test_shm import _oracle_run
from optserve.client import RemoteOptimizer
model = make_model()
opt = RemoteOptimizer(model.parameters(), "adamw", servers=[{shard.address!r}], job="ns", lr={LR},
                      shared_memory=True)
_oracle_run(opt, model)
print(opt.data_paths)
""")
    out = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, str(script)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "['grpc']"


def test_a_unix_socket_shard(tmp_path):
    path = str(tmp_path / "shard.sock")
    server = ShardServer(ShardConfig(port=0, device=DEVICE, unix_socket=path)).start()
    try:
        assert os.stat(path).st_mode & 0o777 == 0o600
        model = make_model()
        with RemoteOptimizer(model.parameters(), "adamw", servers=[f"unix:{path}"], job="uds",
                             lr=LR, shared_memory=True) as opt:
            assert opt.data_paths == ["shared_memory"]
            _oracle_run(opt, model)
    finally:
        server.stop(grace=0)


def test_a_restarted_shard_is_attached_again(tmp_path):
    """The segment dies with the shard; the next step is refused, the worker attaches to the
    new shard's segment and the run goes on as torch's."""
    config = ShardConfig(port=0, device=DEVICE, checkpoint_dir=str(tmp_path), checkpoint_every=1)
    server = ShardServer(config).start()
    model, reference = make_model(), make_model()
    torch_opt = torch.optim.AdamW(reference.parameters(), lr=LR)
    x, y = make_data()
    opt = RemoteOptimizer(model.parameters(), "adamw", servers=[server.address], job="restart",
                          lr=LR, rpc_timeout=20, shared_memory=True)
    try:
        for k in range(4):
            if k == 2:   # the same port, the job restored from its checkpoint at version 2
                server.stop(grace=0)
                config = ShardConfig(port=server.port, device=DEVICE, checkpoint_dir=str(tmp_path),
                                     checkpoint_every=1)
                server = ShardServer(config).start()
            for m, o in ((model, opt), (reference, torch_opt)):
                o.zero_grad()
                torch.nn.functional.cross_entropy(m(x), y).backward()
                o.step()
        assert opt.data_paths == ["shared_memory"]
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    finally:
        opt.close()
        server.stop(grace=0)


# ---- a segment cannot harm the shard, or any job but its own ------------------------------

@pytest.fixture
def shm_job(shard):
    """A job with three steps taken through shared memory, and a raw stub."""
    x, y = make_data()
    model = make_model()
    opt = RemoteOptimizer(model.parameters(), "adamw", servers=[shard.address], job=JOB, lr=LR,
                          shared_memory=True)
    assert opt.data_paths == ["shared_memory"]
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    channel = grpc.insecure_channel(shard.address)
    yield opt, pb_grpc.OptimizerStub(channel)
    channel.close()
    opt.close()


def _key(opt) -> bytes:
    return opt._segments[0].key


def _gradient(opt) -> np.ndarray:
    """The worker's view of its gradient region, as float32."""
    segment = opt._segments[0]
    return np.concatenate([segment.slots[t].numpy() for t in sorted(segment.slots)])


def _write_gradient(opt, values: np.ndarray) -> None:
    segment, start = opt._segments[0], 0
    for t in sorted(segment.slots):
        n = segment.slots[t].numel()
        segment.slots[t].copy_(torch.from_numpy(values[start:start + n]))
        start += n


def test_a_step_with_a_wrong_key_is_refused(shm_job):
    opt, stub = shm_job
    refused(stub, lambda: stub.StepShared(step_header(opt, session=opt._session,
                                                      shared_memory_key=b"x" * 32)),
            grpc.StatusCode.FAILED_PRECONDITION, "no shared-memory segment with this key")


def test_a_step_must_say_where_its_gradient_is(shm_job):
    opt, stub = shm_job
    n = sum(int(np.prod(t.shape)) for t in opt.spec.tensors)
    refused(stub, lambda: send_step(stub, step_header(opt, session=opt._session,
                                                      shared_memory_key=_key(opt)),
                                    np.zeros(n, "<f4").tobytes()),
            grpc.StatusCode.INVALID_ARGUMENT, "is a StepShared call")
    refused(stub, lambda: stub.StepShared(step_header(opt, session=opt._session)),
            grpc.StatusCode.INVALID_ARGUMENT, "no shared_memory_key")


def test_a_non_finite_gradient_in_the_segment_is_refused(shm_job):
    opt, stub = shm_job
    values = np.full(len(_gradient(opt)), 0.01, np.float32)
    values[17] = np.nan
    _write_gradient(opt, values)
    refused(stub, lambda: stub.StepShared(step_header(opt, session=opt._session,
                                                      shared_memory_key=_key(opt))),
            grpc.StatusCode.INVALID_ARGUMENT, "non-finite gradient")


def test_another_client_cannot_attach_to_a_held_worker(shm_job):
    opt, stub = shm_job
    refused(stub, lambda: stub.AttachSharedMemory(pb.AttachSharedMemoryRequest(
                job=JOB, worker=0, session="someone-else")),
            grpc.StatusCode.FAILED_PRECONDITION, "not held by this client")


def test_the_segment_cannot_be_resized(shm_job):
    """Sealed: a shrunk file under the shard's mapping would kill it with SIGBUS."""
    opt, stub = shm_job
    segment = opt._segments[0]
    answer = stub.AttachSharedMemory(pb.AttachSharedMemoryRequest(job=JOB, worker=0,
                                                                  session=opt._session))
    fd = os.open(f"/proc/{answer.host.pid}/fd/{answer.host.fd}", os.O_RDWR)
    try:
        for size in (0, answer.host.size * 2):
            with pytest.raises(PermissionError):
                os.ftruncate(fd, size)
    finally:
        os.close(fd)
    opt._segments[0] = None   # the attach above replaced the worker's segment: stream from now
    segment.close()


def test_a_retried_step_is_applied_once(shm_job):
    """The same step sent twice: torch's AdamW, loaded with the job's state and stepped once
    on the same gradient, ends where the shard does."""
    opt, stub = shm_job
    before, _, _ = snapshot(stub)
    params = [torch.nn.Parameter(torch.from_numpy(v.copy()).reshape(p.shape))
              for v, p in zip(_split(np.frombuffer(before, "<f4"), opt), opt._params)]
    reference = torch.optim.AdamW(params, lr=LR)
    reference.load_state_dict(opt.state_dict())
    _write_gradient(opt, np.full(len(_gradient(opt)), 0.01, np.float32))
    header = step_header(opt, session=opt._session, shared_memory_key=_key(opt))
    first, again = stub.StepShared(header), stub.StepShared(header)
    assert first.version == again.version == opt._version[0] + 1
    assert first.shared_memory and again.shared_memory
    for p in params:
        p.grad = torch.full_like(p, 0.01)
    reference.step()
    after, _, _ = snapshot(stub)
    for got, p in zip(_split(np.frombuffer(after, "<f4"), opt), params):
        np.testing.assert_allclose(got, p.detach().numpy().reshape(-1), rtol=1e-6, atol=1e-7)


def _split(flat: np.ndarray, opt) -> list[np.ndarray]:
    sizes = [p.numel() for p in opt._params]
    return np.split(flat, np.cumsum(sizes)[:-1])


def test_a_worker_scribbling_on_its_segment_harms_only_its_own_job(shard):
    """One job's worker writes garbage into its gradient region during its steps; the
    shard lives, and another job on it steps exactly as torch does."""
    victim = make_model(seed=3)
    noisy = RemoteOptimizer(victim.parameters(), "adamw", servers=[shard.address], job="noisy",
                            lr=LR, nonfinite="skip", shared_memory=True)
    stop = threading.Event()

    def scribble():
        rng = np.random.default_rng(0)
        segment = noisy._segments[0]
        while not stop.is_set():
            for t, slot in list(segment.slots.items()):
                slot.view(torch.int32).copy_(torch.from_numpy(
                    rng.integers(-2**31, 2**31 - 1, slot.numel(), dtype=np.int32)))
    x, y = make_data()
    thread = threading.Thread(target=scribble, daemon=True)
    thread.start()
    try:
        for _ in range(5):
            noisy.zero_grad()
            torch.nn.functional.cross_entropy(victim(x), y).backward()
            try:
                noisy.step()
            except Exception:   # its own job: refused or skipped, whatever the garbage says
                pass
        model = make_model()
        with RemoteOptimizer(model.parameters(), "adamw", servers=[shard.address], job="calm",
                             lr=LR, shared_memory=True) as calm:
            assert calm.data_paths == ["shared_memory"]
            _oracle_run(calm, model)
    finally:
        stop.set()
        thread.join()
        noisy.close()


def test_segments_go_with_their_job_and_their_shard(shard):
    pid = os.getpid()   # the shard fixture runs in this process
    model = make_model()
    opts = [RemoteOptimizer(model.parameters(), "adamw", servers=[shard.address], job="gone",
                            lr=LR, rank=r, world_size=2, shared_memory=True) for r in range(2)]
    assert _fds_named(pid, "optserve-segment") == 3   # one per worker, and the rounds'
    opts[0].delete_job()
    opts[1].close(leave=False)
    deadline = time.monotonic() + 5
    while _fds_named(pid, "optserve-segment") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _fds_named(pid, "optserve-segment") == 0
    assert shard.metrics.shared_memory._value.get() == 0


def test_a_killed_worker_leaves_nothing_behind(shard, tmp_path):
    """A worker SIGKILLed with its segment mapped: nothing of it is in any filesystem
    (/dev/shm holds no file of the shard's), and its segment goes with the job."""
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    script = tmp_path / "worker.py"
    script.write_text(f"""
import os, signal, sys, torch
sys.path[:0] = {[os.path.dirname(__file__)]!r}
from models import make_model
from optserve.client import RemoteOptimizer
model = make_model()
opt = RemoteOptimizer(model.parameters(), "adamw", servers=[{shard.address!r}], job="killed",
                      lr={LR}, shared_memory=True)
assert opt.data_paths == ["shared_memory"]
os.kill(os.getpid(), signal.SIGKILL)
""")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == -9, out.stderr
    after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert after <= before
    assert _fds_named(os.getpid(), "optserve-segment") == 1
    from optserve.client import delete_job
    delete_job([shard.address], "killed")
    assert _fds_named(os.getpid(), "optserve-segment") == 0
