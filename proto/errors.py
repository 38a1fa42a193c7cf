"""One table between domain errors and gRPC status codes, used in both directions.

The shard raises these; its servicer aborts with `status_of(exc)`. The client turns a
`grpc.RpcError` back into the same class with `from_rpc_error`, keeping the server's message.
"""
from __future__ import annotations

import grpc


class OptserveError(Exception):
    """Base of every error optserve reports. Unknown failures map to INTERNAL."""


class NotFound(OptserveError):
    """Unknown job or parameter."""


class InvalidArgument(OptserveError):
    """Malformed request: bad chunk, byte count, dtype, shape or hyperparameter."""


class FailedPrecondition(OptserveError):
    """Request is well-formed but conflicts with the job: spec mismatch, step out of order."""


class Unauthenticated(OptserveError):
    """No or malformed credentials."""


class PermissionDenied(OptserveError):
    """Credentials that do not grant access to this job."""


class ResourceExhausted(OptserveError):
    """Over a memory, size or count limit."""


class DeadlineExceeded(OptserveError):
    """A barrier or call ran out of time."""


class Aborted(OptserveError):
    """The operation was abandoned; the caller may retry."""


class Unavailable(OptserveError):
    """The shard is shutting down or not reachable; retry elsewhere or later."""


class Internal(OptserveError):
    """A bug or an unexpected failure in the shard."""


STATUS_CODES: dict[type[OptserveError], grpc.StatusCode] = {
    NotFound: grpc.StatusCode.NOT_FOUND,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Aborted: grpc.StatusCode.ABORTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Internal: grpc.StatusCode.INTERNAL,
}
ERRORS_BY_CODE: dict[grpc.StatusCode, type[OptserveError]] = {c: e for e, c in STATUS_CODES.items()}


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a shard answers for `exc`."""
    for cls in type(exc).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls], str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def from_rpc_error(err: grpc.RpcError) -> OptserveError:
    """The client-side exception for a failed call, carrying the server's message."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    cls = ERRORS_BY_CODE.get(code, OptserveError)
    exc = cls(f"{code.name}: {details}")
    exc.code = code
    return exc
