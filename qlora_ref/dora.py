"""DoRA on a frozen 4-bit base: weight-decomposed LoRA (Liu et al., 2024) in PEFT's convention (specs/dora.md,
rules DORA-1 .. DORA-7).

Shapes are LoRA's (specs/lora.md): W_hat = dequantize_4bit(q) is [out, in], A [r, in], B [out, r], x [N, in].  The
adapted weight is a magnitude times a direction, the direction normalised row by row (one norm per output feature,
taken over the input dimension: PEFT's ``torch.linalg.norm(W + s B A, dim=1)``, the paper's "column norm" of W^T):

    V   = W_hat + s * B A                           (out, in)    the LoRA-adapted weight       (DORA-1)
    n_o = ||V[o, :]||_2                             (out,)       computed block-row by block-row from q (DORA-2)
    m   = n at initialisation                       (out,)       trainable; PEFT's lora_magnitude_vector (DORA-3)
    g   = m / n                                     (out,)       n is a constant for autograd (DORA-6)
    W'  = g[:, None] * V                            (out, in)    the weight DoRA computes with

Forward (DORA-4), with LoRA's dropout xd = x * keep / (1 - p) on the adapter's input (LORA-3):

    z = xd W_hat^T + s (xd A^T) B^T                 (N, out)     the direction's output on the dropped input
    y = (x - xd) W_hat^T + g * z                    (N, out)     p = 0 (or eval): y = x W'^T

which is PEFT's ``result + (g - 1) * (xd W^T) + g * s * lora(xd)``: the base term sees x, the DoRA correction the
dropped input.  Backward (DORA-5), dy = dL/dy (N, out), u = xd A^T, gy = g * dy:

    dm = sum_N (dy * z) / n                         (out,)
    dB = s gy^T u                                   (out, r)
    du = s gy B                                     (N, r)
    dA = du^T xd                                    (r, in)
    dx = dy W_hat + ((gy - dy) W_hat + du A) * mask (N, in)      p = 0: dx = gy W_hat + du A

Merging (DORA-7): W' = round_T(g[:, None] * (W_hat + s B A)), formed in float64, one rounding.
"""

from __future__ import annotations

import numpy as np

from .blockwise import decode_4bit
from .lora import _expect_f32, _prepare, lora_scaling
from .packing import unpack_4bit
from .quantized import Quantized4bit

DEFAULT_BLOCK_ELEMENTS = 1 << 16  # rows per block-row step = max(1, this // in): 256 KiB of float32 at a time


# --- the 4-bit base, a block of rows at a time ------------------------------------------------------------------


def dequantize_rows(q: Quantized4bit, o0: int, o1: int) -> np.ndarray:
    """W_hat[o0:o1, :] in float32, bit for bit ``dequantize_4bit(q, "float32")[o0:o1]`` (BW-7), from the 4-bit state.

    Row o holds flat elements [o * in, (o + 1) * in); the quantization blocks covering [o0 * in, o1 * in) are
    decoded (their codes unpacked from packed[a0 / 2 :], a0 the first block's start, always even) and the rows cut
    out.  Nothing outside those blocks is touched; the absmax of every block is decoded once (1/blocksize of W).
    """
    if not isinstance(q, Quantized4bit) or len(q.shape) != 2:
        raise ValueError(f"need a 2-D (out, in) Quantized4bit, got {type(q).__name__} {getattr(q, 'shape', '?')}")
    out_f, in_f = q.shape
    if not 0 <= o0 < o1 <= out_f:
        raise ValueError(f"row range [{o0}, {o1}) is not inside [0, {out_f})")
    a, b = o0 * in_f, o1 * in_f  # flat element range
    blk0, blk1 = a // q.blocksize, -(-b // q.blocksize)  # blocks covering it
    a0 = blk0 * q.blocksize  # even: every block size is
    n_sub = min(blk1 * q.blocksize, q.n) - a0
    codes = unpack_4bit(q.packed[a0 // 2 : a0 // 2 + (n_sub + 1) // 2], n_sub)  # (n_sub,)
    x = decode_4bit(codes, q.absmax_f32()[blk0:blk1], q.quant_type, q.blocksize)  # (n_sub,) float32
    return x[a - a0 : b - a0].reshape(o1 - o0, in_f)  # (o1 - o0, in)


def row_blocks(out_f: int, in_f: int, block_rows: int | None):
    """(o0, o1) pairs covering [0, out_f): block_rows rows each (default: DEFAULT_BLOCK_ELEMENTS // in, at least 1)."""
    if block_rows is None:
        block_rows = max(1, DEFAULT_BLOCK_ELEMENTS // in_f)
    if isinstance(block_rows, bool) or not isinstance(block_rows, (int, np.integer)) or block_rows < 1:
        raise ValueError(f"block_rows must be a positive integer (rows per step), got {block_rows!r}")
    return [(o0, min(o0 + int(block_rows), out_f)) for o0 in range(0, out_f, int(block_rows))]


def low_rank_rows(B_rows: np.ndarray, A: np.ndarray) -> np.ndarray:
    """(B A)[rows] as sum_k B[:, k] A[k, :] in the fixed order k = 0 .. r-1 (elementwise ops, no BLAS), so a row's
    value does not depend on how many rows are computed at once (DORA-2's block-size independence)."""
    BA = np.zeros((B_rows.shape[0], A.shape[1]), np.result_type(B_rows, A))  # (rows, in)
    for k in range(A.shape[0]):
        BA += B_rows[:, k, None] * A[None, k, :]
    return BA


# --- the norm and the magnitude -----------------------------------------------------------------------------------


def dora_weight_norm(
    q: Quantized4bit,
    A: np.ndarray,
    B: np.ndarray,
    *,
    alpha: float,
    rslora: bool = False,
    dtype=np.float64,
    block_rows: int | None = None,
) -> np.ndarray:
    """n_o = ||W_hat[o, :] + s (B A)[o, :]||_2 for every output row o (DORA-1, DORA-2), shape (out,), in ``dtype``.

    One block of rows at a time: W_hat[o0:o1] from the 4-bit state (``dequantize_rows``, exact), plus s * (B A)[o0:o1]
    (``low_rank_rows``), squared and summed along the row; never the whole dequantized weight.  The arithmetic is in
    ``dtype`` (float64 by default, float32 allowed), and the result is the same bits for every ``block_rows``.
    """
    A, B, dt = _check_adapter(q, A, B, dtype)
    s = dt.type(lora_scaling(alpha, A.shape[0], rslora=rslora))
    n = np.empty(q.shape[0], dt)  # (out,)
    for o0, o1 in row_blocks(*q.shape, block_rows):
        n[o0:o1] = _row_block(q, o0, o1, A.astype(dt), B.astype(dt), s)[1]  # (rows,)
    return n


def _row_block(q, o0, o1, A, B, s):
    """(W_hat[o0:o1], n[o0:o1]) in A's dtype: n_o = sqrt(sum_j V_oj^2), V = W_hat + s (B A) on those rows (DORA-2)."""
    W = dequantize_rows(q, o0, o1).astype(A.dtype)  # (rows, in), exact
    V = W + s * low_rank_rows(B[o0:o1], A)  # (rows, in)
    return W, np.sqrt(np.sum(V * V, axis=1))  # (rows,)


def dora_init(
    q: Quantized4bit, A: np.ndarray, B: np.ndarray, *, alpha: float, rslora: bool = False, block_rows=None
) -> np.ndarray:
    """m = float32(||W_hat + s B A||_row): PEFT's ``lora_magnitude_vector`` at creation (DORA-3), shape (out,).

    With PEFT's default B = 0 this is ||W_hat||_row, so the DoRA layer starts equal to the base layer (g = 1); after
    LoftQ (B != 0) it is the norm of the LoftQ weight, again g = 1.
    """
    return dora_weight_norm(q, A, B, alpha=alpha, rslora=rslora, block_rows=block_rows).astype(np.float32)


# --- forward and backward -----------------------------------------------------------------------------------------


def dora_forward(
    x: np.ndarray,
    q: Quantized4bit,
    A: np.ndarray,
    B: np.ndarray,
    m: np.ndarray,
    *,
    alpha: float,
    rslora: bool = False,
    p: float = 0.0,
    keep: np.ndarray | None = None,
    block_rows: int | None = None,
) -> np.ndarray:
    """y = (x - xd) W_hat^T + g * (xd W_hat^T + s xd A^T B^T), g = m / n (DORA-4); arithmetic in x's dtype.

    x float32/float64 [..., in]; A, B, m in x's dtype; the norm n from the 4-bit state in x's dtype (DORA-2), the
    output block of columns y[:, o0:o1] formed from the same block of rows W_hat[o0:o1], so no step holds more than
    ``block_rows`` rows of the dequantized weight.  Dropout as in LORA-3 (keep required iff p > 0).
    """
    x2, xd, A, B, m, s, _ = _forward_inputs(x, q, A, B, m, alpha, rslora, p, keep)
    u = xd @ A.T  # (N, r)
    y = np.empty((x2.shape[0], q.shape[0]), x2.dtype)  # (N, out)
    for o0, o1 in row_blocks(*q.shape, block_rows):
        W, n = _row_block(q, o0, o1, A, B, s)  # (rows, in), (rows,)
        z = xd @ W.T + s * (u @ B[o0:o1].T)  # (N, rows)
        y[:, o0:o1] = (x2 - xd) @ W.T + (m[o0:o1] / n) * z  # (N, rows)
    return y.reshape(*np.shape(x)[:-1], q.shape[0])  # (..., out)


def dora_backward(
    dy: np.ndarray,
    x: np.ndarray,
    q: Quantized4bit,
    A: np.ndarray,
    B: np.ndarray,
    m: np.ndarray,
    *,
    alpha: float,
    rslora: bool = False,
    p: float = 0.0,
    keep: np.ndarray | None = None,
    block_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(dx, dA, dB, dm) for dy = dL/dy (DORA-5), with n a constant (DORA-6, PEFT's ``weight_norm.detach()``).

    dm = sum_N (dy * z) / n,  gy = g * dy,  dB = s gy^T u,  dA = (s gy B)^T xd,
    dx = dy W_hat + ((gy - dy) W_hat + s gy B A) * mask.   Block-row by block-row, like the forward.
    """
    x2, xd, A, B, m, s, mask = _forward_inputs(x, q, A, B, m, alpha, rslora, p, keep)
    dy = np.asarray(dy)
    if dy.dtype != x2.dtype or dy.shape != (*np.shape(x)[:-1], q.shape[0]):
        raise ValueError(
            f"dy must have x's dtype {x2.dtype} and shape {(*np.shape(x)[:-1], q.shape[0])}, got {dy.dtype} {dy.shape}"
        )
    dy2 = dy.reshape(-1, q.shape[0])  # (N, out)
    u = xd @ A.T  # (N, r)
    dm = np.empty_like(m)  # (out,)
    gy = np.empty_like(dy2)  # (N, out)
    dx_base = np.zeros_like(x2)  # (N, in): dy W_hat
    dxd = np.zeros_like(x2)  # (N, in): (gy - dy) W_hat, the part that goes through the mask
    for o0, o1 in row_blocks(*q.shape, block_rows):
        W, n = _row_block(q, o0, o1, A, B, s)  # (rows, in), (rows,)
        z = xd @ W.T + s * (u @ B[o0:o1].T)  # (N, rows)
        dm[o0:o1] = np.sum(dy2[:, o0:o1] * z, axis=0) / n  # (rows,)
        gy[:, o0:o1] = (m[o0:o1] / n) * dy2[:, o0:o1]  # (N, rows)
        dx_base += dy2[:, o0:o1] @ W  # (N, in)
        dxd += (gy[:, o0:o1] - dy2[:, o0:o1]) @ W  # (N, in)
    dB = s * (gy.T @ u)  # (out, r)
    du = s * (gy @ B)  # (N, r)
    dA = du.T @ xd  # (r, in)
    dxd += du @ A  # (N, in)
    dx = dx_base + (dxd if mask is None else dxd * mask)  # (N, in)
    return dx.reshape(np.shape(x)), dA, dB, dm


# --- merge ----------------------------------------------------------------------------------------------------------


def dora_merge(q: Quantized4bit, A: np.ndarray, B: np.ndarray, m: np.ndarray, *, alpha: float, rslora=False):
    """W' = float32(g[:, None] * (W_hat + s B A)), g = m / n, all in float64, one rounding (DORA-7); (out, in)."""
    A, B = _expect_f32(A, "A"), _expect_f32(B, "B")
    m = _expect_f32(m, "m")
    _check_adapter(q, A, B, np.float64)
    s = lora_scaling(alpha, A.shape[0], rslora=rslora)
    V = dequantize_rows(q, 0, q.shape[0]).astype(np.float64) + s * (B.astype(np.float64) @ A.astype(np.float64))
    n = np.sqrt(np.sum(V * V, axis=1))  # (out,)
    return ((m.astype(np.float64) / n)[:, None] * V).astype(np.float32)  # (out, in)


# --- boundary checks ----------------------------------------------------------------------------------------------


def _check_adapter(q, A, B, dtype):
    if not isinstance(q, Quantized4bit) or len(q.shape) != 2:
        raise ValueError(f"q must be a 2-D (out, in) Quantized4bit, got {type(q).__name__} {getattr(q, 'shape', '?')}")
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    A, B = np.asarray(A), np.asarray(B)
    out_f, in_f = q.shape
    if A.ndim != 2 or B.ndim != 2 or A.shape[1] != in_f or B.shape != (out_f, A.shape[0]):
        raise ValueError(
            f"with q of shape (out, in) = {q.shape}, A must be [r, {in_f}] and B [{out_f}, r]; "
            f"got A {A.shape}, B {B.shape}"
        )
    return A, B, dt


def _forward_inputs(x, q, A, B, m, alpha, rslora, p, keep):
    """LORA-7's checks (x, A, B against a W of q's shape) plus m (out,) in x's dtype and a positive norm."""
    _check_adapter(q, A, B, np.float64)
    x = np.asarray(x)
    stand_in = np.broadcast_to(np.zeros((), x.dtype if x.dtype in (np.float32, np.float64) else np.float32), q.shape)
    x, _, A, B, mask, s = _prepare(x, stand_in, A, B, alpha=alpha, rslora=rslora, p=p, keep=keep)
    m = np.asarray(m)
    if m.dtype != x.dtype or m.shape != (q.shape[0],):
        raise ValueError(f"m (the magnitude) must be {x.dtype} of shape ({q.shape[0]},), got {m.dtype} {m.shape}")
    x2 = x.reshape(-1, q.shape[1])  # (N, in)
    mask2 = None if mask is None else mask.reshape(x2.shape)  # (N, in)
    xd = x2 if mask2 is None else x2 * mask2  # (N, in)
    return x2, xd, A, B, m, s, mask2
