"""Double quantization of the absmax constants (specs/double_quant.md, rules DQ-1 .. DQ-5).

The first-level absmax (one float32 per block of 64 weights, 0.5 bit/param) is itself quantized:

    offset        = mean(absmax)                                   (DQ-1, float32; reduction order DQ-5)
    c2, absmax2   = quantize_blockwise_8bit(absmax - offset, dynamic_map(signed=True), 256)   (DQ-2)
    absmax_hat[i] = f32(f32(code2[c2[i]] * absmax2[i // 256]) + offset)                       (DQ-3, two roundings)

Subtracting the mean centres the (positive) absmax values so the signed 8-bit map uses both halves.  Cost per
parameter at blocksize 64: 8/64 + 32/(64*256) = 0.127 bit instead of 32/64 = 0.5 (DQ-4).

DQ-1 / DQ-5, the offset's arithmetic.  bitsandbytes takes ``absmax.mean()`` with torch on the GPU: torch's
``MeanOps`` on ``gpu_reduce_kernel`` (aten/src/ATen/native/cuda/Reduce.cuh, ReduceMomentKernel.cu):

    offset = f32( S * f32(1.0f / f32(n)) )        the factor is float32, computed on the host; project() multiplies

with S the float32 sum in the order fixed by torch's launch configuration for one contiguous, 16-byte aligned
float32 vector of n values (setReduceConfig), on a device with `sm_count` multiprocessors of `max_threads_per_sm`:

  plan   vec = 4 if n > 128 else 1                       float4 loads ("vectorize along input": dim0 > 128)
         W   = min(last_pow2(n // vec), 512)             lanes of the one row of threads (block = W x 1)
         p   = ceil(n / W)                               values per thread (torch counts elements, not vectors)
         C   = max(min(G, ceil(p / 16)), ceil(p / 256))  CTAs, if p >= 256 and G = sm_count * (max_threads_per_sm
                                                         // W) >= 1; else C = 1.  sm_count=None: C = 1 always.
  thread  g = c*W + t of the C*W threads (CTA c, lane t) keeps 4 accumulators a0..a3, each a float32 chain in order:
         vec = 4: vector v = g + k*C*W (k = 0, 1, ... while v < n // 4) adds element 4v + i to a_i;
                  then lanes t < n % 4 of CTA 0 add element 4(n // 4) + t to a0;
         vec = 1: element g + m*C*W adds to a_(m mod 4)           (only for n <= 128, where C = 1)
         lane value  x_g = ((a0 + a1) + a2) + a3
  CTA    P_c = fold(x_cW .. x_cW+W-1)      fold: lane t adds lane t + h for h = W/2, W/4, ..., 1 (shared memory down
                                           to the warp, then shuffle-down with decreasing offsets: one halving tree)
  global C = 1: S = P_0.  C > 1: the last CTA to finish combines the partials: lane t sums Q_t = P_t + P_(t+W) + ...
         (from 0.0, in order of the index), then S = fold(Q_0 .. Q_(W-1)).

Everything else torch's launch reads leaves the bits alone: 512 threads per block (MAX_NUM_THREADS), 4 accumulators
(vt0 = input_vec_size = 4), 16 and 256 values per thread (min/max_values_per_thread) are compile-time constants of
torch; the warp size only moves the boundary between the shared-memory and the shuffle part of one halving tree.
`vectorized_from` is the smallest vectorised n: 128 (``dim0 >= 128``), measured for torch 2.11 on an H200
(tests/peers/test_gpu_offset.py probes n = 128: one of two seeds differed with 129), 129 for older sources that read
``dim0 > 128``.  Zero padding stands in for missing loads: +0.0 added to a sum of
values >= 0 is exact.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .blockwise import dequantize_blockwise_8bit, quantize_blockwise_8bit
from .codebooks import dynamic_map

NESTED_BLOCKSIZE = 256
BLOCK_THREADS = 512  # torch's MAX_NUM_THREADS for float32 reductions (mnt_wrapper)
ACCUMULATORS = 4  # vt0 = input_vec_size = 4 for float32 mean
MIN_VALUES_PER_THREAD = 16  # setReduceConfig (CUDA)
MAX_VALUES_PER_THREAD = 256
VECTORIZED_FROM = 128  # torch 2.11 on an H200 vectorizes from n = 128 (measured: tests/peers/test_gpu_offset.py)
MAX_THREADS_PER_SM = 2048  # Hopper (H100, H200); also Ampere A100
MAX_32BIT_INDEXED = 2**29  # more float32 values than this and torch splits the input into 32-bit-indexable pieces


class ReducePlan(NamedTuple):
    """torch's launch for the float32 mean of n contiguous values (DQ-5): W lanes, vec-wide loads, C CTAs."""

    lanes: int  # W = blockDim.x
    vec: int  # 4: float4 loads, 1: scalar loads
    ctas: int  # C = gridDim.y (ctas_per_output); 1: one CTA, no global reduction


def _last_pow2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def torch_reduce_plan(
    n: int,
    *,
    sm_count: int | None = None,
    max_threads_per_sm: int = MAX_THREADS_PER_SM,
    vectorized_from: int = VECTORIZED_FROM,
) -> ReducePlan:
    """(W, vec, C) of DQ-5 for n values; sm_count=None gives C = 1 (the device-independent single-CTA order)."""
    vec = 4 if n >= vectorized_from else 1
    lanes = min(_last_pow2(n // vec), BLOCK_THREADS)
    per_thread = -(-n // lanes)  # values_per_thread(): ceil(num_inputs / step_input)
    ctas = 1
    grid_target = 0 if sm_count is None else sm_count * (max_threads_per_sm // lanes)
    if per_thread >= MAX_VALUES_PER_THREAD and grid_target >= 1:  # the one output row fits: grid().x = 1 <= target
        by_target = min(grid_target, -(-per_thread // MIN_VALUES_PER_THREAD))
        ctas = max(by_target, -(-per_thread // MAX_VALUES_PER_THREAD))
    return ReducePlan(lanes, vec, ctas)


def _fold(v: np.ndarray) -> np.ndarray:
    """v (rows, W): lane t adds lane t + h for h = W/2, ..., 1 in every row (block_x_reduce); returns (rows,)."""
    v = v.copy()
    h = v.shape[1] // 2
    while h >= 1:
        v[:, :h] = v[:, :h] + v[:, h : 2 * h]
        h //= 2
    return v[:, 0]


def _chains(chunks: np.ndarray) -> np.ndarray:
    """chunks (rounds, ...): every accumulator adds chunks[0], chunks[1], ... in order, from 0.0 (float32)."""
    acc = np.zeros(chunks.shape[1:], np.float32)
    for k in range(chunks.shape[0]):
        acc = acc + chunks[k]
    return acc


def torch_cuda_sum(a: np.ndarray, plan: ReducePlan) -> np.float32:
    """float32 sum of a (n >= 1 values, >= 0) in torch's order for `plan` (DQ-5)."""
    a = np.asarray(a, np.float32).ravel()
    n = a.size
    lanes, vec, ctas = plan
    threads = lanes * ctas  # thread g = c * W + t
    if vec == 4:
        nvec = n // 4
        rounds = -(-nvec // threads)
        units = np.zeros((rounds * threads, 4), np.float32)
        units[:nvec] = a[: 4 * nvec].reshape(nvec, 4)  # vector g + k*C*W holds elements 4(g + kCW) + i
        acc = _chains(units.reshape(rounds, threads, 4))  # (C*W, 4)
        leftover = a[4 * nvec :]  # n % 4 tail: CTA 0, lanes 0 .. n%4 - 1, accumulator 0, last
        acc[: leftover.size, 0] = acc[: leftover.size, 0] + leftover
    else:
        rounds = -(-n // (ACCUMULATORS * threads))
        padded = np.zeros(rounds * ACCUMULATORS * threads, np.float32)
        padded[:n] = a  # element g + m*C*W at [m // 4, m % 4, g]
        acc = _chains(padded.reshape(rounds, ACCUMULATORS, threads)).T  # (C*W, 4)
    lane = ((acc[:, 0] + acc[:, 1]) + acc[:, 2]) + acc[:, 3]  # (C*W,)
    partials = _fold(lane.reshape(ctas, lanes))  # (C,) one per CTA
    if ctas == 1:
        return np.float32(partials[0])
    staged = np.zeros(-(-ctas // lanes) * lanes, np.float32)
    staged[:ctas] = partials  # lane t of the last CTA reads partials t, t + W, ...
    return np.float32(_fold(_chains(staged.reshape(-1, lanes))[None, :])[0])


def torch_block_sum(a: np.ndarray) -> np.float32:
    """float32 sum of a in torch's single-CTA order (DQ-5 with C = 1: sm_count=None)."""
    a = np.asarray(a, np.float32).ravel()
    return torch_cuda_sum(a, torch_reduce_plan(a.size))


def absmax_mean(
    absmax: np.ndarray,
    *,
    sm_count: int | None = None,
    max_threads_per_sm: int = MAX_THREADS_PER_SM,
    vectorized_from: int = VECTORIZED_FROM,
) -> np.float32:
    """offset = f32(S * f32(1.0f / n)) with S = torch_cuda_sum in torch's order on that device (DQ-1, DQ-5).

    sm_count=None keeps the single-CTA order (C = 1) at every n: torch's bits below the split
    (n < 255 * 512 + 1 values) on every device, a fixed device-independent order above it.
    """
    absmax = np.asarray(absmax, np.float32).ravel()
    n = absmax.size
    plan = checked_reduce_plan(
        n, sm_count=sm_count, max_threads_per_sm=max_threads_per_sm, vectorized_from=vectorized_from
    )
    return np.float32(torch_cuda_sum(absmax, plan) * (np.float32(1.0) / np.float32(n)))


def checked_reduce_plan(n: int, *, sm_count: int | None, max_threads_per_sm: int, vectorized_from: int) -> ReducePlan:
    """torch_reduce_plan after the boundary checks absmax_mean (and the CuPy backend's) make, each one ValueError."""
    if n == 0:
        raise ValueError("absmax_mean needs at least one absmax value")
    for name, value in (("sm_count", sm_count), ("max_threads_per_sm", max_threads_per_sm)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1):
            raise ValueError(f"{name} must be a positive int (the device's cudaDeviceProp value), got {value!r}")
    if vectorized_from not in (128, 129):
        raise ValueError(f"vectorized_from must be 129 (dim0 > 128) or 128 (dim0 >= 128), got {vectorized_from!r}")
    if sm_count is not None and n > MAX_32BIT_INDEXED:
        raise ValueError(f"{n} values: torch splits more than 2**29 float32 values into pieces, an order not emulated")
    return torch_reduce_plan(
        n,
        sm_count=None if sm_count is None else int(sm_count),
        max_threads_per_sm=int(max_threads_per_sm),
        vectorized_from=vectorized_from,
    )


def double_quantize(absmax: np.ndarray, *, sm_count: int | None = None) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """absmax float32[nblocks] -> (absmax_q uint8[nblocks], nested_absmax float32[ceil(nblocks/256)], offset).

    sm_count: the offset in torch's order on a GPU with that many multiprocessors (DQ-5); None: one CTA.
    """
    absmax = np.asarray(absmax, np.float32)
    with np.errstate(over="ignore"):
        offset = absmax_mean(absmax, sm_count=sm_count)
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
