"""The counter-based dropout keep mask (LORA-8) on the GPU: one launch, its seed read from device memory.

    keep = dropout_keep_counter(shape, p, seed, salt)     seed: int64 CUDA tensor of one element; salt: a Python int
    xd   = dropout_apply_counter(x, p, seed, salt, dtype)  x.to(dtype) * noise, one launch, no mask in memory
    dropout_add_counter_(acc, d, p, seed, salt)           acc += d * noise (d's dtype), one launch, in place

noise = keep.to(dtype) * f32(1) / f32(1 - p), as the layer builds it from the mask (backends/torchlib/layer.py); the
two fused launches redraw the mask inside the kernel and give the bits of the unfused torch ops (kernels/dropout.cu).

The launch goes to torch's current stream and allocates its output with torch (inside a CUDA-graph capture: from
the graph's pool), so it can be captured; what changes between replays is the seed's value, written by the host
before each replay (``backends.torchlib.dropout.StepSeed``).
"""

from __future__ import annotations

import functools

import numpy as np

from backends.bridge import torch_stream
from qlora_ref.lora import keep_scale, keep_threshold

from . import build, launch


def dropout_keep_counter(shape, p: float, seed, salt: int):
    """torch.bool CUDA tensor of ``shape``, bit-equal to qlora_ref.lora.dropout_keep_counter(shape, p, seed, salt)."""
    import torch

    if not (isinstance(seed, torch.Tensor) and seed.is_cuda and seed.dtype == torch.int64 and seed.numel() == 1):
        raise ValueError(f"seed must be an int64 CUDA tensor of one element, got {_describe(seed)}")
    t = keep_threshold(p)
    keep = torch.empty(tuple(shape), dtype=torch.bool, device=seed.device)
    n = keep.numel()
    if n:
        fn = build.kernel("dropout.cu", "dropout_keep_counter_v1").kernel
        grid, block = launch.grid_stride_config(n)
        args = (np.uint64(seed.data_ptr()), np.uint64(int(salt) % 2**64), np.uint64(t), np.uint64(keep.data_ptr()),
                np.int64(n))  # fmt: skip
        fn(grid, block, args, 0, torch_stream(seed.device))
    return keep


@functools.cache
def noise_value(p: float, dtype) -> float:
    """The kept entries' noise value as ``dtype`` holds it: dtype(keep_scale(p)) (exact in float32)."""
    import torch

    return float(torch.tensor(keep_scale(p), dtype=torch.float32).to(dtype))


@functools.cache
def _fused(op: str, a, b):
    return build.kernel("dropout.cu", f"dropout_{op}_v1<{build.ctype(a)}, {build.ctype(b)}>").kernel


def dropout_apply_counter(x, p: float, seed, salt: int, dtype):
    """drop(x) = x.to(dtype) * noise (module docstring) as a new contiguous tensor of x's shape, the mask of
    (seed, salt) indexed by x's flat (row-major) position; bit-equal to the unfused ops."""
    import torch

    x = x.contiguous()
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    n = x.numel()
    if n:
        grid, block = launch.grid_stride_config(n)
        args = (np.uint64(seed.data_ptr()), np.uint64(int(salt) % 2**64), np.uint64(keep_threshold(p)),
                np.float32(noise_value(p, dtype)), np.uint64(x.data_ptr()), np.uint64(y.data_ptr()),
                np.int64(n))  # fmt: skip
        _fused("apply", x.dtype, dtype)(grid, block, args, 0, torch_stream(x.device))
    return y


def dropout_add_counter_(acc, d, p: float, seed, salt: int):
    """acc += d * noise in place (noise in d's dtype, the sum rounded to acc's), the mask of (seed, salt) indexed by
    the flat position; acc and d contiguous and of one shape.  Returns acc."""
    if acc.shape != d.shape or not (acc.is_contiguous() and d.is_contiguous()):
        raise ValueError(f"dropout_add_counter_ takes two contiguous tensors of one shape, got {tuple(acc.shape)} "
                         f"and {tuple(d.shape)}")  # fmt: skip
    n = acc.numel()
    if n:
        grid, block = launch.grid_stride_config(n)
        args = (np.uint64(seed.data_ptr()), np.uint64(int(salt) % 2**64), np.uint64(keep_threshold(p)),
                np.float32(noise_value(p, d.dtype)), np.uint64(acc.data_ptr()), np.uint64(d.data_ptr()),
                np.int64(n))  # fmt: skip
        _fused("add", acc.dtype, d.dtype)(grid, block, args, 0, torch_stream(acc.device))
    return acc


def _describe(x) -> str:
    import torch

    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of {x.numel()} elements on {x.device}"
    return type(x).__name__
