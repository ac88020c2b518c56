"""Double quantization's offset on the GPU in torch's CUDA reduction order (specs/double_quant.md DQ-1, DQ-5).

    offset = f32( S * f32(1.0f / n) ),  S = the float32 sum of absmax in the order of torch's launch for this device

The plan (W lanes, vec-wide loads, C CTAs) is the spec's: `qlora_ref.double_quant.torch_reduce_plan`, from the
device's multiprocessor count and threads per multiprocessor.  Two launches of kernels/absmax_mean.cu: C CTAs of W
threads write one partial each, then one CTA of W threads combines them and writes the float32 offset; no host sync.

Compiled and cached through build.py's registry like every kernel file.
"""

from __future__ import annotations

import functools

import cupy as cp
import numpy as np

from qlora_ref.double_quant import MAX_THREADS_PER_SM, VECTORIZED_FROM, checked_reduce_plan

from . import build

KERNEL_FILE = "absmax_mean.cu"


@functools.cache
def _device_values(device_id: int) -> dict[str, int]:
    attrs = cp.cuda.Device(device_id).attributes
    return {
        "sm_count": int(attrs["MultiProcessorCount"]),
        "max_threads_per_sm": int(attrs["MaxThreadsPerMultiProcessor"]),
    }


def current_device() -> dict[str, int]:
    """The launch inputs torch reads from the current device: {"sm_count": ..., "max_threads_per_sm": ...}."""
    return dict(_device_values(cp.cuda.Device().id))


def absmax_mean_partials_config(lanes: int, ctas: int) -> tuple[tuple[int], tuple[int]]:
    """C CTAs of W threads: torch's grid (1, C) and block (W, 1), flattened to x."""
    return (ctas,), (lanes,)


def absmax_mean_combine_config(lanes: int) -> tuple[tuple[int], tuple[int]]:
    """One CTA of W threads (torch's last CTA)."""
    return (1,), (lanes,)


def absmax_mean(
    absmax: cp.ndarray,
    sm_count: int,
    *,
    max_threads_per_sm: int = MAX_THREADS_PER_SM,
    vectorized_from: int = VECTORIZED_FROM,
    out: cp.ndarray | None = None,
) -> cp.ndarray:
    """qlora_ref.double_quant.absmax_mean(absmax, sm_count=...) on the GPU: a 0-d float32 array (or `out`, a
    1-element float32 array the offset is written to, e.g. a view into a status buffer)."""
    if not isinstance(absmax, cp.ndarray) or absmax.dtype != cp.float32 or absmax.ndim != 1:
        raise TypeError(f"absmax must be a 1-d float32 CuPy array, got {type(absmax).__name__} {absmax.dtype}")
    if not absmax.flags.c_contiguous or absmax.data.ptr % 16:
        raise ValueError("absmax must be contiguous and 16-byte aligned (torch sums an unaligned head first); copy it")
    if sm_count is None:
        raise ValueError("sm_count is required on the GPU: pass **offset.current_device()")
    n = absmax.size
    lanes, vec, ctas = checked_reduce_plan(
        n, sm_count=sm_count, max_threads_per_sm=max_threads_per_sm, vectorized_from=vectorized_from
    )
    if out is None:
        out = cp.empty((), cp.float32)
    elif not isinstance(out, cp.ndarray) or out.dtype != cp.float32 or out.size != 1:
        raise ValueError(f"out must be a 1-element float32 CuPy array, got {type(out).__name__} {out.dtype}")
    partial = cp.empty(ctas, cp.float32)
    build.kernel(KERNEL_FILE, "absmax_mean_partials_v1")(
        *absmax_mean_partials_config(lanes, ctas), (absmax, np.int64(n), np.int32(vec), partial)
    )
    build.kernel(KERNEL_FILE, "absmax_mean_combine_v1")(
        *absmax_mean_combine_config(lanes), (partial, np.int32(ctas), np.int64(n), out)
    )
    return out
