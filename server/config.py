"""Everything a shard is configured with, in one record: `optserve server`'s flags fill a
`ShardConfig`, and `ShardServer` and `serve` take it."""
from __future__ import annotations

import os
import pathlib
import socket
from dataclasses import dataclass, field

import grpc

from optserve.proto.spec import tensors_that_fit
from optserve.proto.wire import MAX_MESSAGE_BYTES


# Hosts that mean "every interface": a shard bound to one is reached by another name.
WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")


def host_port(host: str, port: int) -> str:
    """HOST:PORT as gRPC and its clients take it, an IPv6 literal in brackets ([::1]:50051)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def half_of_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def quarter_of_memory() -> int:
    return half_of_memory() // 2


def most_tensors() -> int:
    """The default of max_tensors: any job within it has headers (its optimizer state's
    too) that fit in half of a gRPC message, whatever its shapes."""
    return tensors_that_fit(MAX_MESSAGE_BYTES)


@dataclass(frozen=True)
class Limits:
    """What one shard accepts; beyond it registration answers RESOURCE_EXHAUSTED. The
    counts are checked before anything is placed or allocated."""
    max_jobs: int = 64
    max_params_per_job: int = 2_000_000_000
    # over all jobs: parameters, optimizer state, and what a job keeps per worker (gradient
    # buffers, cached replies, bookkeeping); by default half of this machine's memory
    max_state_bytes: int = field(default_factory=half_of_memory)
    # what all jobs hold on the GPU (state, gradient buffers, scratch); None: 90 % of it
    max_device_bytes: int | None = None
    max_workers: int = 4096            # per job
    max_shards: int = 1024             # a job's num_shards
    # per job, and as many parameter groups
    max_tensors: int = field(default_factory=most_tensors)
    # what calls hold in flight outside the state (server/budget.py); one may exceed it alone
    max_inflight_bytes: int = 1 << 30
    inflight_wait: float = 30.0          # seconds a call waits for room under it
    # shared-memory segments for workers on the shard's host (server/segments.py), over all jobs
    shared_memory: bool = True
    max_shared_memory_bytes: int = field(default_factory=quarter_of_memory)


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of the shard's TLS identity; with `client_ca`, clients must present a
    certificate signed by it (mutual TLS)."""
    cert: str
    key: str
    client_ca: str | None = None

    def __post_init__(self) -> None:
        # Without its own certificate a shard cannot serve TLS, and client_ca alone would
        # leave it serving plaintext to anyone.
        if not (self.cert and self.key):
            raise ValueError("TLS needs the shard's certificate and its key (--tls-cert and "
                             "--tls-key); --tls-client-ca only adds client certificates to them")

    def credentials(self) -> grpc.ServerCredentials:
        read = lambda path: pathlib.Path(path).read_bytes()   # noqa: E731
        return grpc.ssl_server_credentials(
            [(read(self.key), read(self.cert))],
            root_certificates=read(self.client_ca) if self.client_ca else None,
            require_client_auth=self.client_ca is not None)


@dataclass(frozen=True)
class ShardConfig:
    """One shard's settings; the defaults are `optserve server`'s."""
    host: str = "127.0.0.1"
    port: int = 50051                    # 0: any free port
    # the host name or address workers reach the shard by, shown in its "listening on" line
    # and logs; None: host, or this machine's host name when host is a wildcard (0.0.0.0)
    advertise_address: str | None = None
    health_port: int | None = None       # plaintext, grpc.health.v1 only (probes of a TLS shard)
    unix_socket: str | None = None       # also serve on this Unix socket (workers dial unix:PATH)
    device: str = "auto"                 # auto, cpu, cuda or reference (kernels.get_backend)
    max_threads: int = 64                # the worker pool that does the calls' work
    max_rpcs: int = 4096                 # calls open at once; beyond it RESOURCE_EXHAUSTED
    idle_timeout: float = 60.0           # seconds a call may wait for its client (servicer.Streams)
    keepalive: float = 30.0              # seconds between pings that find dead connections
    barrier_timeout: float = 300.0       # seconds a sync step waits for the other workers
    grace: float = 10.0                  # seconds in-flight calls get to finish on SIGTERM
    metrics_port: int | None = None      # Prometheus metrics over HTTP on this port
    metrics_host: str | None = None      # default: host
    metrics_every: int = 1               # refresh per-tensor gauges every N steps of a job
    max_tensor_series: int = 256         # per job; beyond it tensors aggregate by name prefix
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0            # versions; 0: only on SIGTERM and on request
    keep_checkpoints: int = 3
    tls: TLSFiles | None = None
    tokens: dict[str, str] | None = None   # job -> bearer token; None: no tokens checked
    limits: Limits = field(default_factory=Limits)

    def advertised_host(self) -> str:
        if self.advertise_address:
            return self.advertise_address
        return socket.gethostname() if self.host in WILDCARD_HOSTS else self.host

    def channel_options(self) -> list[tuple[str, int]]:
        """The server's HTTP/2 settings: a connection whose peer stops answering pings is
        closed (its calls end, and a hung worker's rank is free again); one without calls
        for 10 minutes too. Clients may ping as often as every 10 s."""
        return [("grpc.so_reuseport", 0),
                ("grpc.keepalive_time_ms", int(self.keepalive * 1000)),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
                ("grpc.max_connection_idle_ms", 600_000),
                ("grpc.max_concurrent_streams", 1024)]
