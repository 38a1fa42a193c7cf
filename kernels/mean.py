"""The mean of several workers' float32 gradients, summed in rank order: what a sync round of
several workers steps with (kernels/state.py). The NumPy statement takes a pass per worker
plus a copy and a division; the kernel folds the copy into the first sum and the division
into the last, so two workers' mean is one pass. Bit for bit the same: each value is
((g₀ + g₁) + g₂ …) / n, every operation rounded to float32.
"""
from __future__ import annotations

import numpy as np
from numba import njit

_kernel = njit(cache=True, nogil=True)


def mean_reference(out: np.ndarray, grads: list[np.ndarray]) -> None:
    np.copyto(out, grads[0])
    for g in grads[1:]:
        out += g
    out /= np.float32(len(grads))


@_kernel
def _sum(out, a, b):
    for i in range(out.size):
        out[i] = a[i] + b[i]


@_kernel
def _sum_div(out, a, b, n):
    for i in range(out.size):
        out[i] = (a[i] + b[i]) / n


def mean(out: np.ndarray, grads: list[np.ndarray]) -> None:
    """out = the mean of `grads` (two or more arrays of out's size), as mean_reference."""
    n = np.float32(len(grads))
    if len(grads) == 2:
        _sum_div(out, grads[0], grads[1], n)
        return
    _sum(out, grads[0], grads[1])
    for g in grads[2:-1]:
        _sum(out, out, g)
    _sum_div(out, out, grads[-1], n)
