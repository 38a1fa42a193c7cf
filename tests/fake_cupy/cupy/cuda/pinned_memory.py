"""cupy.cuda.pinned_memory of the test double."""
from cupy._engine import PINNED


class PinnedMemoryPool:
    def free_all_blocks(self):
        PINNED.free_all_blocks()

    def n_free_blocks(self) -> int:
        return sum(len(v) for v in PINNED.free.values())
