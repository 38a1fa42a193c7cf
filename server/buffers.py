"""Payload memory that a shard reuses instead of allocating it fresh every step.

Writing to fresh memory costs a page fault per 4 KiB page: on this machine class, filling a
new 400 MB buffer took 214 ms and refilling a used one 36 ms. A Step moves several
payload-sized buffers, so a shard keeps them: a gradient inbox per worker (see Job) and the
reply snapshots here.
"""
from __future__ import annotations

import threading
import weakref

import numpy as np


class SnapshotPool:
    """Byte buffers for replies, which any number of readers hold for as long as they need
    (every worker of a sync round while its reply streams out, and the retry cache until
    the worker's next step).

    `take(n)` hands out a new view of a pooled buffer. The buffer goes back to the pool
    when that view is gone: when nothing refers to it or to anything made from it (a
    memoryview or a slice holds its base), so a buffer is never reused while it is read.
    """

    def __init__(self, keep: int = 4):
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

