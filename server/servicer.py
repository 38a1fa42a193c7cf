"""The gRPC servicer: it only translates. request -> ShardStore/Job call -> response.

Every method is a coroutine on the shard's event loop (grpc.aio): reading the client's
messages and writing the answer wait there and hold no thread; the store's and jobs' work
runs on the worker pool (server/aio.py). Errors from the domain become status codes through
the one table in optserve.proto.errors.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass
from typing import AsyncIterable, AsyncIterator, Iterable

import grpc
import numpy as np

from optserve.proto.errors import DeadlineExceeded, InvalidArgument, OptserveError, status_of
from optserve.proto.v1 import optserve_pb2 as pb
from optserve.proto.wire import Assembler, RawChunk, Undecodable, chunked
from optserve.server.aio import offload
from optserve.server.budget import Budget
from optserve.server.reply import Result
from optserve.server.segments import Segment
from optserve.server.store import ShardStore

log = logging.getLogger("optserve.server")


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException):
    if context.done() or context.cancelled():   # the client went away: nobody to answer
        log.info("a call ended by its client: %s: %s", type(exc).__name__, exc)
        return
    code, message = status_of(exc)
    if not isinstance(exc, OptserveError):
        log.exception("internal error")
    await context.abort(code, message)


def translate_errors(method):
    """Aborts the call with the mapped status when the domain raises."""
    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            if isinstance(request, Undecodable):
                raise InvalidArgument(request.detail)
            return await method(self, request, context)
        except Exception as exc:  # every failure gets a status, unknown ones INTERNAL
            self.store.check_fault(exc)
            await _abort(context, exc)
    return wrapper


async def _no_chunks() -> AsyncIterator[RawChunk]:
    return
    yield


@dataclass(frozen=True)
class Streams:
    """How long a call may wait on its client: for its next message, or for it to take the
    next message of the answer. A stalled or vanished client's call ends after it, and what
    it held (a thread never; a worker's slot, buffers, in-flight bytes) is let go."""
    idle_timeout: float = 60.0


class OptimizerServicer:
    def __init__(self, store: ShardStore, streams: Streams, budget: Budget):
        self.store = store
        self.idle = streams.idle_timeout
        self.budget = budget

    # ---- the transport -------------------------------------------------------------------
    async def _messages(self, requests: AsyncIterable, what: str) -> AsyncIterator:
        it = requests.__aiter__()
        while True:
            try:
                message = await asyncio.wait_for(it.__anext__(), self.idle)
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise DeadlineExceeded(f"{what}: no message from the client for "
                                       f"{self.idle:g}s; the call is ended") from None
            yield message

    async def _split(self, requests: AsyncIterable, what: str):
        """(header, the RawChunks after it) of a `oneof {header; chunk}` request stream, as
        optserve.proto.wire decodes it."""
        messages = self._messages(requests, what)
        first = await anext(messages, None)
        if isinstance(first, Undecodable):
            raise InvalidArgument(f"{what}: {first.detail}")
        if first is None or isinstance(first, RawChunk) or first.WhichOneof("kind") != "header":
            raise InvalidArgument(f"{what}: the first message must be the header")

        async def body():
            async for msg in messages:
                if isinstance(msg, Undecodable):
                    raise InvalidArgument(f"{what}: {msg.detail}")
                if not isinstance(msg, RawChunk):
                    raise InvalidArgument(f"{what}: only chunks may follow the header")
                yield msg
        return first.header, body()

    async def _assemble(self, body: AsyncIterable[RawChunk], nbytes: int, what: str) -> np.ndarray:
        raw = Assembler(nbytes, what)
        async for chunk in body:
            await offload(raw.add, chunk)
        return raw.finish()

    async def _write(self, context, messages: Iterable | AsyncIterable) -> None:
        async def each():
            if isinstance(messages, AsyncIterable):
                async for m in messages:
                    yield m
            else:
                for m in messages:
                    yield m
        async for message in each():
            try:
                await asyncio.wait_for(context.write(message), self.idle)
            except asyncio.TimeoutError:
                raise DeadlineExceeded(f"the client took no message of the answer for "
                                       f"{self.idle:g}s; the call is ended") from None

    # ---- the methods ---------------------------------------------------------------------
    @translate_errors
    async def RegisterJob(self, requests, context):
        header, body = await self._split(requests, "RegisterJob")
        nbytes = await offload(self.store.registration_bytes, header)
        what = f"job {header.spec.job!r} initial parameters"
        async with self.budget.hold(nbytes, what):
            raw = await self._assemble(body, nbytes, what)
            return await offload(self.store.register, header, raw)

    @translate_errors
    async def Step(self, requests, context):
        header, body = await self._split(requests, "Step")
        if header.shared_memory_key:
            raise InvalidArgument("Step: a stream carries its gradient in chunks; a step whose "
                                  "gradient is in shared memory is a StepShared call")

        async def send(result: Result, _segment: None) -> None:
            await self._write(context, [pb.StepResponse(header=result.header())])
            await self._write(context, result.chunks())
        await self.store.step(header, body, send)

    @translate_errors
    async def StepShared(self, request, context):
        if not request.shared_memory_key:
            raise InvalidArgument("StepShared: no shared_memory_key (the worker's segment)")
        answer = []

        async def send(result: Result, segment: Segment) -> None:
            await result.into(segment.reply)
            answer.append(result.header())
            answer[0].shared_memory = True
            answer[0].in_rounds_segment = result.in_rounds_segment
        await self.store.step(request, _no_chunks(), send)
        return answer[0]

    @translate_errors
    async def AttachSharedMemory(self, request, context):
        return await offload(self.store.job(request.job).attach, request.worker, request.session)

    @translate_errors
    async def PullParameters(self, request, context):
        job = self.store.job(request.job)
        async with self.budget.hold(4 * job.layout.numel, f"job {job.name!r} parameters"):
            result = await offload(job.pull)
            await self._write(context, [pb.TensorStream(header=result.header())])
            await self._write(context, result.chunks())

    @translate_errors
    async def GetOptimizerState(self, request, context):
        job = self.store.job(request.job)
        async with self.budget.hold(job.layout.state_bytes(), f"job {job.name!r} optimizer state"):
            header, payload = await offload(job.get_state)
            await self._write(context, [pb.StateStream(header=header), *chunked(payload)])

    @translate_errors
    async def SetOptimizerState(self, requests, context):
        header, body = await self._split(requests, "SetOptimizerState")
        job = self.store.job(header.job)
        nbytes = await offload(job.state_upload_bytes, header)
        what = f"job {job.name!r} optimizer state"
        async with self.budget.hold(nbytes, what):
            raw = await self._assemble(body, nbytes, what)
            version = await offload(job.set_state, header, raw)
        return pb.SetOptimizerStateResponse(version=version)

    @translate_errors
    async def LeaveJob(self, request, context):
        job = self.store.job(request.job)
        await offload(job.leave, request.worker, request.session)
        return pb.LeaveJobResponse()

    @translate_errors
    async def Checkpoint(self, request, context):
        return pb.CheckpointResponse(version=await offload(self.store.job(request.job).checkpoint))

    @translate_errors
    async def DeleteJob(self, request, context):
        await offload(self.store.delete, request.job)
        return pb.DeleteJobResponse()

    @translate_errors
    async def Restore(self, request, context):
        job = self.store.job(request.job)
        version, last_step = await offload(job.roll_back, request.version, request.worker)
        return pb.RestoreResponse(version=version, last_step=last_step)
