"""The decoder's non-GEMM work on the GPU, fused: RMSNorm, the SwiGLU gate, the rotary embedding and the LM's
cross-entropy (kernels/rmsnorm.cu, swiglu.cu, rope.cu, cross_entropy.cu).

    y, rstd = rmsnorm_forward(x, w, eps)          x (..., H), w (H,): one CTA per row; rstd (rows,) float32
    dx      = rmsnorm_backward(dy, x, w, rstd)    the input gradient (w frozen)
    h       = swiglu_forward(g, u)                silu(g) * u
    dg, du  = swiglu_backward(g, u, dh)
    qo, ko  = rope(q, k, cos, sin, qo, ko)        q (B, Hq, S, D), k (B, Hk, S, D), cos/sin (1 or B, S, D), written
                                                  into qo, ko; backward=True: the input gradients of the rotation
    rope_fits(q, k, cos, sin)                     whether rope takes these operands (else the caller's eager ops)
    loss, lse = cross_entropy_forward(z, t, ig)   z (N, V) logits, t (N,) int64 targets: per-row loss and logsumexp
    dz  = cross_entropy_backward(z, t, lse, g, ig)  g (N,) float32: dL/dloss per row

torch CUDA tensors in and out (float32, float16 or bfloat16, one dtype per call), on torch's current stream, outputs
allocated by torch: no host synchronisation, capturable in a CUDA graph.  The math and its rounding are in the .cu
files' headers; backends/torchlib/fuse.py puts them behind autograd for transformers' LLaMA-family modules.
"""

from __future__ import annotations

import functools

import numpy as np

from backends.bridge import torch_stream

from . import build, launch
from .launch import ceil_div

RMS_THREADS = 256  # kernels/rmsnorm.cu's RMS_THREADS
CE_THREADS = 256  # kernels/cross_entropy.cu's CE_THREADS


@functools.cache
def _kernel(filename: str, name: str, dtype):
    return build.kernel(filename, f"{name}<{build.ctype(dtype)}>").kernel


def _ptr(t) -> np.uint64:
    return np.uint64(t.data_ptr())


def _aligned(*ts) -> bool:
    """Every tensor's data 16-byte aligned: the v2 kernels' vector loads and stores."""
    return all(t.data_ptr() % 16 == 0 for t in ts)


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


def _swiglu(name: str, ts: tuple, n: int) -> None:
    """One swiglu.cu launch over n entries: v2 (16-byte vectors) when every operand is aligned, else v1."""
    vector = _aligned(*ts)
    grid, block = launch.grid_stride_config(ceil_div(n, 16 // ts[0].element_size()) if vector else n)
    args = (*(_ptr(t) for t in ts), np.int64(n))
    fn = _kernel("swiglu.cu", f"{name}_{'v2' if vector else 'v1'}", ts[0].dtype)
    fn(grid, block, args, 0, torch_stream(ts[0].device))


def swiglu_forward(g, u):
    """g, u contiguous (fuse.py's _SwiGLU makes them so)."""
    import torch

    h = torch.empty_like(g)
    if g.numel():
        _swiglu("swiglu_fwd", (g, u, h), g.numel())
    return h


def swiglu_backward(g, u, dh):
    import torch

    dh = dh.contiguous()
    dg, du = torch.empty_like(g), torch.empty_like(u)
    if g.numel():
        _swiglu("swiglu_bwd", (g, u, dh, dg, du), g.numel())
    return dg, du


# --- rope.cu ---------------------------------------------------------------------------------------------------------


def rope_fits(q, k, cos, sin) -> bool:
    """rope.cu's layout (its header): 4-D q, k and 3-D cos, sin of one kernel dtype on one device, the last dimension
    contiguous and split in halves of whole 16-byte vectors, every (b, head, s) row and pointer 16-byte aligned."""
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        return False
    B, _, S, D = q.shape
    if k.shape[0] != B or k.shape[2:] != (S, D) or cos.shape[0] not in (1, B) or cos.shape[1:] != (S, D):
        return False
    if any(t.dtype != q.dtype or t.device != q.device for t in (k, cos, sin)) or str(q.dtype) not in _ROPE_DTYPES:
        return False
    if sin.stride() != cos.stride() or not q.is_cuda:
        return False
    vec = 16 // q.element_size()
    if D % (2 * vec) or not _aligned(q, k, cos, sin):
        return False
    return all(t.stride(-1) == 1 and all(st % vec == 0 for st in t.stride()[:-1]) for t in (q, k, cos, sin))


_ROPE_DTYPES = ("torch.float32", "torch.float16", "torch.bfloat16")


def rope(q, k, cos, sin, qo, ko, *, backward: bool = False):
    """The rotation of q and k (or, backward=True, its input gradients from those of the outputs) written into qo,
    ko (their shapes, any strides that rope_fits takes); cos and sin share their strides.  Returns (qo, ko)."""
    B, Hq, S, D = q.shape
    Hk = k.shape[1]
    n = B * S * (Hq + Hk) * (D // 2) // (16 // q.element_size())
    if n:
        cos_b = cos.stride(0) if cos.shape[0] > 1 else 0
        strides = (*q.stride()[:3], *k.stride()[:3], *qo.stride()[:3], *ko.stride()[:3], cos_b, cos.stride(1))
        args = (_ptr(q), _ptr(k), _ptr(cos), _ptr(sin), _ptr(qo), _ptr(ko), np.int32(B), np.int32(S), np.int32(Hq),
                np.int32(Hk), np.int32(D), *(np.int64(x) for x in strides), np.int32(bool(backward)))  # fmt: skip
        grid, block = launch.grid_stride_config(n)  # n: (row, vector) items
        _kernel("rope.cu", "rope_v1", q.dtype)(grid, block, args, 0, torch_stream(q.device))
    return qo, ko


# --- cross_entropy.cu ------------------------------------------------------------------------------------------------


def cross_entropy_forward(z, target, ignore_index: int):
    """z (N, V) contiguous logits, target (N,) contiguous int64: (loss (N,), lse (N,)), both float32."""
    import torch

    N, V = z.shape
    loss = torch.empty(N, dtype=torch.float32, device=z.device)
    lse = torch.empty_like(loss)
    if N:
        args = (_ptr(z), _ptr(target), _ptr(loss), _ptr(lse), np.int32(V), np.int64(ignore_index))
        fn = _kernel("cross_entropy.cu", "cross_entropy_fwd_v1", z.dtype)
        fn((N,), (CE_THREADS,), args, 0, torch_stream(z.device))
    return loss, lse


def cross_entropy_backward(z, target, lse, g, ignore_index: int):
    """dz (N, V) in z's dtype from the forward's z, target, lse and g (N,) float32 contiguous, dL/dloss per row."""
    import torch

    N, V = z.shape
    dz = torch.empty_like(z)
    if N:
        args = (_ptr(z), _ptr(target), _ptr(lse), _ptr(g), _ptr(dz), np.int32(V), np.int64(ignore_index))
        fn = _kernel("cross_entropy.cu", "cross_entropy_bwd_v1", z.dtype)
        fn((N,), (CE_THREADS,), args, 0, torch_stream(z.device))
    return dz
