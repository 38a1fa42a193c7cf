"""What a shard answers with parameters: one `Result` per step (or pull), whose payload (the
job's parameters in the wire dtype, encoded by its state into a pooled buffer) is sent in
chunks, each as soon as the step has written it."""
from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass
from typing import AsyncIterator

import numpy as np

from optserve.kernels.state import Written
from optserve.proto.spec import DropReason
from optserve.proto.v1 import optserve_pb2 as pb
from optserve.proto.wire import RawChunk, chunked
from optserve.server.aio import Signal, offload


class Progress:
    """How much of a reply payload a running step has written, for the readers that stream
    it meanwhile: each chunk goes out as soon as its parameters are stepped, encoded and (on
    a GPU) copied back."""

    def __init__(self):
        self._cond = threading.Condition()
        self._written: list[Written] = []    # ascending ends
        self._error: BaseException | None = None
        self._changed = Signal()             # replaced at every advance: readers in the loop

    def advance(self, written: Written) -> None:
        with self._cond:
            self._written.append(written)
            self._notify()

    def fail(self, error: BaseException) -> None:
        with self._cond:
            self._error = error
            self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, Signal()
        changed.set()

    async def wait(self, nbytes: int) -> None:
        """Returns once the first `nbytes` are written; raises if the step failed first.
        Waits in the event loop; the copy back of a GPU's chunk, queued when its part was
        encoded, is waited for inline (a fraction of a millisecond for 4 MiB)."""
        while True:
            with self._cond:
                if self._ready() >= nbytes:
                    ends = [w.end for w in self._written]
                    written = self._written[bisect.bisect_left(ends, nbytes)]
                    break
                if self._error is not None:
                    raise RuntimeError(f"the step failed before its reply was written: "
                                       f"{self._error!r}")
                changed = self._changed
            await changed.wait(None)
        written.wait()

    def _ready(self) -> int:
        return self._written[-1].end if self._written else 0


@dataclass
class Result:
    """What a Step (or PullParameters) answers: parameters (in `dtype`) after it."""
    version: int
    tensors: list[int]            # spec indices, in payload order
    payload: np.ndarray           # uint8, from the job state's pool of reply buffers
    dtype: int = pb.FLOAT32
    dropped: DropReason | None = None   # the gradient was not applied, and why
    last_step: int = 0            # rolled back: the worker's last step the job holds
    progress: Progress | None = None    # while a step still writes the payload
    in_rounds_segment: bool = False     # the payload lies in the job's rounds segment

    def header(self) -> pb.TensorHeader:
        return pb.TensorHeader(version=self.version, tensors=self.tensors,
                               total_bytes=len(self.payload), dtype=self.dtype,
                               dropped=self.dropped is not None,
                               drop_reason=self.dropped.value if self.dropped else "",
                               last_step=self.last_step)

    async def into(self, region: np.ndarray) -> None:
        """Puts the payload into `region` (a worker's segment) once the step has written
        all of it; a payload the step wrote there, or into the rounds segment, stays."""
        n = len(self.payload)
        if self.progress is not None and n:
            await self.progress.wait(n)
        if n and not self.in_rounds_segment and self.payload.ctypes.data != region.ctypes.data:
            await offload(np.copyto, region[:n], self.payload)

    async def chunks(self) -> AsyncIterator[RawChunk]:
        """The payload in chunks, each as soon as the step has written it."""
        for chunk in chunked(self.payload):
            if self.progress is not None:
                await self.progress.wait(chunk.offset + len(chunk.data))
            yield chunk
