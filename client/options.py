"""What a RemoteOptimizer is asked for: its job options, checked before anything is sent,
and the job spec they make with the optimizer's groups and tensors (what every worker of
the job registers, identically)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Sequence

from optserve.proto.spec import DTYPE_NAMES, numel, place
from optserve.proto.v1 import optserve_pb2 as pb

log = logging.getLogger("optserve.client")

MODES = {"sync": pb.SYNC, "async": pb.ASYNC}
NONFINITE = {"refuse": pb.NONFINITE_REFUSE, "skip": pb.NONFINITE_SKIP}

# Below this many parameters on the busiest shard, an uneven placement costs nothing worth
# a warning: a step that small is dominated by fixed per-call costs.
_UNBALANCED_MIN_PARAMS = 1 << 20


@dataclass(frozen=True)
class JobOptions:
    """The job-level arguments of RemoteOptimizer (its docstring says what each means)."""
    servers: Sequence[str]
    job: str
    rank: int = 0
    world_size: int = 1
    mode: str = "sync"
    backup_workers: int = 0
    max_staleness: int | None = None
    staleness_lr: bool = False
    timeout: float | None = None
    on_timeout: str = "fail"
    grad_dtype: str = "float32"
    param_dtype: str = "float32"
    nonfinite: str = "refuse"

    def check(self) -> None:
        """Refuses (ValueError, TypeError) what no shard would take, or what contradicts itself."""
        if self.mode not in MODES:
            raise ValueError(f"mode must be 'sync' or 'async', got {self.mode!r}")
        for name, dtype in (("grad_dtype", self.grad_dtype), ("param_dtype", self.param_dtype)):
            if dtype not in DTYPE_NAMES:
                raise ValueError(f"{name} must be one of {sorted(DTYPE_NAMES)}, got {dtype!r}")
        if self.nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be 'refuse' or 'skip', got {self.nonfinite!r}")
        if self.on_timeout not in ("fail", "proceed"):
            raise ValueError(f"on_timeout must be 'fail' or 'proceed', got {self.on_timeout!r}")
        if not 0 <= self.backup_workers < self.world_size:
            raise ValueError(f"backup_workers must be in [0, world_size), got {self.backup_workers}")
        check_servers(self.servers)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} out of range for world_size {self.world_size}")
        if self.mode == "sync" and (self.max_staleness is not None or self.staleness_lr):
            raise ValueError("max_staleness and staleness_lr are for mode='async'")
        if self.mode == "async" and (self.backup_workers or self.timeout is not None
                                     or self.on_timeout != "fail"):
            raise ValueError("backup_workers, timeout and on_timeout are for mode='sync'")

    def spec(self, optimizer: str, groups: list[pb.Hyperparameters],
             tensors: list[tuple[str, tuple[int, ...], int]]) -> pb.JobSpec:
        """The job spec: these options, the groups' hyperparameters, and the tensors as
        (name, shape, group)."""
        spec = pb.JobSpec(job=self.job, optimizer=optimizer, num_workers=self.world_size,
                          mode=MODES[self.mode], grad_dtype=DTYPE_NAMES[self.grad_dtype],
                          num_shards=len(self.servers), groups=groups,
                          backup_workers=self.backup_workers, staleness_lr=self.staleness_lr,
                          barrier_timeout_s=self.timeout or 0.0,
                          proceed_on_timeout=self.on_timeout == "proceed",
                          param_dtype=DTYPE_NAMES[self.param_dtype],
                          nonfinite=NONFINITE[self.nonfinite])
        if self.max_staleness is not None:
            spec.max_staleness = self.max_staleness
        for name, shape, group in tensors:
            spec.tensors.add(name=name, shape=list(shape) or [1], group=group)
        return spec


def servers_from_env() -> list[str]:
    """$OPTSERVE_SERVERS: shard addresses, comma-separated."""
    text = os.environ.get("OPTSERVE_SERVERS", "")
    servers = [a.strip() for a in text.split(",") if a.strip()]
    if not servers:
        raise ValueError("no servers: pass servers=[...] or set OPTSERVE_SERVERS "
                         "(host:port, comma-separated)")
    return servers


def ranks(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size): those given, else the initialised torch.distributed process
    group's, else $RANK and $WORLD_SIZE (torchrun, SLURM launchers), else 0 and 1."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        found = dist.get_rank(), dist.get_world_size()
    else:
        found = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return (found[0] if rank is None else rank), (found[1] if world_size is None else world_size)


def check_servers(servers) -> None:
    if isinstance(servers, str):
        raise TypeError(f"servers must be a list of addresses, e.g. [{servers!r}]")
    if not servers:
        raise ValueError("servers must name at least one shard")
    for address in servers:
        scheme, sep, _ = address.partition("://")
        if sep and scheme != "unix":   # gRPC's unix:///path is an address; http:// is not
            raise ValueError(f"server {address!r}: a shard's address is host:port, with no "
                             "scheme (e.g. '127.0.0.1:50051')")
    repeated = sorted({a for a in servers if list(servers).count(a) > 1})
    if repeated:
        raise ValueError(f"servers lists {repeated} more than once; each shard once")


def placement(spec: pb.JobSpec) -> list[list[int]]:
    """The spec indices of the tensors each shard holds (the shards compute the same).
    Placement is by whole tensors, so one huge tensor can leave the shards uneven: that is
    logged as a warning."""
    sizes = [numel(t.shape) for t in spec.tensors]
    home = place(sizes, spec.num_shards)
    per_shard = [[i for i, s in enumerate(home) if s == k] for k in range(spec.num_shards)]
    loads = [sum(sizes[i] for i in tensors) for tensors in per_shard]
    mean = sum(loads) / len(loads)
    if len(loads) > 1 and max(loads) > 1.25 * mean and max(loads) >= _UNBALANCED_MIN_PARAMS:
        log.warning("job %r: placement is unbalanced (shard loads %s params, the largest tensor "
                    "has %d); tensors are never split across shards", spec.job, loads, max(sizes))
    return per_shard
