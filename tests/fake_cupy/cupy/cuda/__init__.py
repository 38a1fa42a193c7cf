"""cupy.cuda of the test double (see cupy/__init__.py)."""
from cupy._engine import Event, Stream, current_stream, synchronize_all
from cupy.cuda import function, memory, pinned_memory, runtime


def get_current_stream():
    return current_stream()


def set_allocator(allocator=None):
    """The double has no pool between arrays and their memory to bypass."""


class Device:
    def __init__(self, device=None):
        self.id = int(device or 0)
        if self.id >= runtime.getDeviceCount():
            raise runtime.CUDARuntimeError(101, "invalid device ordinal")

    compute_capability = "90"

    def use(self):
        return self

    def synchronize(self):
        synchronize_all()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


__all__ = ["Device", "Event", "Stream", "function", "get_current_stream", "memory",
           "pinned_memory", "runtime", "set_allocator"]
