"""Bytes held by calls in flight, outside the jobs' state: uploads being assembled
(registrations' initial parameters, optimizer states being set) and payloads being sent
(optimizer states being read, parameters being pulled). A slow or stalled client holds its
bytes until it finishes or its stream times out; the budget bounds what all of them hold."""
from __future__ import annotations

import contextlib
import time
from typing import AsyncIterator

from optserve.proto.errors import ResourceExhausted
from optserve.server.aio import Signal


class Budget:
    """At most `limit` bytes in flight, except that one call may always proceed alone: a
    job whose state is larger than the budget can still be read and written, one call at a
    time. A call that does not fit waits, in the event loop, up to `wait` seconds for calls
    to finish (the workers of a large job register at once: each uploads the parameters),
    and is then refused with RESOURCE_EXHAUSTED, before it allocates."""

    def __init__(self, limit: int, report=lambda held: None, wait: float = 30.0):
        self.limit = limit
        self.wait = wait
        self.held = 0
        self._report = report      # told the bytes held after every change (a gauge)
        self._freed = Signal()     # set, and replaced, whenever bytes are let go

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int, what: str) -> AsyncIterator[None]:
        deadline = time.monotonic() + self.wait
        while self.held and self.held + nbytes > self.limit:   # in the event loop: no race
            left = deadline - time.monotonic()
            if left <= 0 or not await self._freed.wait(left):
                raise ResourceExhausted(
                    f"{what}: {nbytes} bytes would take the shard's calls in flight over their "
                    f"limit ({self.held} of {self.limit} bytes held by uploads and downloads "
                    f"still running, for {self.wait:g}s); retry when they are done")
        self.held += nbytes
        self._report(self.held)
        try:
            yield
        finally:
            self.held -= nbytes
            self._report(self.held)
            freed, self._freed = self._freed, Signal()
            freed.set()
