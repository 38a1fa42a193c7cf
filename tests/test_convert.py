"""Wire-format conversions: the NumPy reference against torch's own casts, and the numba fast
path (kernels/convert.py) against the reference, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from optserve.kernels import convert, reference

TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
SIZES = [0, 1, 7, 4097, 1_000_003]


def values(n: int, seed: int = 0) -> np.ndarray:
    """Random float32 values of every magnitude, and the cases rounding gets wrong: ties,
    values that round up into the next exponent or to infinity, subnormals and signed zeros."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * np.exp2(rng.integers(-140, 126, n))).astype(np.float32)
    special = np.array([0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 1e-39, 3.3895314e38,
                        np.finfo(np.float32).max, np.finfo(np.float32).tiny, 65504.0, 65520.0],
                       np.float32)
    ties = np.array([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3FFF8000, 0x7F7F8000],
                    np.uint32).view(np.float32)
    head = np.concatenate([special, ties])[:n]
    x[:len(head)] = head
    return x


def torch_bytes(x: np.ndarray, wire: str) -> np.ndarray:
    with np.errstate(over="ignore"):
        cast = torch.from_numpy(x.copy()).to(TORCH[wire])
    return cast.view(torch.uint8).numpy() if cast.numel() else np.empty(0, np.uint8)


@pytest.mark.parametrize("wire", list(TORCH))
def test_reference_encode_rounds_as_torch_does(wire):
    x = values(100_000)
    out = np.empty(x.size * ITEMSIZE[wire], np.uint8)
    with np.errstate(over="ignore"):
        reference.encode(x, wire, out)
    np.testing.assert_array_equal(out, torch_bytes(x, wire))


@pytest.mark.parametrize("wire", list(TORCH))
def test_reference_decode_widens_as_torch_does(wire):
    raw = torch_bytes(values(100_000), wire)
    out = np.empty(raw.size // ITEMSIZE[wire], np.float32)
    assert reference.decode(raw, wire, out) == bool(np.isfinite(out).all())
    expected = torch.from_numpy(raw.copy()).view(TORCH[wire]).float().numpy()
    np.testing.assert_array_equal(out.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("wire", list(TORCH))
@pytest.mark.parametrize("n", SIZES)
def test_fast_encode_is_the_reference(wire, n):
    x = values(n, seed=n)
    fast, ref = (np.full(n * ITEMSIZE[wire], 0xAB, np.uint8) for _ in range(2))
    with np.errstate(over="ignore"):
        convert.encode(x, wire, fast)
        reference.encode(x, wire, ref)
    np.testing.assert_array_equal(fast, ref)


# bit type, exponent mask and its top bit of each wire format
EXPONENT = {"float32": (np.uint32, 0x7F800000, 0x40000000),
            "bfloat16": (np.uint16, 0x7F80, 0x4000), "float16": (np.uint16, 0x7C00, 0x4000)}


def finite_bits(n: int, wire: str, seed: int) -> np.ndarray:
    """Random wire values (every bit pattern but those of NaN and infinity), as bytes."""
    kind, exponent, top = EXPONENT[wire]
    bits = np.random.default_rng(seed).integers(0, np.iinfo(kind).max, n, kind, endpoint=True)
    bits[(bits & exponent) == exponent] ^= kind(top)
    return bits.view(np.uint8)


@pytest.mark.parametrize("wire", list(TORCH))
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("poison", [None, "nan", "inf", "-inf"])
def test_fast_decode_is_the_reference_and_finds_nonfinite_values(wire, n, poison):
    raw = finite_bits(n, wire, seed=n)
    if poison and n:
        where = ITEMSIZE[wire] * (n // 2)
        raw[where:where + ITEMSIZE[wire]] = torch_bytes(np.array([float(poison)], np.float32), wire)
    finite = not (poison and n)
    fast, ref = (np.full(n, 7.0, np.float32) for _ in range(2))
    assert convert.decode(raw, wire, fast) == finite
    assert reference.decode(raw, wire, ref) == finite
    np.testing.assert_array_equal(fast.view(np.uint32), ref.view(np.uint32))
