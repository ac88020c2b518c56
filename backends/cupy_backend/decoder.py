"""The decoder block's non-GEMM work on the GPU, fused: RMSNorm and the SwiGLU gate (kernels/rmsnorm.cu, swiglu.cu).

    y, rstd = rmsnorm_forward(x, w, eps)          x (..., H), w (H,): one CTA per row; rstd (rows,) float32
    dx      = rmsnorm_backward(dy, x, w, rstd)    the input gradient (w frozen)
    h       = swiglu_forward(g, u)                silu(g) * u
    dg, du  = swiglu_backward(g, u, dh)

torch CUDA tensors in and out (float32, float16 or bfloat16, one dtype per call), on torch's current stream, outputs
allocated by torch: no host synchronisation, capturable in a CUDA graph.  The math and its rounding are in the .cu
files' headers; backends/torchlib/fuse.py puts them behind autograd for transformers' LLaMA-family modules.
"""

from __future__ import annotations

import functools

import numpy as np

from backends.bridge import torch_stream

from . import build, launch

RMS_THREADS = 256  # kernels/rmsnorm.cu's RMS_THREADS


@functools.cache
def _kernel(filename: str, name: str, dtype):
    import torch

    ctype = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}[dtype]
    return build.kernel(filename, f"{name}<{ctype}>").kernel


def _ptr(t) -> np.uint64:
    return np.uint64(t.data_ptr())


def rmsnorm_forward(x, w, eps: float):
    import torch

    H = x.shape[-1]
    x = x.contiguous()
    y = torch.empty_like(x)
    rows = x.numel() // H if H else 0
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        args = (_ptr(x), _ptr(w), _ptr(y), _ptr(rstd), np.int32(H), np.float32(eps))
        _kernel("rmsnorm.cu", "rmsnorm_fwd_v1", x.dtype)((rows,), (RMS_THREADS,), args, 0, torch_stream(x.device))
    return y, rstd


def rmsnorm_backward(dy, x, w, rstd):
    import torch

    H = x.shape[-1]
    dy = dy.contiguous()
    dx = torch.empty_like(x)
    rows = rstd.numel()
    if rows:
        args = (_ptr(dy), _ptr(x), _ptr(w), _ptr(rstd), _ptr(dx), np.int32(H))
        _kernel("rmsnorm.cu", "rmsnorm_bwd_v1", x.dtype)((rows,), (RMS_THREADS,), args, 0, torch_stream(x.device))
    return dx


def swiglu_forward(g, u):
    import torch

    g, u = g.contiguous(), u.contiguous()
    h = torch.empty_like(g)
    n = g.numel()
    if n:
        grid, block = launch.dropout_keep_counter_v1_config(n)  # one thread per entry, grid-stride
        args = (_ptr(g), _ptr(u), _ptr(h), np.int64(n))
        _kernel("swiglu.cu", "swiglu_fwd_v1", g.dtype)(grid, block, args, 0, torch_stream(g.device))
    return h


def swiglu_backward(g, u, dh):
    import torch

    dh = dh.contiguous()
    dg, du = torch.empty_like(g), torch.empty_like(u)
    n = g.numel()
    if n:
        grid, block = launch.dropout_keep_counter_v1_config(n)
        args = (_ptr(g), _ptr(u), _ptr(dh), _ptr(dg), _ptr(du), np.int64(n))
        _kernel("swiglu.cu", "swiglu_bwd_v1", g.dtype)(grid, block, args, 0, torch_stream(g.device))
    return dg, du
