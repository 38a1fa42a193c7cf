"""optserve.ray on a real Ray cluster of two nodes (`ray start` on 127.0.0.2 and 127.0.0.3):
two shards as actors on different nodes, two workers under Ray Train's TorchTrainer, and a
shard process SIGKILLed mid-run that Ray brings back from its checkpoint."""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import grpc
import pytest
import torch

from optserve import local
from optserve.proto.v1 import optserve_pb2 as pb
from optserve.proto.v1 import optserve_pb2_grpc as pb_grpc
from support import DEVICE, skip_or_fail

# Two nodes on one host: Ray takes 127.0.0.1 for "this machine" and swaps in its outward
# address, but any other loopback address reaches the host on Linux and stays as given.
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
STEPS, EVERY, LR, WEIGHT_DECAY = 30, 5, 1e-2, 0.01
KILL_AT = 12          # the version after which shard 0 is killed: between two checkpoints
TIME_LIMIT = 240.0    # seconds for one training run, start to finish


# ---- the workers: a Ray Train loop, batches a function of the step index ----

def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def batch(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)


def train_loop(config: dict) -> None:
    """One Ray Train worker, as the README's recipe has it: the shards' addresses looked up
    by their actors' names, rank and world size from the trainer's context, resume=True
    and the RolledBack recipe; its final parameters and roll-backs saved for the test."""
    import ray.train
    import optserve.ray
    from optserve.client import RemoteOptimizer, RolledBack
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(1)
    model = make_model()
    opt = RemoteOptimizer(model.parameters(), "adamw",
                          servers=optserve.ray.shard_addresses(config["job"], 2),
                          job=config["job"], rank=rank, world_size=world_size, resume=True,
                          lr=LR, weight_decay=WEIGHT_DECAY, rpc_timeout=20.0, timeout=60.0)
    step, rollbacks = opt.version, []
    while step < STEPS:
        x, y = batch(step, rank)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        time.sleep(config["delay"])   # a training step's worth of time, for the kill to land
        try:
            opt.step()
            step += 1
        except RolledBack as e:
            rollbacks.append((step, e.step))
            step = e.step
    torch.save({"params": [p.detach().clone() for p in model.parameters()],
                "rollbacks": rollbacks}, pathlib.Path(config["out"]) / f"rank{rank}.pt")
    opt.close()


def adamw_on_the_mean(world_size: int, steps: int = STEPS) -> list[torch.Tensor]:
    """The oracle: torch's AdamW fed the mean of the workers' gradients, step by step."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    for step in range(steps):
        grads = []
        for rank in range(world_size):
            model.zero_grad()
            x, y = batch(step, rank)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for p, *gs in zip(model.parameters(), *grads):
            p.grad = sum(gs) / world_size
        opt.step()
    return [p.detach() for p in model.parameters()]


# ---- a cluster of two Ray nodes on this host ----

@dataclass
class Cluster:
    root: pathlib.Path
    address: str


def start_node(root: pathlib.Path, name: str, ip: str, *args: str) -> subprocess.Popen:
    """`ray start --block` for one node, in its own process group and temp dir; returns once
    the node is up. The workers it starts can import this module (PYTHONPATH)."""
    log = root / f"{name}.log"
    # No drain on SIGTERM: there is no traffic to let go (it would wait out its timeout).
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(pathlib.Path(__file__).parent),
                                                       os.environ.get("PYTHONPATH")]))}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(pathlib.Path(sys.executable).with_name("ray")), "start", "--block",
             "--node-ip-address", ip, "--num-cpus", "2", "--object-store-memory", "100000000",
             "--temp-dir", str(root / name), "--disable-usage-stats", *args],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    deadline = time.monotonic() + 90
    while "Ray runtime started" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_node(proc)
            pytest.fail(f"ray start for {name} ({ip}) failed:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return proc


def stop_node(proc: subprocess.Popen) -> None:
    """SIGTERM to `ray start --block`, which stops its node's processes; then SIGKILL to its
    process group for anything left. (`ray stop` would stop every Ray node on the host.)"""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.fixture(scope="module")
def cluster():
    try:
        import ray
        import ray.train.torch  # noqa: F401 (the TorchTrainer the workers run under)
    except ImportError as e:
        skip_or_fail(f"Ray is not installed ({e}): pip install 'optserve[ray]'")
    # Short: Ray's socket paths under it must fit in 107 bytes.
    root = pathlib.Path(tempfile.mkdtemp(prefix="optserve-ray-"))
    nodes = []
    try:
        port = local.free_port()
        nodes.append(start_node(root, "head", HEAD_IP, "--head", "--port", str(port),
                                "--include-dashboard=false",
                                "--ray-client-server-port", str(local.free_port()),
                                "--min-worker-port", "10002", "--max-worker-port", "14999"))
        nodes.append(start_node(root, "worker", WORKER_IP, "--address", f"{HEAD_IP}:{port}",
                                "--min-worker-port", "15000", "--max-worker-port", "19999"))
        ray.init(address=f"{HEAD_IP}:{port}", _node_ip_address=HEAD_IP, log_to_driver=False)
        deadline = time.monotonic() + 60
        while sum(n["Alive"] for n in ray.nodes()) < 2:
            assert time.monotonic() < deadline, "the worker node did not join"
            time.sleep(0.2)
        yield Cluster(root, f"{HEAD_IP}:{port}")
    finally:
        ray.shutdown()
        for proc in reversed(nodes):
            stop_node(proc)
        shutil.rmtree(root, ignore_errors=True)


# ---- one training run: shards on both nodes, two Ray Train workers ----

@dataclass
class Run:
    shards_before: list      # optserve.ray.ShardInfo, once the shards serve
    shards_after: list       # ... and once training ended
    params: list             # each rank's final parameters
    rollbacks: list          # each rank's (step, rolled back to)
    logs: list               # each shard's log
    seconds: float


def version_of(address: str, job: str) -> int:
    """The job's version on the shard at `address`; -1 while it has no such job."""
    with grpc.insecure_channel(address) as channel:
        try:
            stream = pb_grpc.OptimizerStub(channel).PullParameters(
                pb.PullParametersRequest(job=job), timeout=5)
            return next(iter(stream)).header.version
        except grpc.RpcError:
            return -1


def run_job(cluster: Cluster, job: str, kill: bool = False) -> Run:
    """Trains STEPS steps under a TorchTrainer; with `kill`, SIGKILLs shard 0's process once
    the job has passed version KILL_AT."""
    import optserve.ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    start = time.monotonic()
    out = cluster.root / job
    out.mkdir()
    group = optserve.ray.start_shards(
        job, 2, checkpoint_root=cluster.root / "checkpoints", checkpoint_every=EVERY,
        shard_args=("--device", DEVICE, "--grace", "2", "--barrier-timeout", "60"))
    try:
        before = group.info()
        assert [info.address for info in before] == group.addresses
        trainer = TorchTrainer(
            train_loop, train_loop_config=dict(job=job, out=str(out),
                                               delay=0.1 if kill else 0.0),
            scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
            run_config=RunConfig(name=job, storage_path=str(cluster.root / "train"),
                                 failure_config=FailureConfig(max_failures=0)))
        errors = []
        fit = threading.Thread(target=lambda: _catch(errors, trainer.fit), daemon=True)
        fit.start()
        if kill:
            target = before[0]
            while version_of(target.address, job) < KILL_AT:
                assert fit.is_alive() and time.monotonic() - start < TIME_LIMIT, \
                    "the workers never got to the kill"
                time.sleep(0.01)
            os.kill(target.pid, signal.SIGKILL)
        fit.join(max(0.0, TIME_LIMIT - (time.monotonic() - start)))
        assert not fit.is_alive(), f"training did not end within {TIME_LIMIT:.0f} s"
        assert not errors, f"training failed: {errors[0]!r}"
        after = group.info()
    finally:
        group.stop()
    logs = [(optserve.ray.shard_directory(cluster.root / "checkpoints", job, i) / "shard.log")
            .read_text() for i in range(2)]
    results = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    return Run(before, after, [r["params"] for r in results], [r["rollbacks"] for r in results],
               logs, time.monotonic() - start)


def _catch(errors: list, fn) -> None:
    try:
        fn()
    except BaseException as e:   # reported by the test's thread
        errors.append(e)


@pytest.fixture(scope="module")
def clean_run(cluster) -> Run:
    return run_job(cluster, "clean")


def test_a_sync_job_on_two_nodes_matches_torch_adamw_on_the_mean(clean_run):
    """Two shards on different nodes, two TorchTrainer workers in sync mode: each worker
    ends with torch's AdamW fed the averaged gradient."""
    nodes = [info.node_id for info in clean_run.shards_before]
    assert nodes[0] != nodes[1], "both shards run on one node"
    assert {info.address.rpartition(":")[0] for info in clean_run.shards_before} == \
        {HEAD_IP, WORKER_IP}
    expected = adamw_on_the_mean(world_size=2)
    for params in clean_run.params:
        for p, q in zip(params, expected):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert clean_run.rollbacks == [[], []]
    print(f"clean run: {clean_run.seconds:.1f} s")


def test_a_sigkilled_shard_is_restarted_by_ray_and_the_run_ends_bit_identical(cluster,
                                                                               clean_run):
    """Shard 0's process is SIGKILLed after version KILL_AT (checkpoints every EVERY): its
    actor exits, Ray restarts it on the same node and port, the shard restores its newest
    checkpoint, the workers roll back to it and replay, and every parameter ends exactly
    as in the run without the kill."""
    run = run_job(cluster, "killed", kill=True)
    before, after = run.shards_before[0], run.shards_after[0]
    assert not before.restarted and after.restarted, "Ray did not restart the actor"
    assert after.pid != before.pid and after.actor_pid != before.actor_pid
    assert (after.address, after.node_id) == (before.address, before.node_id)
    assert not run.shards_after[1].restarted
    restored = [int(v) for v in re.findall(r"restored job 'killed' at version (\d+)",
                                           run.logs[0])]
    assert restored and restored[0] % EVERY == 0 and restored[0] < KILL_AT + EVERY, run.logs[0]
    assert "exited with status -9; the actor exits for Ray to restart it" in run.logs[0]
    assert any(to == restored[0] for rollbacks in run.rollbacks for _, to in rollbacks), \
        run.rollbacks
    for ours, theirs in zip(run.params, clean_run.params):
        for p, q in zip(ours, theirs):
            assert torch.equal(p, q)
    print(f"killed run: {run.seconds:.1f} s; restored at version {restored[0]}; "
          f"roll-backs {run.rollbacks}")



def test_a_killed_actor_takes_its_shard_along_and_comes_back_from_its_checkpoint(cluster):
    """The actor itself is killed (ray.kill, as when its worker process dies): its shard
    process dies with it, Ray restarts the actor on the same node, the shard comes back on
    the same port from its newest checkpoint, and a worker in the driver that follows the
    README's recipe rolls back to it and ends as torch's AdamW does."""
    import ray
    import optserve.ray
    from optserve.client import RemoteOptimizer, RolledBack

    job, steps = "actor-killed", 12
    group = optserve.ray.start_shards(job, 2, checkpoint_root=cluster.root / "checkpoints",
                                      checkpoint_every=EVERY,
                                      shard_args=("--device", DEVICE, "--grace", "2"))
    try:
        model = make_model()
        opt = RemoteOptimizer(model.parameters(), "adamw", servers=group.addresses, job=job,
                              lr=LR, weight_decay=WEIGHT_DECAY)
        step, rollbacks, before = 0, [], None
        while step < steps:
            if step == 7 and before is None:
                before = group.info()[0]
                ray.kill(group.actors[0], no_restart=False)
            x, y = batch(step, 0)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            try:
                opt.step()
                step += 1
            except RolledBack as e:
                rollbacks.append(e.step)
                step = e.step
        after = group.info()[0]
        opt.close()
    finally:
        group.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(before.pid, 0)   # the shard died with its actor
    assert after.restarted and after.actor_pid != before.actor_pid
    assert (after.address, after.node_id) == (before.address, before.node_id)
    assert rollbacks == [EVERY]
    log = (pathlib.Path(before.directory) / "shard.log").read_text()
    assert f"restored job '{job}' at version {EVERY}" in log, log
    for p, q in zip(model.parameters(), adamw_on_the_mean(world_size=1, steps=steps)):
        torch.testing.assert_close(p.detach(), q, rtol=1e-6, atol=1e-7)
