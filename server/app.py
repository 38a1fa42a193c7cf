"""The shard process: a gRPC server with the Optimizer service, health and reflection.

The server is grpc.aio's, on an event loop of its own thread: a call that waits on its
client, or for the rest of a sync round, holds no thread, so no number of idle or hung
calls can starve the others; the work runs on a bounded pool of `max_threads`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from optserve.kernels import get_backend
from optserve.logs import json_line
from optserve.proto.spec import tune_malloc
from optserve.proto.wire import GRPC_OPTIONS, SERVICE, add_servicer
from optserve.server.budget import Budget
from optserve.server.checkpoint import Checkpointer
from optserve.server.config import WILDCARD_HOSTS, ShardConfig, host_port
from optserve.server.interceptors import RpcCounter, TokenAuth
from optserve.server.metrics import MetricsRecorder, ShardMetrics
from optserve.server.servicer import OptimizerServicer, Streams
from optserve.server.store import ShardStore

log = logging.getLogger("optserve.server")

SERVICE_NAME = SERVICE.full_name


class ShardServer:
    """One shard. `start()` binds and serves; `stop(grace)` reports NOT_SERVING, lets
    in-flight calls finish for up to `grace` seconds, then closes."""

    def __init__(self, config: ShardConfig | None = None):
        config = config or ShardConfig(port=0)   # embedded: any free port
        self.backend = get_backend(config.device)
        capacity = self.backend.device_capacity()   # a GPU's kernels compile here, before the port opens
        if capacity is not None:
            limit = config.limits.max_device_bytes or int(0.9 * capacity)
            self.backend.set_device_limit(limit)
            config = dataclasses.replace(config, limits=dataclasses.replace(
                config.limits, max_device_bytes=limit))
            log.info("device memory: %.1f GB of %.1f GB for jobs", limit / 1e9, capacity / 1e9)
        self.config = config
        self.fault: BaseException | None = None
        self.unsaved: list[str] = []   # the jobs whose checkpoint on stopping failed
        self.metrics = ShardMetrics()
        if capacity is not None:
            self.metrics.watch_device(self.backend.device_report)
        recorder = MetricsRecorder(self.metrics, config.metrics_every, config.max_tensor_series)
        checkpointer = (Checkpointer(config.checkpoint_dir, config.keep_checkpoints, lock=True)
                        if config.checkpoint_dir else None)
        self.store = ShardStore(self.backend, barrier_timeout=config.barrier_timeout,
                                observer=recorder, checkpointer=checkpointer,
                                checkpoint_every=config.checkpoint_every, limits=config.limits)
        self.store.on_fault = self._on_fault
        self.store.segments.report = self.metrics.shared_memory.set
        try:
            self.store.restore_all()
            self.port = self._serve_loop()
        except BaseException:
            if checkpointer is not None:   # another shard may take the directory at once
                checkpointer.unlock()
            raise
        self.host = config.host
        self.address = host_port(config.advertised_host(), self.port)   # what workers dial
        self._stopped = threading.Event()
        self._finished = threading.Event()
        self._metrics_http = None

    def _serve_loop(self) -> int:
        """Starts the event loop's thread and builds the server on it; returns its port."""
        self.loop = asyncio.new_event_loop()
        self.loop.set_default_executor(futures.ThreadPoolExecutor(
            max_workers=self.config.max_threads, thread_name_prefix="optserve"))
        self._loop_thread = threading.Thread(target=self.loop.run_forever,
                                             name="optserve-loop", daemon=True)
        self._loop_thread.start()
        try:
            port = self._call(self._build())
            if port == 0:
                config = self.config
                raise OSError(f"could not bind {host_port(config.host, config.port)}: the port "
                              "is taken, or the host is not an address of this machine" + (
                                  "; or gRPC could not load the TLS certificate and key"
                                  if config.tls else ""))
        except BaseException:
            self._close_loop()
            raise
        return port

    async def _build(self) -> int:
        """The aio server, made in the loop it serves on; returns its port (0: not bound)."""
        config = self.config
        self.health = HealthServicer()
        interceptors = [RpcCounter(self.metrics.rpcs)]
        if config.tokens is not None:
            interceptors.append(TokenAuth(config.tokens, config.idle_timeout))
        self.server = grpc.aio.server(options=[*GRPC_OPTIONS, *config.channel_options()],
                                      interceptors=interceptors,
                                      maximum_concurrent_rpcs=config.max_rpcs)
        budget = Budget(config.limits.max_inflight_bytes, self.metrics.inflight.set,
                        config.limits.inflight_wait)
        add_servicer(OptimizerServicer(self.store, Streams(config.idle_timeout), budget),
                     self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.health_server, self.health_port = None, None
        if config.health_port is not None:
            # Kubernetes' gRPC probes speak no TLS: a plaintext port with Health alone, from the
            # same servicer, so that NOT_SERVING on shutdown shows on both ports.
            self.health_server = grpc.aio.server(
                options=[*GRPC_OPTIONS, *config.channel_options()],
                interceptors=[RpcCounter(self.metrics.rpcs)],
                maximum_concurrent_rpcs=config.max_rpcs)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            address = host_port(config.host, config.health_port)
            try:
                self.health_port = self.health_server.add_insecure_port(address)
            except RuntimeError:   # grpcio's "Failed to bind"
                self.health_port = 0
            if self.health_port == 0:
                raise OSError(f"could not bind the health port {address}: the port is taken, "
                              "or the host is not an address of this machine")
        if config.unix_socket:
            if self._add_port(f"unix:{config.unix_socket}") == 0:
                raise OSError(f"could not bind the Unix socket {config.unix_socket}")
        return self._add_port(host_port(config.host, config.port))

    def _add_port(self, address: str) -> int:
        try:
            if self.config.tls is None:
                return self.server.add_insecure_port(address)
            return self.server.add_secure_port(address, self.config.tls.credentials())
        except RuntimeError:   # grpcio's "Failed to bind"
            return 0

    def _call(self, coro):
        """Runs `coro` on the server's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def _close_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._loop_thread.join()
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()

    def start(self) -> "ShardServer":
        async def start():
            await self.server.start()
            if self.health_server is not None:
                await self.health_server.start()
            for name in ("", SERVICE_NAME):
                await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._call(start())
        if self.config.unix_socket:   # only this user's processes may connect
            os.chmod(self.config.unix_socket, 0o600)
            log.info("also serving on unix:%s", self.config.unix_socket)
        self.metrics.up.set(1)
        log.info("shard serving on %s (bound to %s, backend %s)", self.address,
                 host_port(self.host, self.port), self.backend.name)
        if self.health_server is not None:
            log.info("health checks (grpc.health.v1, plaintext) on port %d", self.health_port)
        return self

    def serve_metrics(self, port: int, host: str | None = None) -> int:
        """Serves the metrics over HTTP at http://host:port/metrics; returns the port."""
        httpd, _thread = start_http_server(port, addr=host or self.host,
                                           registry=self.metrics.registry)
        self._metrics_http = httpd
        port = httpd.server_address[1]
        host = host or self.host
        shown = self.config.advertised_host() if host in WILDCARD_HOSTS else host
        log.info("metrics on http://%s/metrics", host_port(shown, port))
        return port

    def _on_fault(self, exc: BaseException) -> None:
        """A device fault: no job's state on the device can be trusted any more. The shard
        reports NOT_SERVING and stops without checkpointing what it holds; restarted, it
        restores every job from its last checkpoint (serve() exits with EXIT_FAULT)."""
        log.critical("device fault (%s: %s): the shard stops; restart it to restore its jobs "
                     "from their checkpoints", type(exc).__name__, exc)
        self.fault = exc
        threading.Thread(target=self.stop, args=(0.0,), daemon=True).start()

    def stop(self, grace: float = 5.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.metrics.up.set(0)

        async def stop():
            await self.health.enter_graceful_shutdown()
            await self.server.stop(grace)
            if self.health_server is not None:   # NOT_SERVING there until the grace is over
                await self.health_server.stop(0)
        try:
            self._call(stop())
            self._close_loop()
            if self.fault is None:
                self.unsaved = self.store.checkpoint_all()
        finally:
            self.store.release_segments()
            if self.store.checkpointer is not None:
                self.store.checkpointer.unlock()
            if self._metrics_http is not None:
                self._metrics_http.shutdown()
            log.info("shard on %s stopped", self.address)
            self._finished.set()

    def wait(self) -> None:
        """Blocks until the shard has stopped and finished its shutdown."""
        self._finished.wait()

    def __enter__(self) -> "ShardServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(grace=0)


# `optserve server`'s exit status after a device fault (EX_SOFTWARE): its supervisor restarts it.
EXIT_FAULT = 70
# ... after a shutdown that could not checkpoint every job (EX_TEMPFAIL): a restart restores
# those jobs from their last checkpoint that was written, older than the shard's state.
EXIT_UNSAVED = 75


def serve(config: ShardConfig, log_format: str = "text") -> int:
    """Runs a shard until SIGTERM or SIGINT, then shuts down gracefully; returns the exit
    status (0, EXIT_FAULT after a device fault, EXIT_UNSAVED when a checkpoint failed).
    It announces its address on stdout, a JSON object when `log_format` is "json"."""
    tune_malloc()
    shard = ShardServer(config).start()
    metrics_port = config.metrics_port
    if metrics_port is not None:
        try:
            metrics_port = shard.serve_metrics(metrics_port, config.metrics_host)
        except OSError as e:
            shard.stop(grace=0)
            raise OSError(f"metrics port {metrics_port}: {e.strerror or e}") from None

    def on_signal(signum, _frame):
        log.info("received %s, shutting down (grace %.0fs)", signal.Signals(signum).name,
                 config.grace)
        threading.Thread(target=shard.stop, args=(config.grace,), daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    metrics = f" (metrics on port {metrics_port})" if metrics_port is not None else ""
    line = f"optserve shard listening on {shard.address}{metrics}"
    if log_format == "json":   # every line of a container's log is then JSON
        line = json_line(log.name, line, address=shard.address, metrics_port=metrics_port)
    print(line, flush=True)
    shard.wait()
    if shard.fault is not None:
        return EXIT_FAULT
    return EXIT_UNSAVED if shard.unsaved else 0
