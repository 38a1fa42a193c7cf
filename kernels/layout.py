"""Flat buffers and the segment table a shard keeps for one job.

All tensors of a job on a shard live back to back in one float32 parameter buffer; each
optimizer state field (`exp_avg`, `exp_avg_sq_row`, ...) has its own flat buffer. The
segment table says where tensor i starts in each of them, so a kernel walks the whole
job in one launch however many tensors it has.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

Shape = tuple[int, ...]


def numel(shape: Shape) -> int:
    return math.prod(shape)


@dataclass
class FlatLayout:
    """Segment table: offsets and sizes of every tensor in every flat buffer.

    shapes[i]            shape of tensor i (segment i)
    offsets[i], sizes[i] its place in the parameter (and gradient) buffer
    fields[name][i]      its place in that state buffer, -1 when tensor i has no such field
    field_shapes[i]      {field: shape} for tensor i
    """
    shapes: list[Shape]
    field_shapes: list[dict[str, Shape]]
    offsets: np.ndarray = field(init=False)
    sizes: np.ndarray = field(init=False)
    fields: dict[str, np.ndarray] = field(init=False)
    field_totals: dict[str, int] = field(init=False)
    _memo: dict = field(init=False, default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.sizes = np.array([numel(s) for s in self.shapes], dtype=np.int64)
        self.offsets = np.concatenate(([0], np.cumsum(self.sizes)[:-1])).astype(np.int64)
        names = sorted({f for fs in self.field_shapes for f in fs})
        self.fields, self.field_totals = {}, {}
        for name in names:
            offs = np.full(len(self.shapes), -1, dtype=np.int64)
            total = 0
            for i, fs in enumerate(self.field_shapes):
                if name in fs:
                    offs[i] = total
                    total += numel(fs[name])
            self.fields[name], self.field_totals[name] = offs, total

    @property
    def num_tensors(self) -> int:
        return len(self.shapes)

    @property
    def numel(self) -> int:
        return int(self.sizes.sum())

    def param_view(self, buf: np.ndarray, i: int) -> np.ndarray:
        o, n = int(self.offsets[i]), int(self.sizes[i])
        return buf[o:o + n].reshape(self.shapes[i])

    def field_view(self, state: "FlatState", name: str, i: int) -> np.ndarray:
        shape = self.field_shapes[i][name]
        o = int(self.fields[name][i])
        return state.fields[name][o:o + numel(shape)].reshape(shape)

    def runs(self, tensors) -> list[tuple[int, int]]:
        """The (start, length) element ranges of the flat buffers that `tensors` (ascending)
        fill, in order, neighbours merged: what one copy, decode or encode can take at once."""
        runs: list[tuple[int, int]] = []
        for k in tensors:
            o, n = int(self.offsets[k]), int(self.sizes[k])
            if runs and runs[-1][0] + runs[-1][1] == o:
                runs[-1] = (runs[-1][0], runs[-1][1] + n)
            else:
                runs.append((o, n))
        return runs

    def state_bytes(self) -> int:
        return 4 * (self.numel + sum(self.field_totals.values()))

    def memo(self, key, build):
        """build(), once per key for this layout: the tile plans a backend derives from the
        layout alone live as long as it does."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]


@dataclass
class FlatState:
    """A job's float32 parameters, optimizer state buffers and per-tensor step counts."""
    param: np.ndarray
    fields: dict[str, np.ndarray]
    steps: np.ndarray

    @classmethod
    def zeros(cls, layout: FlatLayout) -> "FlatState":
        return cls(np.zeros(layout.numel, np.float32),
                   {k: np.zeros(n, np.float32) for k, n in layout.field_totals.items()},
                   np.zeros(layout.num_tensors, np.int64))

    def copy(self) -> "FlatState":
        return FlatState(self.param.copy(), {k: v.copy() for k, v in self.fields.items()},
                         self.steps.copy())

