"""Float formats at the spec's boundary (specs/blockwise.md, rule BW-1).

NumPy has no bfloat16, so the spec carries bf16 as its raw bits in ``np.uint16`` (the top 16 bits of the float32 with
the same sign and exponent).  Arrays of an extension dtype named "bfloat16" (ml_dtypes, or a torch tensor's
``.view(torch.int16).numpy()``) are accepted too and read as those bits.

    bf16_to_f32(b) = float32 with bits (b << 16)                      exact
    f32_to_bf16(x) = round_to_nearest_even(x) to 8 significand bits  one rounding
"""

from __future__ import annotations

import numpy as np

DTYPES = ("float32", "float16", "bfloat16")


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly."""
    bits = np.asarray(bits)
    if bits.dtype.name == "bfloat16":
        bits = bits.view(np.uint16)
    if bits.dtype not in (np.uint16, np.int16):
        raise TypeError(f"bf16_to_f32 expects bfloat16 bits as uint16, got dtype {bits.dtype}")
    return (bits.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even (as torch and CUDA __float2bfloat16_rn)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(u.view(np.float32))
    if nan.any():  # keep NaN a NaN (the carry could turn a NaN payload into Inf)
        rounded[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
    return rounded


def to_float32(x: np.ndarray, dtype: str | None) -> tuple[np.ndarray, str]:
    """Read the caller's array as float32 exactly, and name its dtype (BW-1).

    float32 and float16 arrays are recognised by their dtype; bf16 arrives as uint16 bits with ``dtype="bfloat16"``
    or as an ml_dtypes ``bfloat16`` array.  Anything else is a TypeError that says what to pass.
    """
    x = np.asarray(x)
    name = x.dtype.name
    if name == "bfloat16":
        name, x = "uint16", x.view(np.uint16)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if name == "uint16":
        if dtype not in (None, "bfloat16"):
            raise TypeError(f"uint16 input is read as bfloat16 bits; it cannot be dtype={dtype!r}")
        return bf16_to_f32(x), "bfloat16"
    if name in ("float32", "float16"):
        if dtype not in (None, name):
            raise TypeError(f"input dtype is {name} but dtype={dtype!r} was asked for; cast the input first")
        return x.astype(np.float32, copy=False), name
    raise TypeError(
        f"input dtype {x.dtype} is not supported: pass float32 or float16, or bfloat16 as uint16 bits with "
        "dtype='bfloat16' (e.g. torch_tensor.view(torch.int16).numpy().view(np.uint16))"
    )


def from_float32(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round float32 values once to ``dtype`` (round to nearest even); bfloat16 comes back as uint16 bits."""
    if dtype == "float32":
        return np.asarray(x, np.float32)
    if dtype == "float16":
        return np.asarray(x, np.float32).astype(np.float16)
    if dtype == "bfloat16":
        return f32_to_bf16(x)
    raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
