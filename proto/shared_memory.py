"""What both sides of a shared-memory segment (server/segments.py, client/shm.py) share:
its key's size, and a mapping that keeps no file descriptor of its own.

Python's `mmap.mmap` keeps a duplicate of the descriptor it maps for as long as the mapping
lives: the shard could then not close a segment to new workers (it would stay reachable
under /proc/<pid>/fd/), so both sides map with mmap(2) itself.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import weakref

import numpy as np

KEY_BYTES = 32   # the random key at a segment's start

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value


def map_fd(fd: int, size: int) -> np.ndarray:
    """The `size` bytes of `fd`, mapped shared and writable, as a uint8 array; unmapped once
    nothing refers to the array or to a view of it."""
    address = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    if address in (None, _MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {size} bytes: {os.strerror(err)}")
    memory = (ctypes.c_uint8 * size).from_address(address)
    weakref.finalize(memory, _libc.munmap, address, size)
    return np.frombuffer(memory, np.uint8)
