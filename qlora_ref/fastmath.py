"""The float32 arithmetic of bitsandbytes' CUDA build (specs/blockwise.md, rules BW-3 and BW-8).

bitsandbytes compiles its kernels with ``--use_fast_math``.  Two of its effects change bits that the spec must match:

BW-3  ``1.0f / absmax`` is the hardware's approximate reciprocal, ``rcp.approx.ftz.f32``.  It is within one ulp of the
      correctly rounded 1/x and depends only on x's significand (measured on an H100 for all 2^23 significands at four
      exponents: 733,799 are one ulp above, 374,723 one ulp below, the rest exact; table and probe in
      specs/golden/make_rcp_table.py).  The spec computes the correctly rounded reciprocal and applies that table.
BW-8  Flush-to-zero: float32 subnormals read or produced by a kernel's arithmetic become a zero of the same sign.
"""

from __future__ import annotations

import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np

_TABLE = Path(__file__).with_name("data") / "rcp_approx_ftz_f32.zlib"
_SIGN = np.uint32(0x80000000)
_EXPONENT = np.uint32(0x7F800000)
_SIGNIFICAND = np.uint32(0x007FFFFF)


@lru_cache(maxsize=1)
def _rcp_adjust() -> np.ndarray:
    """int8[2^23]: +1 / -1 / 0 ulp from the correctly rounded reciprocal, by significand."""
    bits = np.unpackbits(np.frombuffer(zlib.decompress(_TABLE.read_bytes()), np.uint8)).reshape(-1, 2)
    adjust = bits[:, 0].astype(np.int8) - bits[:, 1].astype(np.int8)
    adjust.setflags(write=False)
    return adjust


def ftz(x: np.ndarray) -> np.ndarray:
    """Flush float32 subnormals to a zero of the same sign (BW-8): a zero exponent field keeps only the sign bit."""
    x = np.asarray(x, np.float32)
    bits = x.view(np.uint32)
    subnormal = ((bits & _EXPONENT) == 0) & (bits & _SIGNIFICAND != 0)
    if not subnormal.any():
        return x
    return np.where(subnormal, bits & _SIGN, bits).astype(np.uint32).view(np.float32)


def rcp_approx(x: np.ndarray) -> np.ndarray:
    """rcp.approx.ftz.f32 of x >= 0, bit for bit (BW-3): inf for 0 or a flushed subnormal, 0 for a subnormal result."""
    x = ftz(x)
    with np.errstate(divide="ignore"):
        r = np.float32(1.0) / x  # correctly rounded
    normal = (x > 0) & np.isfinite(x)
    bits = r.view(np.uint32).astype(np.int64)
    bits[normal] += _rcp_adjust()[x.view(np.uint32)[normal] & _SIGNIFICAND]
    r = bits.astype(np.uint32).view(np.float32)
    return ftz(r)
