"""Step payloads on a shard: gradients decoded into place as they arrive, and replies
encoded into pooled snapshot buffers.

Writing to fresh memory costs a page fault per 4 KiB page: on this machine class, filling a
new 400 MB buffer took 214 ms and refilling a used one 36 ms. A Step moves several
payload-sized buffers, so a shard keeps them instead of allocating them every step (a
worker's gradient buffer lives in its Job).
"""
from __future__ import annotations

import threading
import weakref

import numpy as np

from optserve.kernels import convert
from optserve.proto.wire import Assembler


class Decoder(Assembler):
    """Receives a gradient payload in a wire format and decodes each chunk into its place in
    `out` (float32) as it arrives, while its bytes are still in the cache and the next
    chunk is on its way. `runs` are the (start, length) element ranges of `out` that the
    payload fills, in payload order. An element cut in two by a chunk boundary is put
    together first. `finish()` says whether every value was finite."""

    def __init__(self, total_bytes: int, what: str, wire: str, itemsize: int, out: np.ndarray,
                 runs: list[tuple[int, int]]):
        super().__init__(total_bytes, what, out=out)
        self.wire, self.itemsize, self.runs = wire, itemsize, runs
        self.run, self.in_run = 0, 0               # where the next element goes
        self.split = np.empty(itemsize, np.uint8)  # the start of an element cut by a chunk end
        self.split_len = 0
        self.finite = True

    def _land(self, data: np.ndarray) -> None:
        if self.split_len:
            take = min(self.itemsize - self.split_len, len(data))
            self.split[self.split_len:self.split_len + take] = data[:take]
            self.split_len += take
            data = data[take:]
            if self.split_len < self.itemsize:
                return
            self._decode(self.split)
            self.split_len = 0
        whole = len(data) - len(data) % self.itemsize
        if whole:
            self._decode(data[:whole])
        self.split_len = len(data) - whole
        self.split[:self.split_len] = data[whole:]

    def _decode(self, raw: np.ndarray) -> None:
        """Decodes whole elements into the runs, continuing where the last chunk stopped."""
        size = self.itemsize
        pos, n = 0, len(raw) // size
        while pos < n:
            start, length = self.runs[self.run]
            take = min(length - self.in_run, n - pos)
            dst = self.buf[start + self.in_run:start + self.in_run + take]
            self.finite &= convert.decode(raw[pos * size:(pos + take) * size], self.wire, dst)
            pos += take
            self.in_run += take
            if self.in_run == length:
                self.run, self.in_run = self.run + 1, 0

    def finish(self) -> bool:
        super().finish()
        return self.finite


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
