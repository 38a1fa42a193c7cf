"""What a shard answers with parameters: one `Result` per step (or pull), whose payload (the
job's parameters in the wire dtype, encoded by its state into a pooled buffer) is sent in
chunks, each as soon as the step has written it."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from optserve.proto.spec import DropReason
from optserve.proto.v1 import optserve_pb2 as pb
from optserve.proto.wire import RawChunk, chunked


class Progress:
    """How much of a reply payload a running step has written, for the readers that stream
    it meanwhile: each chunk goes out as soon as its parameters are stepped and encoded."""

    def __init__(self):
        self._cond = threading.Condition()
        self._ready = 0
        self._error: BaseException | None = None

    def advance(self, nbytes: int) -> None:
        with self._cond:
            self._ready = nbytes
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._cond:
            self._error = error
            self._cond.notify_all()

    def wait(self, nbytes: int) -> None:
        """Returns once the first `nbytes` are written; raises if the step failed first."""
        with self._cond:
            self._cond.wait_for(lambda: self._ready >= nbytes or self._error is not None)
            if self._ready < nbytes:
                raise RuntimeError(f"the step failed before its reply was written: {self._error!r}")


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

    def header(self) -> pb.TensorHeader:
        return pb.TensorHeader(version=self.version, tensors=self.tensors,
                               total_bytes=len(self.payload), dtype=self.dtype,
                               dropped=self.dropped is not None,
                               drop_reason=self.dropped.value if self.dropped else "",
                               last_step=self.last_step)

    def chunks(self) -> Iterator[RawChunk]:
        """The payload in chunks, each as soon as the step has written it."""
        for chunk in chunked(self.payload):
            if self.progress is not None:
                self.progress.wait(chunk.offset + len(chunk.data))
            yield chunk

    def send(self, sent: Callable[[int, float], None]) -> Iterator[RawChunk]:
        """chunks(), then sent(bytes, seconds the sending took): the send phase."""
        start = time.perf_counter()
        yield from self.chunks()
        sent(len(self.payload), time.perf_counter() - start)
