"""Durable checkpoints and crash recovery, with shard processes killed for real."""
from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import random
import re
import signal
import subprocess
import time

import grpc
import numpy as np
import pytest
import torch

import workers
from models import make_data, make_model, train
from optserve import local
from optserve.client import RemoteOptimizer, RolledBack
from optserve.proto.v1 import optserve_pb2 as pb
from optserve.proto.v1 import optserve_pb2_grpc as pb_grpc
from optserve.server import ShardConfig, ShardServer, checkpoint
from optserve.server.app import EXIT_UNSAVED
from optserve.server.checkpoint import Checkpointer
from support import DEVICE

CTX = mp.get_context("spawn")
# The crash soak: CI runs a few kills; `OPTSERVE_SOAK_TRIALS=24 pytest -k crash` runs the soak.
TRIALS = int(os.environ.get("OPTSERVE_SOAK_TRIALS", "3"))


def start_shard(port: int, directory, every: int = 0, log=None) -> subprocess.Popen:
    return local.start(local.shard_command(
        "--port", str(port), "--device", DEVICE, "--checkpoint-dir", str(directory),
        "--checkpoint-every", str(every), "--grace", "2"), log).proc


def in_process(directory, every: int = 0) -> ShardServer:
    return ShardServer(ShardConfig(port=0, device=DEVICE, checkpoint_dir=str(directory),
                                   checkpoint_every=every)).start()


def checkpoint_now(address: str, job: str) -> int:
    """The Checkpoint RPC; returns the version written."""
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.OptimizerStub(channel).Checkpoint(pb.CheckpointRequest(job=job),
                                                         timeout=30).version


def state_of(address: str, job: str) -> tuple[bytes, bytes]:
    """(parameters, optimizer state payload) as the shard reports them."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.OptimizerStub(channel)
        params = b"".join(m.chunk.data for m in stub.PullParameters(pb.PullParametersRequest(job=job))
                          if m.WhichOneof("kind") == "chunk")
        state = b"".join(m.chunk.data for m in stub.GetOptimizerState(
            pb.GetOptimizerStateRequest(job=job)) if m.WhichOneof("kind") == "chunk")
    return params, state


def version_of(address: str, job: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stream = pb_grpc.OptimizerStub(channel).PullParameters(pb.PullParametersRequest(job=job),
                                                                timeout=10)
        return next(iter(stream)).header.version


def test_sigterm_checkpoints_and_a_restart_restores_bit_for_bit(tmp_path):
    port = local.free_port()
    address = f"127.0.0.1:{port}"
    shard = start_shard(port, tmp_path)
    model, ref_model = make_model(), make_model()
    opt = RemoteOptimizer(model.parameters(), "adamp", servers=[address], job="ckpt", lr=1e-2,
                          weight_decay=0.01)
    train(model, opt, 5, make_data)
    before = state_of(address, "ckpt")
    opt.close(leave=False)
    shard.send_signal(signal.SIGTERM)
    assert shard.wait(30) == 0
    assert Checkpointer(tmp_path).versions("ckpt") == [5]

    shard = start_shard(port, tmp_path)
    try:
        assert state_of(address, "ckpt") == before
        opt = RemoteOptimizer(model.parameters(), "adamp", servers=[address], job="ckpt",
                              lr=1e-2, weight_decay=0.01, resume=True)
        train(model, opt, 5, lambda i: make_data(5 + i))
        import adamp
        ref = adamp.AdamP(ref_model.parameters(), lr=1e-2, weight_decay=0.01)
        train(ref_model, ref, 10, make_data)
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        opt.close()
    finally:
        shard.kill()


def test_corrupt_checkpoint_is_skipped(tmp_path):
    port = local.free_port()
    address = f"127.0.0.1:{port}"
    shard = start_shard(port, tmp_path, every=2)
    model = make_model()
    opt = RemoteOptimizer(model.parameters(), "adamw", servers=[address], job="corrupt")
    train(model, opt, 2, make_data)
    at_two = state_of(address, "corrupt")
    train(model, opt, 2, lambda i: make_data(2 + i))
    shard.kill()
    shard.wait()
    ckpt = Checkpointer(tmp_path)
    assert ckpt.versions("corrupt") == [2, 4]
    newest = ckpt.job_dir("corrupt") / f"{4:012d}.safetensors"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    log_path = tmp_path.with_name(tmp_path.name + "-shard.log")  # beside the checkpoints
    shard = start_shard(port, tmp_path, log=log_path)
    try:
        assert state_of(address, "corrupt") == at_two
    finally:
        shard.kill()
        shard.wait()
    log = log_path.read_text()
    assert re.search(r"skipping checkpoint .*000000000004\.json: checksum mismatch", log)
    assert "restored job 'corrupt' at version 2" in log


def verify_all(directory) -> int:
    """Every checkpoint on disk verifies; returns how many there are."""
    ckpt, count = Checkpointer(directory), 0
    for job_dir in directory.iterdir():
        for manifest in job_dir.glob("*.json"):
            ckpt.load(manifest)  # raises on a checksum mismatch
            count += 1
    return count


def collect(out, procs, timeout=600):
    """Every worker's result; fails at once if a worker died instead of reporting."""
    import queue
    results, deadline = [], time.monotonic() + timeout
    while len(results) < len(procs):
        try:
            results.append(out.get(timeout=1))
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert not dead, f"a worker died (exit codes {dead})"
            assert time.monotonic() < deadline, "the workers did not finish"
    return results


def run_workers(servers, job, steps, delay=0.0):
    out = CTX.Queue()
    procs = [CTX.Process(target=workers.replaying_worker, args=(r, servers, job, steps, delay, out))
             for r in range(2)]
    for p in procs:
        p.start()
    return procs, out


def test_crash_recovery_with_sigkill_ends_bit_identical(tmp_path):
    """2 workers train through a shard that is SIGKILLed at random moments and restarted.
    Every checkpoint verifies, a restarted shard holds exactly its checkpoint, the workers
    are told (RolledBack) and replay, and the run ends bit-identical to one without crashes."""
    steps = 60 + 20 * TRIALS
    clean_dir, crash_dir = tmp_path / "clean", tmp_path / "crash"
    port = local.free_port()
    shard = start_shard(port, clean_dir, every=4)
    procs, out = run_workers([f"127.0.0.1:{port}"], "soak", steps)
    clean = sorted(collect(out, procs))
    shard.kill()

    port = local.free_port()
    address = f"127.0.0.1:{port}"
    shard = start_shard(port, crash_dir, every=4)
    procs, out = run_workers([address], "soak", steps, delay=0.03)
    rng = random.Random(int(os.environ.get("OPTSERVE_SOAK_SEED", "0")))
    deadline = time.monotonic() + 120
    while not Checkpointer(crash_dir).versions("soak"):  # training has begun
        assert time.monotonic() < deadline, "the workers never got going"
        time.sleep(0.05)
    kills = 0
    while kills < TRIALS and any(p.is_alive() for p in procs):
        # Let the workers make 1 to 9 steps of progress, so kills land at random places
        # relative to the checkpoints (every 4 versions); the first lands between two.
        target = version_of(address, "soak") + rng.randint(1, 9)
        while kills == 0 and target % 4 == 0:
            target += 1
        while any(p.is_alive() for p in procs) and version_of(address, "soak") < target:
            time.sleep(0.005)
        shard.kill()
        shard.wait()
        kills += 1
        assert verify_all(crash_dir) > 0 or not any(crash_dir.iterdir())
        shard = start_shard(port, crash_dir, every=4)
        versions = Checkpointer(crash_dir).versions("soak")
        if versions:  # the restarted shard holds exactly its newest checkpoint
            _, _, state = Checkpointer(crash_dir).load_version("soak", versions[-1])
            params, _ = state_of(address, "soak")
            assert params == state.param.tobytes()
    crashed = sorted(collect(out, procs))
    shard.kill()
    assert kills == TRIALS
    assert any(rollbacks for _, _, rollbacks in crashed), "no kill landed mid-run"
    for (rank, ours, rollbacks), (_, theirs, none) in zip(crashed, clean):
        assert none == []
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(a, b)
    print(f"{kills} kills; rollbacks {[r[2] for r in crashed]}")


class TwoShards:
    """Two shard processes checkpointing every 5 versions, each on its own port and directory."""

    def __init__(self, tmp_path):
        self.ports = [local.free_port() for _ in range(2)]
        self.servers = [f"127.0.0.1:{p}" for p in self.ports]
        self.dirs = [tmp_path / f"shard{k}" for k in range(2)]
        self.procs = [start_shard(p, d, every=5) for p, d in zip(self.ports, self.dirs)]

    def crash_and_restart(self, k: int) -> None:
        self.procs[k].kill()
        self.procs[k].wait()
        self.procs[k] = start_shard(self.ports[k], self.dirs[k], every=5)

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


def train_with_recipe(model, opt, start: int, end: int, before_step=lambda step: None) -> list[int]:
    """The README's RolledBack recipe, data chosen by step index; returns the roll-backs."""
    step, rolled_back = start, []
    while step < end:
        before_step(step)
        try:
            train(model, opt, 1, lambda i: make_data(100 + step + i))
            step += 1
        except RolledBack as e:
            rolled_back.append(e.step)
            step = e.step
    return rolled_back


def assert_matches_torch_adamw(model, steps: int, lr: float) -> None:
    reference = make_model()
    ref = torch.optim.AdamW(reference.parameters(), lr=lr)
    for i in range(steps):
        train(reference, ref, 1, lambda _: make_data(100 + i))
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_rolled_back_recipe_on_two_shards_ends_as_torch_does(tmp_path, mode):
    """One worker, two shard processes checkpointing every 5 versions; shard 0 is SIGKILLed
    after step 13 and restarted. The README's RolledBack recipe ends exactly where torch's
    AdamW ends after 20 steps, in both modes (async used to fail after the roll-back: the
    restored shard expected an older step)."""
    shards = TwoShards(tmp_path)
    try:
        model = make_model()
        opt = RemoteOptimizer(model.parameters(), "adamw", servers=shards.servers, job="recipe",
                              mode=mode, lr=1e-2)
        crashed = []

        def crash_once(step: int) -> None:
            if step == 13 and not crashed:
                shards.crash_and_restart(0)
                crashed.append(step)

        assert train_with_recipe(model, opt, 0, 20, crash_once) == [10]
        assert_matches_torch_adamw(model, 20, lr=1e-2)
        opt.close()
    finally:
        shards.stop()


def test_a_restarted_worker_rolls_back_shards_that_disagree(tmp_path):
    """The worker and shard 0 die together after step 13 (checkpoints every 5). A new worker
    registers and finds the shards at versions 10 and 13: its first step raises RolledBack(10)
    and brings both to 10, and the recipe ends as torch's AdamW after 20 steps (before, the
    model silently held half of version 10 and half of version 13)."""
    shards = TwoShards(tmp_path)
    try:
        model = make_model()
        first = RemoteOptimizer(model.parameters(), "adamw", servers=shards.servers,
                                job="rejoin", lr=1e-2)
        assert train_with_recipe(model, first, 0, 13) == []
        shards.crash_and_restart(0)
        first.close(leave=False)   # the worker "died" with it

        model = make_model(seed=7)  # a fresh process: its own initial values, replaced
        opt = RemoteOptimizer(model.parameters(), "adamw", servers=shards.servers, job="rejoin",
                              lr=1e-2, resume=True)
        assert train_with_recipe(model, opt, opt.version, 20) == [10]
        assert_matches_torch_adamw(model, 20, lr=1e-2)
        opt.close()
    finally:
        shards.stop()


# ---- what must not lose state: failed writes, long names, damaged manifests, shared directories ----

def trained(address: str, job: str, steps: int) -> tuple[torch.nn.Module, RemoteOptimizer]:
    """A model and its optimizer on the shard at `address`, `steps` steps into training."""
    model = make_model()
    opt = RemoteOptimizer(model.parameters(), "adamw", servers=[address], job=job)
    train(model, opt, steps)
    return model, opt


def test_a_failed_checkpoint_on_sigterm_stops_no_other_and_the_exit_says_so(tmp_path):
    """Three jobs; the first's checkpoint cannot be written (a file stands where its
    directory goes). On SIGTERM the other two are checkpointed all the same, the failure is
    logged naming the job and the error, and `optserve server` exits EXIT_UNSAVED (75),
    not 0 (it used to stop at the first failure and exit 0)."""
    port = local.free_port()
    log_path = tmp_path.with_name(tmp_path.name + "-shard.log")
    shard = start_shard(port, tmp_path, log=log_path)
    try:
        for job in ("blocked", "second", "third"):
            trained(f"127.0.0.1:{port}", job, 1)[1].close(leave=False)
        Checkpointer(tmp_path).job_dir("blocked").write_text("not a directory")
        shard.send_signal(signal.SIGTERM)
        assert shard.wait(30) == EXIT_UNSAVED
    finally:
        shard.kill()
        shard.wait()
    assert [Checkpointer(tmp_path).versions(job) for job in ("second", "third")] == [[1], [1]]
    assert re.search(r"job 'blocked': checkpoint at version 1 failed.*FileExistsError",
                     log_path.read_text())


def test_a_failed_periodic_checkpoint_is_logged_and_the_job_goes_on(tmp_path, caplog):
    """A checkpoint due at a step cannot be written: the step is taken all the same (the
    parameters are torch's), the log names the job and the error, and once the obstacle
    is gone the next due step writes its checkpoint."""
    server = in_process(tmp_path, every=1)
    try:
        blocked = Checkpointer(tmp_path).job_dir("periodic")
        blocked.write_text("not a directory")
        model, reference = make_model(), make_model()
        opt = RemoteOptimizer(model.parameters(), "adamw", servers=[server.address],
                              job="periodic", lr=1e-2)
        with caplog.at_level("ERROR", logger="optserve.server"):
            train(model, opt, 2)
        assert re.search(r"job 'periodic': checkpoint at version 2 failed.*FileExistsError",
                         caplog.text)
        blocked.unlink()
        train(model, opt, 1)
        assert Checkpointer(tmp_path).versions("periodic") == [3]
        train(reference, torch.optim.AdamW(reference.parameters(), lr=1e-2), 3)
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        opt.close()
    finally:
        server.stop(grace=0)


def test_names_too_long_for_a_file_name_are_checkpointed_and_restored(tmp_path):
    """A job's directory is its name in base64, which for 192 or more UTF-8 bytes is longer
    than a file name may be (it used to fail the Checkpoint RPC with INTERNAL, and the
    periodic and shutdown checkpoints silently): such names get a hashed directory. Each
    name is checkpointed by the RPC, every step and on stopping, and restored."""
    names = ["a" * 191, "a" * 192, "名" * 85 + "!"]   # 255 base64 characters, 256, 256 bytes
    server = in_process(tmp_path, every=1)
    try:
        before = {}
        for name in names:
            _, opt = trained(server.address, name, 2)
            assert checkpoint_now(server.address, name) == 2
            before[name] = state_of(server.address, name)
            opt.close(leave=False)
    finally:
        server.stop(grace=0)
    assert server.unsaved == []
    server = in_process(tmp_path)
    try:
        for name in names:
            assert Checkpointer(tmp_path).versions(name) == [1, 2]
            assert state_of(server.address, name) == before[name]
    finally:
        server.stop(grace=0)


def as_format_1(path) -> None:
    """Rewrites a manifest as the previous version wrote it (no checksum of its own)."""
    manifest = json.loads(path.read_text())
    del manifest["manifest_sha256"]
    path.write_text(json.dumps({**manifest, "format": 1}, indent=1))


def without_worker_steps(text: str) -> str:
    manifest = json.loads(text)
    del manifest["worker_steps"]
    return json.dumps(manifest, indent=1)


DAMAGES = {
    "altered version": lambda text: text.replace('"version": 2,', '"version": 5,'),
    "undecodable spec": lambda text: re.sub(r'"spec": "[^"]*"', '"spec": "CgVhYg=="', text),
    "missing key": without_worker_steps,
    "truncated JSON": lambda text: text[:len(text) // 2],
}


@pytest.mark.parametrize("fmt", [1, 2])
@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_manifest_falls_back_to_the_older_checkpoint(tmp_path, damage, fmt):
    """The newest manifest of one job is damaged. The shard starts, restores that job from
    its older checkpoint and the other job from its newest, bit for bit (an altered version
    used to be restored as it was; a spec that does not decode or a missing key kept the
    shard from starting at all). In format 2 the manifest's checksum catches the damage;
    checkpoints of format 1, which the previous version wrote, still restore, and are
    checked field by field."""
    server = in_process(tmp_path, every=1)
    try:
        states = {}
        for job in ("damaged", "intact"):
            model, opt = trained(server.address, job, 1)
            at_one = state_of(server.address, job)
            train(model, opt, 1)
            states[job] = at_one, state_of(server.address, job)
            opt.close(leave=False)
    finally:
        server.stop(grace=0)
    ckpt = Checkpointer(tmp_path)
    if fmt == 1:
        for job in states:
            for version in (1, 2):
                as_format_1(ckpt.job_dir(job) / f"{version:012d}.json")
    newest = ckpt.job_dir("damaged") / f"{2:012d}.json"
    damaged = DAMAGES[damage](newest.read_text())
    assert damaged != newest.read_text()
    newest.write_text(damaged)

    server = in_process(tmp_path)
    try:
        assert version_of(server.address, "damaged") == 1
        assert state_of(server.address, "damaged") == states["damaged"][0]
        assert version_of(server.address, "intact") == 2
        assert state_of(server.address, "intact") == states["intact"][1]
    finally:
        server.stop(grace=0)


def test_a_failed_checkpoint_leaves_no_file_behind(tmp_path, monkeypatch):
    """The manifest cannot be written after the tensors were (a full disk, say), and a
    crash left a temporary file. Neither the orphaned tensors, which no pruning used to
    remove, nor the temporary file outlive the next checkpoint, which succeeds."""
    server = in_process(tmp_path)
    try:
        model, opt = trained(server.address, "orphan", 1)
        assert checkpoint_now(server.address, "orphan") == 1
        write = checkpoint._write_atomically

        def disk_full_for_manifests(path, data):
            if path.suffix == ".json":
                raise OSError(errno.ENOSPC, "No space left on device")
            write(path, data)

        monkeypatch.setattr(checkpoint, "_write_atomically", disk_full_for_manifests)
        train(model, opt, 1)
        with pytest.raises(grpc.RpcError) as e:
            checkpoint_now(server.address, "orphan")
        assert e.value.code() == grpc.StatusCode.INTERNAL
        assert "No space left on device" in e.value.details()
        monkeypatch.setattr(checkpoint, "_write_atomically", write)
        directory = Checkpointer(tmp_path).job_dir("orphan")
        (directory / f".{3:012d}.safetensors.x1y2z3").write_bytes(b"half written")
        train(model, opt, 1)
        assert checkpoint_now(server.address, "orphan") == 3
        assert sorted(p.name for p in directory.iterdir()) == [
            f"{v:012d}.{ext}" for v in (1, 3) for ext in ("json", "safetensors")]
        opt.close()
    finally:
        server.stop(grace=0)


def test_a_second_shard_on_the_same_checkpoint_directory_refuses_to_start(tmp_path):
    """Two shards writing one directory would overwrite each other's checkpoints. The
    first holds it: a second `optserve server`, or ShardServer in-process, refuses to start
    and names the directory; the first goes on serving. A stopped shard lets it go."""
    in_use = f"checkpoint directory {tmp_path} is in use by another shard"
    port = local.free_port()
    first = start_shard(port, tmp_path)
    try:
        trained(f"127.0.0.1:{port}", "held", 1)[1].close(leave=False)
        second = subprocess.run(local.shard_command("--device", DEVICE, "--checkpoint-dir",
                                                    str(tmp_path)),
                                capture_output=True, text=True, timeout=60)
        assert second.returncode != 0
        assert in_use in second.stderr and "Traceback" not in second.stderr
        with pytest.raises(OSError, match=re.escape(in_use)):
            in_process(tmp_path)
        assert version_of(f"127.0.0.1:{port}", "held") == 1
    finally:
        first.kill()
        first.wait()
    server = in_process(tmp_path)   # a killed shard's lock is gone with it
    try:
        with pytest.raises(OSError, match=re.escape(in_use)):
            in_process(tmp_path)
    finally:
        server.stop(grace=0)
    in_process(tmp_path).stop(grace=0)
