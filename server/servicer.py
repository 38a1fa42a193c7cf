"""The gRPC servicer: it only translates. request -> ShardStore/Job call -> response.

Errors from the domain become status codes through the one table in optserve.proto.errors.
"""
from __future__ import annotations

import functools
import logging
from typing import Iterator

import grpc

from optserve.proto.errors import InvalidArgument, OptserveError, status_of
from optserve.proto.v1 import optserve_pb2 as pb
from optserve.proto.v1 import optserve_pb2_grpc as pb_grpc
from optserve.proto.wire import RawChunk, Undecodable, chunked
from optserve.server.store import ShardStore

log = logging.getLogger("optserve.server")


def _abort(context: grpc.ServicerContext, exc: BaseException):
    if not context.is_active():   # the client cancelled or went away: nobody to answer
        log.info("a call ended by its client: %s: %s", type(exc).__name__, exc)
        return
    code, message = status_of(exc)
    if not isinstance(exc, OptserveError):
        log.exception("internal error")
    context.abort(code, message)


def translate_errors(method):
    """Aborts the call with the mapped status when the domain raises (unary responses)."""
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            if isinstance(request, Undecodable):
                raise InvalidArgument(request.detail)
            return method(self, request, context)
        except Exception as exc:  # every failure gets a status, unknown ones INTERNAL
            self.store.check_fault(exc)
            _abort(context, exc)
    return wrapper


def translate_errors_stream(method):
    """The same for methods that stream their responses."""
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            if isinstance(request, Undecodable):
                raise InvalidArgument(request.detail)
            yield from method(self, request, context)
        except Exception as exc:
            self.store.check_fault(exc)
            _abort(context, exc)
    return wrapper


def split_stream(requests: Iterator, what: str):
    """(header, iterator over the RawChunks) of a `oneof {header; chunk}` request stream,
    as optserve.proto.wire decodes it."""
    first = next(requests, None)
    if isinstance(first, Undecodable):
        raise InvalidArgument(f"{what}: {first.detail}")
    if first is None or isinstance(first, RawChunk) or first.WhichOneof("kind") != "header":
        raise InvalidArgument(f"{what}: the first message must be the header")

    def body():
        for msg in requests:
            if isinstance(msg, Undecodable):
                raise InvalidArgument(f"{what}: {msg.detail}")
            if not isinstance(msg, RawChunk):
                raise InvalidArgument(f"{what}: only chunks may follow the header")
            yield msg
    return first.header, body()


class OptimizerServicer(pb_grpc.OptimizerServicer):
    def __init__(self, store: ShardStore):
        self.store = store

    @translate_errors
    def RegisterJob(self, request_iterator, context):
        header, body = split_stream(request_iterator, "RegisterJob")
        return self.store.register(header, body)

    @translate_errors_stream
    def Step(self, request_iterator, context):
        header, body = split_stream(request_iterator, "Step")
        result, reply = self.store.step(header, body)
        yield pb.StepResponse(header=result.header())
        yield from reply

    @translate_errors_stream
    def PullParameters(self, request, context):
        result = self.store.job(request.job).pull()
        yield pb.TensorStream(header=result.header())
        yield from result.chunks()

    @translate_errors_stream
    def GetOptimizerState(self, request, context):
        header, payload = self.store.job(request.job).get_state()
        yield pb.StateStream(header=header)
        yield from chunked(payload)

    @translate_errors
    def SetOptimizerState(self, request_iterator, context):
        header, body = split_stream(request_iterator, "SetOptimizerState")
        version = self.store.job(header.job).set_state(header, body)
        return pb.SetOptimizerStateResponse(version=version)

    @translate_errors
    def LeaveJob(self, request, context):
        self.store.job(request.job).leave(request.worker, request.session)
        return pb.LeaveJobResponse()

    @translate_errors
    def Checkpoint(self, request, context):
        return pb.CheckpointResponse(version=self.store.job(request.job).checkpoint())

    @translate_errors
    def DeleteJob(self, request, context):
        self.store.delete(request.job)
        return pb.DeleteJobResponse()

    @translate_errors
    def Restore(self, request, context):
        version, last_step = self.store.job(request.job).roll_back(request.version, request.worker)
        return pb.RestoreResponse(version=version, last_step=last_step)
