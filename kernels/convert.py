"""Conversions between a shard's float32 values and the wire formats, each one fused pass.

A Step decodes every gradient byte it receives and encodes every parameter byte it sends.
With bfloat16 on the wire NumPy takes five passes to round, and its conversion took about
as long as the AdamW step itself; these numba loops take one pass each, and the decoder
checks on the way that every value is finite (the job's non-finite policy needs to know).
They run on the calling thread only: a shard decodes each chunk as it arrives, beside
gRPC's own threads, and a parallel region per 4 MiB chunk measured slower on 2 cores
(its threads wait for a core that gRPC holds). numba has no float16 type on the CPU, so
float16 goes through NumPy's own conversion.
`decode_reference`/`encode_reference`, beside them, are the plain NumPy statement of each
format: the ground truth the fast paths are tested against, and the path for float16.
"""
from __future__ import annotations

import numpy as np
from numba import njit

_kernel = njit(cache=True, nogil=True)

_U32_MASK = np.uint64(0xFFFFFFFF)
_F32_EXPONENT = np.uint32(0x7F800000)
_BF16_EXPONENT = np.uint16(0x7F80)


@_kernel
def _copy_f32(src, dst):
    """dst = src (both uint32 bit patterns); returns the number of non-finite values."""
    bad = 0
    for i in range(src.size):
        bits = src[i]
        dst[i] = bits
        bad += (bits & _F32_EXPONENT) == _F32_EXPONENT
    return bad


@_kernel
def _decode_bf16(src, dst):
    """dst (float32 bits) = src (bfloat16 bits) << 16; returns the number of non-finite values."""
    bad = 0
    for i in range(src.size):
        half = src[i]
        dst[i] = np.uint32(half) << np.uint32(16)
        bad += (half & _BF16_EXPONENT) == _BF16_EXPONENT
    return bad


@_kernel
def _encode_bf16(src, dst):
    """dst = src (float32 bits) rounded to nearest even bfloat16, with the reference's
    uint32 wrap-around."""
    for i in range(src.size):
        bits = np.uint64(src[i])
        rounded = (bits + np.uint64(0x7FFF) + ((bits >> np.uint64(16)) & np.uint64(1))) & _U32_MASK
        dst[i] = np.uint16(rounded >> np.uint64(16))


@_kernel
def _nonfinite_f32(src):
    """The number of non-finite values in `src` (float32 bits)."""
    bad = 0
    for i in range(src.size):
        bad += (src[i] & _F32_EXPONENT) == _F32_EXPONENT
    return bad


def all_finite(values: np.ndarray) -> bool:
    """Whether every float32 value is finite: one read, no temporary."""
    return _nonfinite_f32(values.view(np.uint32)) == 0


def decode(raw: np.ndarray, wire: str, out: np.ndarray) -> bool:
    """Decodes the wire bytes `raw` into the float32 array `out`; True when every value is
    finite."""
    if wire == "float32":
        return _copy_f32(raw.view(np.uint32), out.view(np.uint32)) == 0
    if wire == "bfloat16":
        return _decode_bf16(raw.view(np.uint16), out.view(np.uint32)) == 0
    return decode_reference(raw, wire, out)


def encode(values: np.ndarray, wire: str, out: np.ndarray) -> None:
    """Encodes float32 `values` into the byte array `out` in the wire format."""
    if wire == "float32":
        _copy_f32(values.view(np.uint32), out.view(np.uint32))
    elif wire == "bfloat16":
        _encode_bf16(values.view(np.uint32), out.view(np.uint16))
    else:
        encode_reference(values, wire, out)


# ---- the references -------------------------------------------------------------------------

def decode_reference(raw: np.ndarray, wire: str, out: np.ndarray) -> bool:
    """Decodes the wire bytes `raw` into the float32 array `out`; True when every value is
    finite."""
    if wire == "float32":
        out[:] = raw.view("<f4")
    elif wire == "float16":
        out[:] = raw.view("<f2")
    elif wire == "bfloat16":
        # bfloat16 is the top half of a float32.
        out.view(np.uint32)[:] = raw.view("<u2").astype(np.uint32) << 16
    else:
        raise ValueError(f"unknown wire format {wire!r}")
    return bool(np.isfinite(out).all())


def encode_reference(values: np.ndarray, wire: str, out: np.ndarray) -> None:
    """Encodes float32 `values` into the byte array `out` in the wire format."""
    if wire == "float32":
        out.view("<f4")[:] = values
    elif wire == "float16":
        out.view("<f2")[:] = values
    elif wire == "bfloat16":
        # Round to nearest even on the 16 bits that are dropped (uint32 arithmetic wraps).
        bits = values.view(np.uint32)
        rounded = bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))
        out.view("<u2")[:] = rounded >> 16
    else:
        raise ValueError(f"unknown wire format {wire!r}")
