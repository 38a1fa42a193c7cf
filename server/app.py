"""The shard process: a gRPC server with the Optimizer service, health and reflection."""
from __future__ import annotations

import logging
import pathlib
import signal
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from optserve.kernels import get_backend
from optserve.proto.spec import tune_malloc
from optserve.proto.wire import GRPC_OPTIONS, SERVICE, add_servicer
from optserve.server.checkpoint import Checkpointer
from optserve.server.interceptors import RpcCounter, TokenAuth, load_tokens
from optserve.server.metrics import MetricsRecorder, ShardMetrics
from optserve.server.servicer import OptimizerServicer
from optserve.server.store import Limits, ShardStore

log = logging.getLogger("optserve.server")

SERVICE_NAME = SERVICE.full_name


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of the shard's TLS identity; with `client_ca`, clients must present a
    certificate signed by it (mutual TLS)."""
    cert: str
    key: str
    client_ca: str | None = None

    def credentials(self) -> grpc.ServerCredentials:
        read = lambda path: pathlib.Path(path).read_bytes()
        return grpc.ssl_server_credentials(
            [(read(self.key), read(self.cert))],
            root_certificates=read(self.client_ca) if self.client_ca else None,
            require_client_auth=self.client_ca is not None)


class ShardServer:
    """One shard. `start()` binds and serves; `stop(grace)` reports NOT_SERVING, lets
    in-flight calls finish for up to `grace` seconds, then closes."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, device: str = "auto",
                 max_threads: int = 64, barrier_timeout: float = 300.0,
                 metrics_every: int = 1, max_tensor_series: int = 256,
                 checkpoint_dir: str | None = None, checkpoint_every: int = 0,
                 keep_checkpoints: int = 3, tls: TLSFiles | None = None,
                 tokens: dict[str, str] | None = None, limits: Limits | None = None):
        self.backend = get_backend(device)
        self.metrics = ShardMetrics()
        recorder = MetricsRecorder(self.metrics, metrics_every, max_tensor_series)
        checkpointer = Checkpointer(checkpoint_dir, keep_checkpoints) if checkpoint_dir else None
        self.store = ShardStore(self.backend, barrier_timeout=barrier_timeout, observer=recorder,
                                checkpointer=checkpointer, checkpoint_every=checkpoint_every,
                                limits=limits or Limits())
        self.store.restore_all()
        self.health = health.HealthServicer()
        interceptors = [RpcCounter(self.metrics.rpcs)]
        if tokens is not None:
            interceptors.append(TokenAuth(tokens))
        options = [*GRPC_OPTIONS, ("grpc.so_reuseport", 0)]
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_threads,
                                                             thread_name_prefix="optserve"),
                                  options=options, interceptors=interceptors)
        add_servicer(OptimizerServicer(self.store), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        try:
            if tls is None:
                self.port = self.server.add_insecure_port(f"{host}:{port}")
            else:
                self.port = self.server.add_secure_port(f"{host}:{port}", tls.credentials())
        except RuntimeError:   # grpcio's "Failed to bind"
            self.port = 0
        if self.port == 0:
            raise OSError(f"could not bind {host}:{port}: the port is taken, or the host is not "
                          "an address of this machine" + ("; or gRPC could not load the TLS "
                                                          "certificate and key" if tls else ""))
        self.host = host
        self.address = f"{host}:{self.port}"
        self._stopped = threading.Event()
        self._finished = threading.Event()
        self._metrics_http = None

    def start(self) -> "ShardServer":
        self.server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.metrics.up.set(1)
        log.info("shard serving on %s (backend %s)", self.address, self.backend.name)
        return self

    def serve_metrics(self, port: int, host: str | None = None) -> int:
        """Serves the metrics over HTTP at http://host:port/metrics; returns the port."""
        httpd, _thread = start_http_server(port, addr=host or self.host,
                                           registry=self.metrics.registry)
        self._metrics_http = httpd
        port = httpd.server_address[1]
        log.info("metrics on http://%s:%d/metrics", host or self.host, port)
        return port

    def stop(self, grace: float = 5.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.metrics.up.set(0)
        self.server.stop(grace).wait()
        try:
            self.store.checkpoint_all()
        finally:
            if self._metrics_http is not None:
                self._metrics_http.shutdown()
            log.info("shard on %s stopped", self.address)
            self._finished.set()

    def wait(self) -> None:
        """Blocks until the server has terminated and, if stopping, finished its shutdown."""
        self.server.wait_for_termination()
        if self._stopped.is_set():
            self._finished.wait()

    def __enter__(self) -> "ShardServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(grace=0)


def serve(host: str, port: int, device: str, barrier_timeout: float, grace: float,
          metrics_port: int | None = None, metrics_host: str | None = None,
          metrics_every: int = 1, max_tensor_series: int = 256, checkpoint_dir: str | None = None,
          checkpoint_every: int = 0, keep_checkpoints: int = 3, tls: TLSFiles | None = None,
          tokens_file: str | None = None, limits: Limits | None = None) -> None:
    """Runs a shard until SIGTERM or SIGINT, then shuts down gracefully."""
    tune_malloc()
    shard = ShardServer(host, port, device=device, barrier_timeout=barrier_timeout,
                        metrics_every=metrics_every, max_tensor_series=max_tensor_series,
                        checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                        keep_checkpoints=keep_checkpoints, tls=tls,
                        tokens=load_tokens(tokens_file) if tokens_file else None,
                        limits=limits).start()
    if metrics_port is not None:
        try:
            metrics_port = shard.serve_metrics(metrics_port, metrics_host)
        except OSError as e:
            shard.stop(grace=0)
            raise OSError(f"metrics port {metrics_port}: {e.strerror or e}") from None

    def on_signal(signum, _frame):
        log.info("received %s, shutting down (grace %.0fs)", signal.Signals(signum).name, grace)
        threading.Thread(target=shard.stop, args=(grace,), daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    metrics = f" (metrics on port {metrics_port})" if metrics_port is not None else ""
    print(f"optserve shard listening on {shard.address}{metrics}", flush=True)
    shard.wait()
