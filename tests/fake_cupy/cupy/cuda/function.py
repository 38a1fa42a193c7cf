"""cupy.cuda.function of the test double: a module is the host emulation of the kernels it
was compiled from (found by its binary in optserve's kernel cache, where the source is kept
beside it)."""
from __future__ import annotations

import pathlib

from cupy._engine import CUDARuntimeError, Library, current_stream, launched

__all__ = ["Function", "Module", "launched"]


def _source_of(binary: bytes) -> tuple[str, pathlib.Path]:
    from optserve.kernels.cuda_runtime import kernel_cache
    cache = kernel_cache()
    for path in cache.glob("*.cubin"):
        if path.read_bytes() == binary:
            return path.with_suffix(".cu").read_text(), cache
    raise CUDARuntimeError(200, f"no kernel source for this binary in {cache}")


class Module:
    def __init__(self):
        self.library = None

    def load(self, binary: bytes) -> None:
        source, cache = _source_of(bytes(binary))
        self.library = Library(source, cache)

    def get_function(self, name: str) -> "Function":
        if name not in self.library.arity:
            raise CUDARuntimeError(500, f"named symbol not found: {name}")
        return Function(self.library, name)


class Function:
    def __init__(self, library: Library, name: str):
        self.library, self.name = library, name

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        self.library.launch(self.name, grid[0], block[0], args, stream or current_stream())
