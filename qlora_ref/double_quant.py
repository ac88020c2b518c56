"""Double quantization of the absmax constants (specs/double_quant.md, rules DQ-1 .. DQ-4).

The first-level absmax (one float32 per block of 64 weights, 0.5 bit/param) is itself quantized:

    offset        = mean(absmax)                                   (DQ-1, float32; reduction order below)
    c2, absmax2   = quantize_blockwise_8bit(absmax - offset, dynamic_map(signed=True), 256)   (DQ-2)
    absmax_hat[i] = f32(f32(code2[c2[i]] * absmax2[i // 256]) + offset)                       (DQ-3, two roundings)

Subtracting the mean centres the (positive) absmax values so the signed 8-bit map uses both halves.  Cost per
parameter at blocksize 64: 8/64 + 32/(64*256) = 0.127 bit instead of 32/64 = 0.5 (DQ-4).

DQ-1's reduction order.  bitsandbytes takes ``absmax.mean()`` with torch on the GPU: a float32 sum in a fixed tree,
times ``1.0f / n``.  The spec fixes that tree (`torch_block_sum`), which is torch's single-block CUDA reduction:

  n <= 128:  W = last_pow2(n) lanes; element t + m*W goes to lane t's accumulator m mod 4 (sequentially).
  n > 128:   vectorised by 4: W = min(last_pow2(n // 4), 512) lanes; element 4*(t + k*W) + i goes to lane t's
             accumulator i; the n mod 4 leftovers go to accumulator 0 of lanes 0, 1, 2 after the loop.
  then each lane combines ((a0 + a1) + a2) + a3, and lanes fold in halves: lane t adds lane t + h, h = W/2, ..., 1.

It reproduces every golden offset and torch.mean on an H100 for 81 lengths n = 1..262144
(specs/golden/torch_mean_h100.npz keeps those up to 20,000).  From 131,072 values
(256 per thread) torch splits the sum over several CTAs, so bitsandbytes' offset can then differ from the spec's in
the last ulp (TORCH-SPLIT in specs/double_quant.md); the spec keeps this one device-independent order.
"""

from __future__ import annotations

import numpy as np

from .blockwise import dequantize_blockwise_8bit, quantize_blockwise_8bit
from .codebooks import dynamic_map

NESTED_BLOCKSIZE = 256


def _fold(v: np.ndarray) -> np.float32:
    """Lanes fold in halves: lane t adds lane t + h for h = W/2, ..., 1 (shared memory, then warp shuffles)."""
    offset = v.size // 2
    while offset >= 1:
        v[:offset] = v[:offset] + v[offset : 2 * offset]
        offset //= 2
    return np.float32(v[0])


def _lane_sums(chunks: np.ndarray) -> np.ndarray:
    """chunks (rounds, 4, W): accumulator i of lane t adds chunks[k, i, t] for k = 0, 1, ... in order."""
    acc = np.zeros(chunks.shape[1:], np.float32)
    for k in range(chunks.shape[0]):
        acc = acc + chunks[k]
    return acc


def torch_block_sum(a: np.ndarray) -> np.float32:
    """float32 sum of a (n >= 1 values, >= 0) in the fixed tree order described above (DQ-1).

    Zero padding stands in for lanes with nothing to add: adding +0.0 to a sum of non-negative values is exact.
    """
    a = np.asarray(a, np.float32).ravel()
    n = a.size
    if n <= 128:
        lanes = 1 << (n.bit_length() - 1)
        rounds = -(-n // (4 * lanes))
        padded = np.zeros(rounds * 4 * lanes, np.float32)
        padded[:n] = a
        acc = _lane_sums(padded.reshape(rounds, 4, lanes))  # element t + m*W at [m // 4, m % 4, t]
    else:
        nvec = n // 4
        lanes = min(1 << (nvec.bit_length() - 1), 512)
        rounds = -(-nvec // lanes)
        vectors = np.zeros((rounds * lanes, 4), np.float32)
        vectors[:nvec] = a[: 4 * nvec].reshape(nvec, 4)  # vector t + k*W holds elements 4(t + kW) + i
        acc = _lane_sums(vectors.reshape(rounds, lanes, 4).transpose(0, 2, 1))
        leftover = a[4 * nvec :]
        acc[0, : leftover.size] = acc[0, : leftover.size] + leftover
    return _fold(((acc[0] + acc[1]) + acc[2]) + acc[3])


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
