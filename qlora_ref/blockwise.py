"""Blockwise absmax quantization (specs/blockwise.md, rules BW-1 .. BW-9) and the 8-bit dynamic quantizer (DQ-2).

A flat tensor x of n values is cut into blocks of B values (the last block may be partial).  For block b, in float32:

    absmax[b] = max_i |x_i|                       (BW-2: over the valid items only)
    r[b]      = rcp(absmax[b])                    (BW-3: bitsandbytes' fast-math reciprocal, within 1 ulp; 1/0 = inf)
    y_i       = x_i * r[b]                        (BW-3: a multiply by the reciprocal, one rounding, then BW-8 FTZ)
    code_i    = #{k : y_i > t[k]}                 (BW-4: strict '>', so a tie goes to the lower code)

with t the codebook's decision thresholds (codebooks.nf4_thresholds etc.).  An all-zero block has r = inf and
y = 0 * inf = NaN; NaN fails every '>' and so encodes as code 0 (BW-6: bytes 0x00 for NF4 and FP4, as bitsandbytes'
CUDA kernel does).  FP4 is sign-magnitude (BW-5): sign bit when y < 0, magnitude from thresholds on |y|.

Decoding (BW-7) is one float32 product (flushed to zero if subnormal, BW-8) rounded once to the output dtype:
x_hat_i = T(table[code_i] * absmax[b]).  Subnormal inputs are read as zeros of the same sign (BW-8).
"""

from __future__ import annotations

import numpy as np

from .checks import check_finite
from .codebooks import (
    FP4_CODES_ASCENDING,
    FP4_THRESHOLDS,
    dequant_table,
    int4_thresholds,
    nf4_thresholds,
)
from .fastmath import ftz, rcp_approx


def _blocks(x32: np.ndarray, blocksize: int) -> np.ndarray:
    """View x as (nblocks, blocksize), zero-padding a partial last block (zeros never change max |x|)."""
    n = x32.size
    nblocks = -(-n // blocksize)
    if n == nblocks * blocksize:
        return x32.reshape(nblocks, blocksize)
    padded = np.zeros(nblocks * blocksize, np.float32)
    padded[:n] = x32.ravel()
    return padded.reshape(nblocks, blocksize)


def block_absmax(x32: np.ndarray, blocksize: int) -> np.ndarray:
    """absmax[b] = max |x| over block b, float32[ceil(n / blocksize)] (BW-2)."""
    return ftz(np.abs(_blocks(x32, blocksize)).max(axis=1))


def scale_blocks(x32: np.ndarray, absmax: np.ndarray, blocksize: int) -> np.ndarray:
    """y = x * rcp(absmax) in float32, padded to whole blocks; NaN in all-zero blocks (BW-3, BW-8)."""
    r = rcp_approx(absmax)  # (nblocks,)
    with np.errstate(invalid="ignore"):
        y = ftz(_blocks(ftz(x32), blocksize) * r[:, None])  # (nblocks, blocksize)
    return y.ravel()


def count_above(y: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """code = #{k : y > t[k]} as uint8 (BW-4); NaN is above nothing, so it counts 0 (BW-6)."""
    codes = np.zeros(y.shape, np.uint8)
    for t in thresholds:
        np.add(codes, y > t, out=codes, casting="unsafe")
    return codes


def encode_4bit(y: np.ndarray, quant_type: str) -> np.ndarray:
    """4-bit codes of scaled values y (BW-4, BW-5); NaN -> code 0 (BW-6)."""
    if quant_type == "fp4":
        sign = (y < 0).view(np.uint8) << 3  # BW-5: bit 3 when y < 0 (not for -0.0 or NaN)
        return sign | FP4_CODES_ASCENDING[count_above(np.abs(y), FP4_THRESHOLDS)]
    return count_above(y, nf4_thresholds() if quant_type == "nf4" else int4_thresholds())


def quantize_codes_4bit(x32: np.ndarray, quant_type: str, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise 4-bit quantization of float32 values: (codes uint8[nblocks * blocksize], absmax float32[nblocks]).

    Codes past n belong to the zero padding; the first of them fills an odd tail nibble (PK-2).
    """
    absmax = block_absmax(x32, blocksize)
    return encode_4bit(scale_blocks(x32, absmax, blocksize), quant_type), absmax


def decode_4bit(codes: np.ndarray, absmax_f32: np.ndarray, quant_type: str, blocksize: int) -> np.ndarray:
    """x_hat = table[code] * absmax[i // blocksize] in float32 (BW-7); the caller rounds once to its dtype."""
    n = codes.size
    scale = np.repeat(absmax_f32.astype(np.float32, copy=False), blocksize)[:n]
    return ftz(dequant_table(quant_type)[codes] * scale)


# --- 8-bit dynamic-map blockwise quantization (double quantization and 8-bit optimizer states) -------------------


def encode_dynamic(y: np.ndarray, code: np.ndarray) -> np.ndarray:
    """bitsandbytes' 8-bit binary search over a sorted 256-entry code (DQ-2), vectorised.

    Seven halving steps from pivot 127 (go right when y > code[pivot]) bracket y between the last pivots taken on each
    side; then y is compared with the float32 midpoint (neighbour + code[pivot]) * 0.5 on its side: strictly past it
    goes to the neighbour, otherwise the pivot wins.  The bracket starts at -1 and +1; at the table's ends the
    neighbour is code[0] / code[255].  NaN (an all-zero block) lands on code 0.
    """
    code = np.asarray(code, np.float32)
    y = np.asarray(y, np.float32)
    pivot = np.full(y.shape, 127, np.int64)
    upper_pivot = np.full(y.shape, 255, np.int64)
    lower_pivot = np.zeros(y.shape, np.int64)
    lower = np.full(y.shape, -1.0, np.float32)
    upper = np.full(y.shape, 1.0, np.float32)
    val = code[pivot]
    step = 64
    while step > 0:
        right = y > val
        lower_pivot = np.where(right, pivot, lower_pivot)
        lower = np.where(right, val, lower)
        upper_pivot = np.where(right, upper_pivot, pivot)
        upper = np.where(right, upper, val)
        pivot = np.where(right, pivot + step, pivot - step)
        val = code[pivot]
        step >>= 1
    upper = np.where(upper_pivot == 255, code[255], upper)
    lower = np.where(lower_pivot == 0, code[0], lower)
    half = np.float32(0.5)
    above = y > val
    to_upper = above & (y > (upper + val) * half)
    to_lower = ~above & (y < (lower + val) * half)
    out = np.where(to_upper, upper_pivot, np.where(to_lower, lower_pivot, pivot))
    return out.astype(np.uint8)


def quantize_blockwise_8bit(x: np.ndarray, code: np.ndarray, blocksize: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """8-bit blockwise quantization with a dynamic map: (codes uint8[n], absmax float32[nblocks]) (DQ-2).

    Same absmax / reciprocal rule as the 4-bit path (BW-2, BW-3), then `encode_dynamic`.
    """
    x32 = np.asarray(x, np.float32).ravel()
    check_finite(x32)
    absmax = block_absmax(x32, blocksize)
    codes = encode_dynamic(scale_blocks(x32, absmax, blocksize), code)
    return codes[: x32.size], absmax


def dequantize_blockwise_8bit(
    codes: np.ndarray, absmax: np.ndarray, code: np.ndarray, blocksize: int = 256, n: int | None = None
) -> np.ndarray:
    """x_hat = code[q] * absmax[i // blocksize], float32 (DQ-3)."""
    codes = np.asarray(codes, np.uint8).ravel()
    n = codes.size if n is None else n
    scale = np.repeat(np.asarray(absmax, np.float32), blocksize)[:n]
    return ftz(np.asarray(code, np.float32)[codes[:n]] * scale)
