"""Shared-memory segments for workers on the shard's host (the AttachSharedMemory RPC).

A segment is one worker's: a gradient region, which the worker fills in the shard's flat
layout before each step, and a reply region, where the shard leaves the step's parameters.
The Step stream then carries only the headers, so the bytes skip gRPC altogether.

Each segment is a memfd: it has no name in any filesystem, so nothing is left behind when
a worker or the shard dies, and it can be opened only through /proc/<pid>/fd/<fd>, by a
process that may read the shard's file descriptors (the same user, in the same PID
namespace): a worker in another container or on another host cannot, and falls back to the
gRPC stream. Its size is sealed: a worker could otherwise shrink the file under the shard's
mapping, and the shard's next read of it would die of SIGBUS. A random key at its start,
which the worker reads and sends with each step, proves the worker mapped this segment.

What a worker writes there harms only its own job: the gradient is checked as a streamed
one is (every sent value finite, or the job's non-finite policy), the regions are fixed
and every access is within them.
"""
from __future__ import annotations

import fcntl
import hashlib
import hmac
import logging
import mmap
import os
import threading
from typing import Callable

import numpy as np

from optserve.proto.errors import FailedPrecondition
from optserve.proto.shared_memory import KEY_BYTES, map_fd
from optserve.proto.v1 import optserve_pb2 as pb

log = logging.getLogger("optserve.server")

_PAGE = mmap.PAGESIZE


def _pages(nbytes: int) -> int:
    return -(-nbytes // _PAGE) * _PAGE


class Segment:
    """One worker's segment: [key | pad][gradient region][reply region], page aligned."""

    def __init__(self, gradient_bytes: int, reply_bytes: int):
        self.key = os.urandom(KEY_BYTES)
        self.gradient_offset = _PAGE
        self.reply_offset = self.gradient_offset + _pages(gradient_bytes)
        self.size = self.reply_offset + _pages(reply_bytes)
        self.fd = os.memfd_create("optserve-segment", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, self.size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            whole = map_fd(self.fd, self.size)
        except BaseException:
            os.close(self.fd)
            raise
        whole[:KEY_BYTES] = np.frombuffer(self.key, np.uint8)
        self.gradient = whole[self.gradient_offset:self.gradient_offset + gradient_bytes]
        self.reply = whole[self.reply_offset:self.reply_offset + reply_bytes]

    def describe(self) -> pb.HostSegment:
        return pb.HostSegment(pid=os.getpid(), fd=self.fd, size=self.size,
                              key_sha256=hashlib.sha256(self.key).digest(),
                              gradient_offset=self.gradient_offset,
                              gradient_bytes=len(self.gradient), reply_offset=self.reply_offset,
                              reply_bytes=len(self.reply))

    def close(self) -> None:
        """Closes the descriptor: no new worker can open the segment. The memory goes once
        the shard's views of it (a step still reading it) and the worker's mapping are gone."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SegmentBudget:
    """The shard's segments, within one byte budget (`max_bytes`; none at all unless
    `enabled`); each job keeps its workers' own."""

    def __init__(self, enabled: bool = True, max_bytes: int = 16 << 30,
                 report: Callable[[int], None] = lambda held: None):
        self.enabled, self.max_bytes, self.report = enabled, max_bytes, report
        self.held = 0
        self._lock = threading.Lock()

    def new(self, what: str, gradient_bytes: int, reply_bytes: int) -> Segment | str:
        """A new segment, or why there is none."""
        if not self.enabled:
            return "this shard has shared memory off (--no-shared-memory)"
        need = _PAGE + _pages(gradient_bytes) + _pages(reply_bytes)
        with self._lock:
            if self.held + need > self.max_bytes:
                log.info("%s: no shared-memory segment of %d bytes: the shard's segments hold "
                         "%d of its --max-shared-memory-bytes %d", what, need, self.held,
                         self.max_bytes)
                return (f"the shard's segments hold {self.held} bytes of its limit of "
                        f"{self.max_bytes} (--max-shared-memory-bytes); this one needs {need}")
            self.held += need
            self.report(self.held)
        try:
            return Segment(gradient_bytes, reply_bytes)
        except BaseException:
            self.free_bytes(need)
            raise

    def free(self, segment: Segment) -> None:
        if segment.fd >= 0:
            segment.close()
            self.free_bytes(segment.size)

    def free_bytes(self, nbytes: int) -> None:
        with self._lock:
            self.held -= nbytes
            self.report(self.held)


def check_key(segment: Segment | None, job: str, worker: int, key: bytes) -> Segment:
    """The segment a step names by its key, which the worker read from it."""
    if segment is None or not hmac.compare_digest(segment.key, key):
        raise FailedPrecondition(
            f"job {job!r}: worker {worker} has no shared-memory segment with this key (the "
            "shard restarted, or the worker attached a newer one): attach again")
    return segment
