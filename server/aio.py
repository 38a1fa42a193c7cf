"""The bridge between the event loop that serves every call and the threads that do the work.

A call that waits (for its client's next message, for the rest of a sync round, for its
reader to take the next chunk) waits in the event loop and holds no thread; only work runs
on the shard's bounded pool (`offload`), one piece at a time: a chunk received, a step
decided, a checkpoint written.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import threading


async def offload(fn, *args):
    """fn(*args) on the shard's worker pool (the loop's default executor). A cancelled
    caller still waits for it to finish: the work may be writing a job's state, and the
    caller's cleanup (releasing a worker, withdrawing a gradient) must come after it."""
    fut = asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        while not fut.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([fut])
        raise


class Signal:
    """Set once, from any thread; awaited in the event loop (a sync round's workers wait
    on it for the step that settles the round)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._set = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    def set(self) -> None:
        with self._lock:
            self._set = True
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            with contextlib.suppress(RuntimeError):   # the loop has closed: nobody waits
                loop.call_soon_threadsafe(_resolve, fut)

    async def wait(self, timeout: float | None) -> bool:
        """True once set; False after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._lock:
            if self._set:
                return True
            self._waiters.append((loop, fut))
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except asyncio.TimeoutError:   # TimeoutError itself from Python 3.11
            return False
        finally:
            with self._lock:
                if (loop, fut) in self._waiters:
                    self._waiters.remove((loop, fut))


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
