"""Double quantization of the absmax constants (specs/double_quant.md, rules DQ-1 .. DQ-4).

The first-level absmax (one float32 per block of 64 weights, 0.5 bit/param) is itself quantized:

    offset        = mean(absmax)                                   (DQ-1, float32; reduction order below)
    c2, absmax2   = quantize_blockwise_8bit(absmax - offset, dynamic_map(signed=True), 256)   (DQ-2)
    absmax_hat[i] = f32(f32(code2[c2[i]] * absmax2[i // 256]) + offset)                       (DQ-3, two roundings)

Subtracting the mean centres the (positive) absmax values so the signed 8-bit map uses both halves.  Cost per
parameter at blocksize 64: 8/64 + 32/(64*256) = 0.127 bit instead of 32/64 = 0.5 (DQ-4).

DQ-1's reduction order.  bitsandbytes takes ``absmax.mean()`` with torch on the GPU: a float32 sum in a fixed tree,
times ``1.0f / n``.  The spec fixes that tree for every n (`torch_block_sum`): W = min(last_pow2(n), 512) lanes; lane t
keeps four sequential accumulators (element t + m*W goes to accumulator m mod 4), combines them as ((a0+a1)+a2)+a3,
then lanes fold in halves: lane t adds lane t + h for h = W/2, W/4, ..., 1 (shared memory down to 32, then
warp shuffles).  This is torch's
single-block, non-vectorised CUDA reduction, which torch uses for n <= 128 blocks; there it reproduces every golden
vector.  For n > 128 torch switches to a vectorised, device-dependent (SM-count) split, so bitsandbytes' offset can
differ from the spec's in the last ulp there (specs/double_quant.md, DQ-1 note); the spec's order stays fixed.
"""

from __future__ import annotations

import numpy as np

from .blockwise import dequantize_blockwise_8bit, quantize_blockwise_8bit
from .codebooks import dynamic_map

NESTED_BLOCKSIZE = 256


def torch_block_sum(a: np.ndarray) -> np.float32:
    """float32 sum of a in the fixed tree order described above (DQ-1)."""
    a = np.asarray(a, np.float32).ravel()
    n = a.size
    lanes = min(1 << (n.bit_length() - 1), 512)  # W = last_pow2(n), at most 512 threads
    rounds = -(-n // (4 * lanes))
    padded = np.zeros(rounds * 4 * lanes, np.float32)  # adding +0.0 is exact: padding changes nothing
    padded[:n] = a
    chunks = padded.reshape(rounds, 4, lanes)  # element t + m*W sits at [m // 4, m % 4, t]
    acc = np.zeros((4, lanes), np.float32)
    for k in range(rounds):  # sequential per accumulator
        acc = acc + chunks[k]
    v = ((acc[0] + acc[1]) + acc[2]) + acc[3]  # (W,)
    offset = lanes // 2
    while offset >= 1:  # lane t adds lane t + offset: shared-memory folds, then warp shuffles
        v[:offset] = v[:offset] + v[offset : 2 * offset]
        offset //= 2
    return np.float32(v[0])


def absmax_mean(absmax: np.ndarray) -> np.float32:
    """offset = torch_block_sum(absmax) * (1.0f / n), float32 (DQ-1)."""
    return np.float32(torch_block_sum(absmax) * (np.float32(1.0) / np.float32(absmax.size)))


def double_quantize(absmax: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """absmax float32[nblocks] -> (absmax_q uint8[nblocks], nested_absmax float32[ceil(nblocks/256)], offset)."""
    absmax = np.asarray(absmax, np.float32)
    with np.errstate(over="ignore"):
        offset = absmax_mean(absmax)
    if not np.isfinite(offset):
        raise ValueError(
            "double quantization needs the float32 sum of the block absmax values, which overflows for this input "
            f"(max absmax {absmax.max():.3g}); quantize it with double_quant=False"
        )
    absmax_q, nested_absmax = quantize_blockwise_8bit(absmax - offset, dynamic_map(signed=True), NESTED_BLOCKSIZE)
    return absmax_q, nested_absmax, offset


def double_dequantize(absmax_q: np.ndarray, nested_absmax: np.ndarray, offset: np.float32) -> np.ndarray:
    """absmax_hat = f32(code2[q] * nested_absmax[i // 256]) + offset, float32 (DQ-3)."""
    centred = dequantize_blockwise_8bit(absmax_q, nested_absmax, dynamic_map(signed=True), NESTED_BLOCKSIZE)
    return (centred + np.float32(offset)).astype(np.float32)
