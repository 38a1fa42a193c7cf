"""What a shard answers with parameters: one `Result` per step (or pull), whose payload is
the job's float32 parameters encoded in the wire dtype into a pooled buffer, sent in chunks,
each as soon as the step has written it.

Writing to fresh memory costs a page fault per 4 KiB page: on this machine class, filling a
new 400 MB buffer took 214 ms and refilling a used one 36 ms. So reply buffers come from a
pool (`SnapshotPool`) instead of being allocated every step.
"""
from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from optserve.kernels import FlatLayout, convert
from optserve.proto.spec import WIRE_ITEMSIZE, WIRE_NAMES, DropReason
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
    payload: np.ndarray           # uint8, from the job's SnapshotPool
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


def encode(param: np.ndarray, layout: FlatLayout, tensors, dtype: int, out: np.ndarray,
           pos: int = 0) -> int:
    """Writes the parameters of `tensors` (local indices, ascending) into `out` from byte
    `pos` on, as `dtype`; returns where they end."""
    itemsize, fmt = WIRE_ITEMSIZE[dtype], WIRE_NAMES[dtype]
    for o, n in layout.runs(tensors):
        convert.encode(param[o:o + n], fmt, out[pos:pos + n * itemsize])
        pos += n * itemsize
    return pos


class SnapshotPool:
    """Byte buffers for replies, which any number of readers hold for as long as they need
    (every worker of a sync round while its reply streams out, and the retry cache until
    the worker's next step).

    `take(n)` hands out a new view of a pooled buffer. The buffer goes back to the pool
    when that view is gone: when nothing refers to it or to anything made from it (a
    memoryview or a slice holds its base), so a buffer is never reused while it is read.
    """

    def __init__(self, keep: int = 2):
        self.keep = keep                  # spare buffers kept per size
        self._spare: dict[int, list[np.ndarray]] = {}
        self._lock = threading.RLock()    # re-entrant: a finalizer may run inside take()

    def take(self, nbytes: int) -> np.ndarray:
        with self._lock:
            spare = self._spare.get(nbytes)
            base = spare.pop() if spare else None
        if base is None:
            base = np.empty(nbytes, np.uint8)
        view = base[:]
        weakref.finalize(view, self._give_back, base).atexit = False
        return view

    def _give_back(self, base: np.ndarray) -> None:
        with self._lock:
            spare = self._spare.setdefault(len(base), [])
            if len(spare) < self.keep:
                spare.append(base)
