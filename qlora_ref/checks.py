"""Boundary checks shared by every operation: clear errors that say what was received and what to do."""

from __future__ import annotations

import numpy as np

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


class NonFiniteError(ValueError):
    """The input holds NaN or Inf, which blockwise absmax quantization cannot represent (BW-9)."""


def check_finite(x32: np.ndarray, what: str = "input") -> None:
    """Raise NonFiniteError naming how many values are non-finite and where the first one is."""
    finite = np.isfinite(x32)
    if not finite.all():
        flat = finite.ravel()
        bad = int(flat.size - np.count_nonzero(flat))
        first = int(np.argmin(flat))
        value = x32.ravel()[first]
        raise NonFiniteError(
            f"{what} has {bad} non-finite value(s) (NaN/Inf); the first is {value} at flat index {first}. "
            "Quantization needs finite weights: fix or mask them before quantizing."
        )


def check_constants(a, what: str) -> None:
    """Quantization constants (absmax, nested_absmax, offset) are finite and >= 0: bitsandbytes only writes such.

    A NaN or Inf would decode its whole block to NaN, a negative scale would flip its signs; both are refused.
    """
    a = np.asarray(a, np.float32)
    bad = ~np.isfinite(a) | (a < 0)
    if bad.any():
        first = int(np.argmax(bad.ravel()))
        raise ValueError(
            f"{what} must hold finite, non-negative float32 scales; {int(bad.sum())} value(s) are not, the first "
            f"{a.ravel()[first]} at index {first}: the state is corrupt, re-quantize the weights"
        )


def check_blocksize(blocksize: int) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)) or int(blocksize) not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    return int(blocksize)


def check_nonempty(x: np.ndarray, what: str = "input") -> None:
    if x.size == 0:
        raise ValueError(f"{what} is empty (shape {x.shape}); there is nothing to quantize")
