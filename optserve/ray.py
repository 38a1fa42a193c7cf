"""A job's shards on a Ray cluster: named actors, each supervising a real shard process.

    import optserve.ray
    group = optserve.ray.start_shards("my-run", 2, checkpoint_root="/var/lib/optserve",
                                      checkpoint_every=50)
    group.addresses    # ["10.0.0.5:40123", "10.0.0.6:38811"]: RemoteOptimizer(servers=...)

Shard i of job J is the actor "optserve-shard-J-i" in the namespace "optserve", placed one per
node (a STRICT_SPREAD placement group) or one per GPU (`per="gpu"`: num_gpus=1 each, several
to a node where it has several GPUs). The actor runs `python -m optserve server` bound to its
node's IP, on a port of its own and with its own checkpoint directory on that node
(`checkpoint_root/J/shard-i`), and supervises it:

- when the shard process dies (SIGKILL, the OOM killer, a device fault), the actor exits, Ray
  restarts it (`max_restarts`), and its constructor starts the shard again on the same
  directory, so it restores from its newest checkpoint that verifies, and on the same port,
  so the workers' addresses still hold. The workers' next step sees the older version and
  raises optserve.client.RolledBack: they replay from its `.step` (the README's recipe);
- when the actor dies (ray.kill, its worker process killed), its shard dies with it (Ray
  kills a dead worker's child processes; the kernel's parent-death signal, SIGKILL, makes
  sure), and the restarted actor starts it again in the same way. (Only `ShardGroup.stop()`
  stops a shard gracefully, with SIGTERM: it checkpoints every job before it exits.)

Should the port be taken by then (after `retry_for` seconds), the restarted shard takes a
free one and its address changes: workers then re-resolve with `shard_addresses()` and
rebuild their RemoteOptimizer with `resume=True` (a Ray Train worker group restarted by its
FailureConfig does so when its loop starts that way). The same holds where a node is lost:
its shard restarts on another node, from its checkpoints only where `checkpoint_root` is a
filesystem both nodes see.

Ray is an extra (`pip install 'optserve[ray]'`); the shard needs the `server` one on every
node that runs a shard, and torch is needed only where workers run.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import threading
import time
import urllib.parse
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

try:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
except ImportError as e:   # the extra is optional; say which one
    raise ImportError("optserve.ray needs Ray: pip install 'optserve[ray]'") from e

from optserve import local

log = logging.getLogger("optserve.ray")

NAMESPACE = "optserve"
# Why a shard may not start at once after a restart: its predecessor, killed with the previous
# actor, still holds the directory's lock or the port until the kernel has reaped it.
_BUSY = ("is in use by another shard", "could not bind")


def shard_name(job: str, index: int) -> str:
    """The Ray actor name of shard `index` of `job`."""
    return f"optserve-shard-{job}-{index}"


def shard_directory(checkpoint_root: str | os.PathLike, job: str, index: int) -> Path:
    """Where shard `index` of `job` keeps its checkpoints, port and log, on its node."""
    return Path(checkpoint_root) / urllib.parse.quote(job, safe="") / f"shard-{index}"


@dataclass(frozen=True)
class ShardInfo:
    """What a shard's actor reports about itself."""
    index: int
    address: str           # host:port, as RemoteOptimizer(servers=...) takes it
    node_id: str           # the Ray node it runs on
    pid: int               # the shard process (not the actor)
    actor_pid: int
    restarted: bool        # whether Ray restarted this actor at least once
    directory: str


class ShardSupervisor:
    """The actor: starts one shard process and exits when it dies, for Ray to restart both.

    The shard process is started by a thread that lives as long as the actor, so that the
    kernel's parent-death signal (set in the child) comes only when the actor itself dies:
    PR_SET_PDEATHSIG fires when the thread that forked the child ends."""

    def __init__(self, index: int, directory: str, shard_args: Sequence[str],
                 retry_for: float = 60.0):
        self.index = index
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.host = ray.util.get_node_ip_address()
        context = ray.get_runtime_context()
        self.node_id = context.get_node_id()
        self.restarted = context.was_current_actor_reconstructed
        self._args = list(shard_args)
        self._retry_for = retry_for
        self._stopping = threading.Event()
        self._shard: local.LocalServer | None = None
        started: Future = Future()
        threading.Thread(target=self._supervise, args=(started,), name="optserve-shard",
                         daemon=True).start()
        self._shard = started.result()

    # ---- the actor's methods ----

    def address(self) -> str:
        return self._shard.address

    def info(self) -> ShardInfo:
        return ShardInfo(self.index, self._shard.address, self.node_id, self._shard.proc.pid,
                         os.getpid(), self.restarted, str(self.directory))

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM to the shard (it checkpoints every job), then SIGKILL after `timeout`
        seconds; returns its exit status. The actor stays up until it is killed."""
        self._stopping.set()
        local.stop(self._shard.proc, timeout)
        return self._shard.proc.returncode

    # ---- the supervising thread ----

    def _supervise(self, started: Future) -> None:
        try:
            shard = self._start()
        except BaseException as e:
            started.set_exception(e)
            return
        started.set_result(shard)
        status = shard.proc.wait()
        if not self._stopping.is_set():
            # Said in the shard's own log too, where the next start's lines follow.
            message = (f"shard process {shard.proc.pid} on {shard.address} exited with status "
                       f"{status}; the actor exits for Ray to restart it")
            with contextlib.suppress(OSError), open(self.directory / "shard.log", "a") as f:
                f.write(f"optserve.ray: {message}\n")
            log.error("shard %d: %s", self.index, message)
            os._exit(1)

    def _start(self) -> local.LocalServer:
        """The shard on the port it had before (recorded in the directory), else a free one.
        While a predecessor still holds the lock or the port, tries again for `retry_for`
        seconds; after that a taken port gives way to a free one."""
        port_file = self.directory / "port"
        port = int(port_file.read_text()) if port_file.exists() else 0
        deadline = time.monotonic() + self._retry_for
        while True:
            shard, error = self._launch(port)
            if shard is not None:
                if shard.address.rpartition(":")[2] != str(port):
                    if port:
                        log.warning("shard %d: port %d stayed taken; now at %s, so workers "
                                    "must re-resolve (optserve.ray.shard_addresses)",
                                    self.index, port, shard.address)
                    port_file.write_text(shard.address.rpartition(":")[2])
                return shard
            busy = any(text in error for text in _BUSY)
            if busy and time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            if busy and port and _BUSY[1] in error:
                port = 0
                continue
            raise RuntimeError(f"shard {self.index} did not start in {self.directory}:\n{error}")

    def _launch(self, port: int) -> tuple[local.LocalServer | None, str]:
        """One try: the shard, or None and what it wrote to its log before it exited."""
        log_path = self.directory / "shard.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        argv = local.shard_command("--host", self.host, "--port", str(port), "--checkpoint-dir",
                                   str(self.directory / "checkpoints"), *self._args)
        with open(log_path, "a") as stderr:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                    preexec_fn=_die_with_parent(), cwd=self.directory)
        try:
            return local.listening(proc), ""
        except RuntimeError as e:
            with open(log_path) as f:
                f.seek(offset)
                return None, f"{e}\n{f.read()[-4000:]}"


def _die_with_parent():
    """A preexec_fn that has the kernel SIGKILL the child when the thread that starts it ends,
    as Ray does to a dead worker's children (SIGTERM would let it write a checkpoint only
    when it won that race). prctl is looked up before the fork: the child only calls it."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGKILL, 0, 0, 0)   # PR_SET_PDEATHSIG
        if os.getppid() != parent:          # the parent died before the call
            os._exit(1)
    return preexec


@dataclass
class ShardGroup:
    """A job's shard actors (index order) and the placement group that holds them."""
    job: str
    actors: list
    placement: object | None
    namespace: str = NAMESPACE

    @property
    def addresses(self) -> list[str]:
        """The shards' addresses, as RemoteOptimizer(servers=...) takes them."""
        return ray.get([a.address.remote() for a in self.actors])

    def info(self) -> list[ShardInfo]:
        return ray.get([a.info.remote() for a in self.actors])

    def stop(self, timeout: float = 60.0) -> None:
        """Stops every shard (SIGTERM: each checkpoints its jobs), then the actors for good,
        then frees the placement group. The checkpoints stay on the nodes."""
        try:
            ray.get([a.stop.remote(timeout) for a in self.actors], timeout=timeout + 30)
        finally:
            for a in self.actors:
                ray.kill(a, no_restart=True)
            if self.placement is not None:
                remove_placement_group(self.placement)


def start_shards(job: str, shards: int, *, checkpoint_root: str | os.PathLike,
                 checkpoint_every: int = 0, per: str = "node", num_cpus: float = 1,
                 max_restarts: int = -1, detached: bool = False, namespace: str = NAMESPACE,
                 shard_args: Sequence[str] = (), ready_timeout: float = 300.0,
                 retry_for: float = 60.0) -> ShardGroup:
    """Starts `shards` shard actors for `job` and returns them once every shard serves.

    Args:
      job: the training job's name (RemoteOptimizer's job=); it names the actors.
      shards: how many.
      checkpoint_root: each shard checkpoints to `checkpoint_root/<job>/shard-<i>` on its node
        (a path every node can write); a restarted shard restores from there.
      checkpoint_every: `--checkpoint-every`: a checkpoint every N versions of the job, the
        furthest a killed shard's workers roll back (0: only on SIGTERM and on request).
      per: "node": one shard per node (STRICT_SPREAD; the cluster needs `shards` nodes with
        `num_cpus` free); "gpu": one per GPU (num_gpus=1 each, `--device cuda`).
      num_cpus: CPUs each shard reserves; its kernels use as many threads.
      max_restarts: how often Ray restarts a shard's actor (-1: always, as a supervisor).
      detached: the actors and placement group outlive this driver (find them again with
        `shard_addresses()`; stop them with `ShardGroup.stop()` or `ray.kill`); by default
        they end with it.
      namespace: the Ray namespace of the actors' names.
      shard_args: further `optserve server` flags (`--tokens-file`, `--metrics-port`, ...).
      ready_timeout: seconds to wait for the placement and for every shard to serve.
      retry_for: seconds a restarted shard waits for its predecessor's lock and port.
    """
    if per not in ("node", "gpu"):
        raise ValueError(f"per={per!r}: choose 'node' or 'gpu'")
    if shards < 1:
        raise ValueError(f"shards={shards}: at least one")
    gpus = 1 if per == "gpu" else 0
    bundle = {"CPU": num_cpus, **({"GPU": 1} if gpus else {})}
    lifetime = "detached" if detached else None
    group = placement_group([bundle] * shards,
                            strategy="STRICT_SPREAD" if per == "node" else "SPREAD",
                            name=f"optserve-{job}", lifetime=lifetime)
    try:
        ray.get(group.ready(), timeout=ready_timeout)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        where = f"{shards} nodes" if per == "node" else f"{shards} GPUs"
        raise TimeoutError(f"no room for {shards} shards of {bundle} on {where} within "
                           f"{ready_timeout:.0f} s") from None
    args = ["--checkpoint-every", str(checkpoint_every),
            "--threads", str(max(1, int(num_cpus))),
            *(["--device", "cuda"] if gpus else []), *shard_args]
    actor, actors = ray.remote(ShardSupervisor), []
    try:
        for i in range(shards):
            actors.append(actor.options(
                name=shard_name(job, i), namespace=namespace, lifetime=lifetime,
                max_restarts=max_restarts, max_task_retries=-1, num_cpus=num_cpus,
                num_gpus=gpus, scheduling_strategy=PlacementGroupSchedulingStrategy(
                    group, placement_group_bundle_index=i)).remote(
                i, str(shard_directory(checkpoint_root, job, i)), args, retry_for))
        ray.get([a.address.remote() for a in actors], timeout=ready_timeout)
    except BaseException:
        for a in actors:
            ray.kill(a, no_restart=True)
        remove_placement_group(group)
        raise
    return ShardGroup(job, actors, group, namespace)


def shard_addresses(job: str, shards: int, namespace: str = NAMESPACE) -> list[str]:
    """The addresses of a running job's shards, looked up by the actors' names: from a
    worker, another driver, or after a shard came back on another port or node."""
    actors = [ray.get_actor(shard_name(job, i), namespace=namespace) for i in range(shards)]
    return ray.get([a.address.remote() for a in actors])
