"""A worker's connections to a job's shards: one channel and stub per shard (TLS and the
bearer token where asked), calls to every shard at once, and retries.

The client retries UNAVAILABLE and DEADLINE_EXCEEDED with exponential backoff: the shard
answers a repeated (job, worker, step) from the result it already computed, so a retry is
never applied twice.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

import grpc

from optserve.client.options import check_servers
from optserve.proto.errors import Unavailable, from_rpc_error
from optserve.proto.v1 import optserve_pb2 as pb
from optserve.proto.wire import GRPC_OPTIONS, OptimizerStub

log = logging.getLogger("optserve.client")
T = TypeVar("T")

_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# Backoff between attempts, doubling up to the cap: long enough in total (~25 s with the
# default 12 retries) to ride out a shard restart.
_BACKOFF_FIRST, _BACKOFF_CAP = 0.05, 4.0


class Shards:
    """The stubs of one job's shards, in shard order."""

    def __init__(self, servers: Sequence[str], job: str, *, rpc_timeout: float | None,
                 retries: int, token: str | None = None, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None):
        self.job = job
        self.addresses = list(servers)
        self.credentials = dict(token=token, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
        self.rpc_timeout = rpc_timeout
        self.retries = retries
        self._channels = [channel(a, tls_ca, tls_cert, tls_key) for a in servers]
        calls = [grpc.intercept_channel(c, BearerToken(token)) if token else c
                 for c in self._channels]
        self.stubs = [OptimizerStub(c) for c in calls]
        self._pool = ThreadPoolExecutor(max_workers=len(servers), thread_name_prefix="optserve-client")
        self.closed = False

    def __len__(self) -> int:
        return len(self.stubs)

    def wait_ready(self, timeout: float) -> None:
        """Waits until every shard's connection is up; a shard that does not answer within
        `timeout` seconds is named (instead of a client retrying it for half a minute)."""
        pending = {address: grpc.channel_ready_future(c)
                   for address, c in zip(self.addresses, self._channels)}
        deadline = time.monotonic() + timeout
        missing = []
        for address, ready in pending.items():
            try:
                ready.result(timeout=max(0.0, deadline - time.monotonic()))
            except grpc.FutureTimeoutError:
                missing.append(address)
                ready.cancel()
        if missing:
            self.close()
            raise Unavailable(f"no optserve shard answers at {', '.join(missing)} within "
                              f"{timeout:g}s: is `optserve server` running there, on that port?")

    def call_all(self, fn: Callable[[int], T]) -> list[T]:
        """Runs fn(shard) on every shard at once; raises the first failure as an
        OptserveError, once every call has ended (none is left running behind the caller's
        back). The last shard's call runs on this thread: a hand-off to the pool and back
        costs a few hundred microseconds on a busy machine, which a one-shard job need not pay."""
        if self.closed:
            raise ValueError(f"the RemoteOptimizer of job {self.job!r} is closed")
        last = len(self.stubs) - 1
        futures = [self._pool.submit(fn, k) for k in range(last)]
        try:
            try:
                mine = fn(last)
            finally:
                concurrent.futures.wait(futures)
            return [f.result() for f in futures] + [mine]
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def retrying(self, call: Callable[[], T]) -> T:
        """call() until it succeeds, retrying UNAVAILABLE and DEADLINE_EXCEEDED with backoff."""
        delay = _BACKOFF_FIRST
        for attempt in range(self.retries + 1):
            try:
                return call()
            except grpc.RpcError as e:
                if e.code() not in _RETRYABLE or attempt == self.retries:
                    raise
                log.info("job %r: %s (%s); retrying in %.2fs", self.job, e.code().name,
                         e.details(), delay)
                time.sleep(delay)
                delay = min(2 * delay, _BACKOFF_CAP)

    def close(self) -> None:
        self.closed = True
        self._pool.shutdown(wait=False)
        for c in self._channels:
            c.close()


def delete_job(servers: Sequence[str], job: str, *, token: str | None = None,
               tls_ca: str | None = None, tls_cert: str | None = None,
               tls_key: str | None = None, timeout: float = 60.0) -> None:
    """Deletes `job` on every shard in `servers` that holds it: for a job whose workers are
    gone, or one whose registration failed part way."""
    check_servers(servers)
    for address in servers:
        with channel(address, tls_ca, tls_cert, tls_key) as chan:
            calls = grpc.intercept_channel(chan, BearerToken(token)) if token else chan
            try:
                delete_on(OptimizerStub(calls), job, timeout)
            except grpc.RpcError as e:
                raise from_rpc_error(e) from None


def delete_on(stub: OptimizerStub, job: str, timeout: float | None) -> None:
    """DeleteJob on one shard; a shard that does not hold the job is already done."""
    try:
        stub.DeleteJob(pb.DeleteJobRequest(job=job), timeout=timeout)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.NOT_FOUND:
            raise


def channel(address: str, ca: str | None, cert: str | None, key: str | None) -> grpc.Channel:
    if not (ca or cert):
        return grpc.insecure_channel(address, options=GRPC_OPTIONS)
    read = lambda path: open(path, "rb").read() if path else None   # noqa: E731
    credentials = grpc.ssl_channel_credentials(read(ca), read(key), read(cert))
    return grpc.secure_channel(address, credentials, options=GRPC_OPTIONS)


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call."""

    def __init__(self, token: str):
        self.metadata = ("authorization", f"Bearer {token}")

    def _details(self, details):
        return _CallDetails(details.method, details.timeout,
                            list(details.metadata or []) + [self.metadata], details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


class _CallDetails(collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                         "compression")), grpc.ClientCallDetails):
    pass
