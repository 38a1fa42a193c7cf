"""gRPC server interceptors: cross-cutting concerns kept out of the servicer.

- `RpcCounter` counts every RPC by method and final status code.
- `TokenAuth` checks per-job bearer tokens before any servicer code runs.
"""
from __future__ import annotations

import hmac
import itertools
import json
import pathlib

import grpc

from optserve.proto.errors import OptserveError, PermissionDenied, Unauthenticated, status_of
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


class RpcCounter(grpc.ServerInterceptor):
    """Counts every RPC into `counter`, a prometheus Counter labelled (method, code)."""

    def __init__(self, counter):
        self.counter = counter

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        inner = _behavior(handler)

        def count(context, failed: bool) -> None:
            code = context.code()
            name = code.name if isinstance(code, grpc.StatusCode) else ("UNKNOWN" if failed else "OK")
            self.counter.labels(method, name).inc()

        def unary(request, context):
            try:
                response = inner(request, context)
            except BaseException:
                count(context, True)
                raise
            count(context, False)
            return response

        def streaming(request, context):
            try:
                yield from inner(request, context)
            except BaseException:
                count(context, True)
                raise
            count(context, False)

        return _with_behavior(handler, streaming if handler.response_streaming else unary)


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


class TokenAuth(grpc.ServerInterceptor):
    """Per-job bearer tokens (`authorization: Bearer <token>`):
    - no token, a malformed header, or a token of no job: UNAUTHENTICATED;
    - the token of another job, or a job without a token: PERMISSION_DENIED.
    The given token is compared in constant time with every configured one, so the time a
    check takes says nothing about which tokens exist."""

    def __init__(self, tokens: dict[str, str]):
        self.tokens = {job: token.encode() for job, token in tokens.items()}

    def check(self, metadata, job: str) -> OptserveError | None:
        """None when the call may go on, else the error to answer with."""
        scheme, _, token = dict(metadata or ()).get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return Unauthenticated("missing bearer token")
        given = token.encode()
        granted = [j for j, t in self.tokens.items() if hmac.compare_digest(given, t)]
        if not granted:
            return Unauthenticated("invalid token")
        if job not in granted:
            return PermissionDenied(f"this token does not grant job {job!r}")
        return None

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_SERVICES):
            return handler
        metadata = handler_call_details.invocation_metadata
        inner = _behavior(handler)

        def guard(request, context):
            denied = self.check(metadata, job_of(request))
            if denied:
                context.abort(*status_of(denied))

        def checked_stream(requests, context):
            first = next(requests, None)
            if first is None:
                context.abort(*status_of(Unauthenticated("empty request stream")))
            guard(first, context)
            return itertools.chain([first], requests)

        if handler.request_streaming:
            def behavior(requests, context):
                return inner(checked_stream(requests, context), context)
        else:
            def behavior(request, context):
                guard(request, context)
                return inner(request, context)
        return _with_behavior(handler, behavior)
