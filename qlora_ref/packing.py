"""4-bit packing (specs/packing.md, rules PK-1 .. PK-3).

PK-1  Two codes per byte, the first element in the HIGH nibble:  byte[j] = (code[2j] << 4) | code[2j+1].
      [a, b, c, d] -> [ab, cd]
PK-2  An odd element count leaves the last low nibble to the caller's filler (the code of 0.0 for quantized data).
PK-3  unpack(pack(codes), n) == codes.
"""

from __future__ import annotations

import numpy as np


def pack_4bit(codes: np.ndarray, filler: int = 0) -> np.ndarray:
    """Pack 4-bit codes (uint8, values 0..15) two per byte; returns uint8[(n + 1) // 2] (PK-1, PK-2)."""
    codes = np.asarray(codes).ravel()
    if codes.dtype != np.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if codes.size and int(codes.max()) > 15:
        raise ValueError(f"codes must be 4-bit (0..15); found {int(codes.max())}")
    if codes.size % 2:
        codes = np.concatenate([codes, np.array([filler], np.uint8)])
    pairs = codes.reshape(-1, 2)  # (n/2, 2)
    return ((pairs[:, 0] << 4) | pairs[:, 1]).astype(np.uint8)


def unpack_4bit(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of `pack_4bit`: the first n codes, uint8 (PK-3)."""
    packed = np.asarray(packed).ravel()
    if packed.dtype != np.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    if packed.size != (n + 1) // 2:
        raise ValueError(f"{n} codes need {(n + 1) // 2} packed bytes, got {packed.size}")
    codes = np.empty(packed.size * 2, np.uint8)
    codes[0::2] = packed >> 4
    codes[1::2] = packed & 0x0F
    return codes[:n]
