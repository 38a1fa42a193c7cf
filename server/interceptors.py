"""gRPC server interceptors (grpc.aio): cross-cutting concerns kept out of the servicer.

- `RpcCounter` counts every RPC by method and final status code.
- `TokenAuth` checks per-job bearer tokens before any servicer code runs.
"""
from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import pathlib

import grpc

from optserve.proto.errors import (DeadlineExceeded, OptserveError, PermissionDenied,
                                   Unauthenticated, status_of)
from optserve.proto.wire import RawChunk, Undecodable

_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _behavior(handler):
    return handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream


def _with_behavior(handler, behavior):
    """A handler of the same kind and serializers as `handler`, running `behavior`."""
    factory = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return factory(behavior, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


def _around(inner, before, after):
    """`inner` (a coroutine function, or an async generator function: a streaming answer
    may be either) with `await before(request, context)` ahead of it and
    `after(context, error)` once it has ended."""
    if inspect.isasyncgenfunction(inner):
        async def behavior(request, context):
            try:
                request = await before(request, context)
                async for response in inner(request, context):
                    yield response
            except BaseException as exc:
                after(context, exc)
                raise
            after(context, None)
    else:
        async def behavior(request, context):
            try:
                request = await before(request, context)
                response = await inner(request, context)
            except BaseException as exc:
                after(context, exc)
                raise
            after(context, None)
            return response
    return behavior


async def _unchanged(request, context):
    return request


class RpcCounter(grpc.aio.ServerInterceptor):
    """Counts every RPC into `counter`, a prometheus Counter labelled (method, code)."""

    def __init__(self, counter):
        self.counter = counter

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]

        def count(context, error: BaseException | None) -> None:
            code = context.code()
            if not isinstance(code, grpc.StatusCode):
                code = (grpc.StatusCode.OK if error is None else grpc.StatusCode.CANCELLED
                        if isinstance(error, asyncio.CancelledError) else grpc.StatusCode.UNKNOWN)
            self.counter.labels(method, code.name).inc()

        return _with_behavior(handler, _around(_behavior(handler), _unchanged, count))


# Services anyone may call: health checks and reflection name no job.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")


def load_tokens(path: str | pathlib.Path) -> dict[str, str]:
    """The tokens file: JSON, {"job name": "token", ...}."""
    try:
        tokens = json.loads(pathlib.Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(tokens, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                               for k, v in tokens.items()):
        raise ValueError(f"{path}: expected a JSON object of job name -> non-empty token")
    return tokens


def job_of(message) -> str:
    """The job a request names: `job`, or its stream header's `job` or `spec.job`."""
    if isinstance(message, (RawChunk, Undecodable)):  # no header, or not parseable
        return ""
    if "job" in message.DESCRIPTOR.fields_by_name:
        return message.job
    if message.WhichOneof("kind") != "header":
        return ""
    header = message.header
    return header.spec.job if "spec" in header.DESCRIPTOR.fields_by_name else header.job


class TokenAuth(grpc.aio.ServerInterceptor):
    """Per-job bearer tokens (`authorization: Bearer <token>`):
    - no token, a malformed header, or a token of no job: UNAUTHENTICATED;
    - the token of another job, or a job without a token: PERMISSION_DENIED.
    The given token is compared in constant time with every configured one, so the time a
    check takes says nothing about which tokens exist."""

    def __init__(self, tokens: dict[str, str], idle_timeout: float = 60.0):
        self.tokens = {job: token.encode() for job, token in tokens.items()}
        self.idle_timeout = idle_timeout   # how long a stream may take to send its first message

    def check(self, metadata, job: str | None) -> OptserveError | None:
        """None when the call may go on, else the error to answer with; with `job` None,
        whether the token is one of any job."""
        scheme, _, token = dict(metadata or ()).get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return Unauthenticated("missing bearer token")
        given = token.encode()
        granted = [j for j, t in self.tokens.items() if hmac.compare_digest(given, t)]
        if not granted:
            return Unauthenticated("invalid token")
        if job is not None and job not in granted:
            return PermissionDenied(f"this token does not grant job {job!r}")
        return None

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_SERVICES):
            return handler
        metadata = handler_call_details.invocation_metadata
        denied = self.check(metadata, None)   # no token, or one of no job: before any message

        async def guard(request, context):
            """The request, once its job is one the token grants; the stream's first
            message is read here (the servicer gets it back in front of the rest)."""
            if denied:
                await context.abort(*status_of(denied))
            first = request
            if handler.request_streaming:
                first = await _first(request, self.idle_timeout)
                if isinstance(first, OptserveError):
                    await context.abort(*status_of(first))
            refused = self.check(metadata, job_of(first))
            if refused:
                await context.abort(*status_of(refused))
            return _chain(first, request) if handler.request_streaming else request

        return _with_behavior(handler, _around(_behavior(handler), guard, lambda *_: None))


async def _first(requests, timeout: float):
    """The stream's first message, or the error to answer when there is none in time."""
    try:
        return await asyncio.wait_for(requests.__aiter__().__anext__(), timeout)
    except StopAsyncIteration:
        return Unauthenticated("empty request stream")
    except asyncio.TimeoutError:
        return DeadlineExceeded(f"no request message within {timeout:g}s")


async def _chain(first, rest):
    yield first
    async for message in rest:
        yield message
