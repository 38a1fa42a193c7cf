"""cupy.cuda.memory of the test double: the device pool and its limit."""
from cupy._engine import POOL, OutOfMemoryError


class MemoryPointer:
    def __init__(self, ptr: int):
        self.ptr = ptr


class MemoryPool:
    def set_limit(self, size=None, fraction=None):
        POOL.limit = int(size or 0)

    def get_limit(self) -> int:
        return POOL.limit

    def used_bytes(self) -> int:
        return POOL.used

    def total_bytes(self) -> int:
        return POOL.used

    def free_all_blocks(self, stream=None):
        pass


__all__ = ["MemoryPointer", "MemoryPool", "OutOfMemoryError"]
