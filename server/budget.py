"""Bytes held by calls in flight, outside the jobs' state: uploads being assembled
(registrations' initial parameters, optimizer states being set) and payloads being sent
(optimizer states being read, parameters being pulled). A slow or stalled client holds its
bytes until it finishes or its stream times out; the budget bounds what all of them hold."""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

from optserve.proto.errors import ResourceExhausted


class Budget:
    """At most `limit` bytes in flight, except that one call may always proceed alone: a
    job whose state is larger than the budget can still be read and written, one call at a
    time. Beyond it a call is refused with RESOURCE_EXHAUSTED before it allocates."""

    def __init__(self, limit: int, report=lambda held: None):
        self.limit = limit
        self.held = 0
        self._report = report      # told the bytes held after every change (a gauge)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self, nbytes: int, what: str) -> Iterator[None]:
        with self._lock:
            if self.held and self.held + nbytes > self.limit:
                raise ResourceExhausted(
                    f"{what}: {nbytes} bytes would take the shard's calls in flight over their "
                    f"limit ({self.held} of {self.limit} bytes held by uploads and downloads "
                    "still running); retry when they are done")
            self.held += nbytes
            self._report(self.held)
        try:
            yield
        finally:
            with self._lock:
                self.held -= nbytes
                self._report(self.held)
