"""Wire-format conversions (kernels/convert.py) against torch's own casts, bit for bit: the
NumPy references for every wire format, and the numba fast paths for the formats that have
one (float16 has none: numba has no float16 type on the CPU, so it takes the reference)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from optserve.kernels import convert

TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
SIZES = [0, 1, 7, 4097, 1_000_003]
# (implementation, wire format) pairs that are code of their own.
ENCODERS = [*((convert.encode_reference, w) for w in TORCH),
            *((convert.encode, w) for w in ("float32", "bfloat16"))]
DECODERS = [*((convert.decode_reference, w) for w in TORCH),
            *((convert.decode, w) for w in ("float32", "bfloat16"))]


def _ids(pairs):
    return [f"{'reference' if fn.__name__.endswith('reference') else 'fast'}-{w}" for fn, w in pairs]


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


@pytest.mark.parametrize("encode, wire", ENCODERS, ids=_ids(ENCODERS))
@pytest.mark.parametrize("n", SIZES)
def test_encode_rounds_as_torch_does(encode, wire, n):
    """Ties, carries into the next exponent, overflow to infinity, subnormals, signed zeros."""
    x = values(n, seed=n)
    out = np.full(n * ITEMSIZE[wire], 0xAB, np.uint8)
    with np.errstate(over="ignore"):
        encode(x, wire, out)
    np.testing.assert_array_equal(out, torch_bytes(x, wire))


# bit type, exponent mask and its top bit of each wire format
EXPONENT = {"float32": (np.uint32, 0x7F800000, 0x40000000),
            "bfloat16": (np.uint16, 0x7F80, 0x4000), "float16": (np.uint16, 0x7C00, 0x4000)}


def finite_bits(n: int, wire: str, seed: int) -> np.ndarray:
    """Random wire values (every bit pattern but those of NaN and infinity), as bytes."""
    kind, exponent, top = EXPONENT[wire]
    bits = np.random.default_rng(seed).integers(0, np.iinfo(kind).max, n, kind, endpoint=True)
    bits[(bits & exponent) == exponent] ^= kind(top)
    return bits.view(np.uint8)


@pytest.mark.parametrize("decode, wire", DECODERS, ids=_ids(DECODERS))
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("poison", [None, "nan", "inf", "-inf"])
def test_decode_widens_as_torch_does_and_finds_nonfinite_values(decode, wire, n, poison):
    raw = finite_bits(n, wire, seed=n)
    if poison and n:
        where = ITEMSIZE[wire] * (n // 2)
        raw[where:where + ITEMSIZE[wire]] = torch_bytes(np.array([float(poison)], np.float32), wire)
    out = np.full(n, 7.0, np.float32)
    assert decode(raw, wire, out) == (not (poison and n))
    if n:   # bit for bit, but a NaN's payload (NumPy and torch widen float16 NaNs apart)
        expected = torch.from_numpy(raw.copy()).view(TORCH[wire]).float().numpy()
        nan = np.isnan(expected)
        assert np.isnan(out[nan]).all()
        np.testing.assert_array_equal(out[~nan].view(np.uint32), expected[~nan].view(np.uint32))
