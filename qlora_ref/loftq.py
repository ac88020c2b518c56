"""LoftQ initialisation (Li et al., 2023): a 4-bit base and a LoRA start chosen together, so that the adapted layer
starts close to the 16-bit weight instead of to its quantization (specs/loftq.md, rules LOFTQ-1 .. LOFTQ-6).

Plain QLoRA starts at W_hat = dequantize(quantize(W)) with B = 0: the whole quantization error W - W_hat is the
starting error.  LoftQ alternates the two approximations of W (shapes as in specs/lora.md: W [out, in], A [r, in],
B [out, r], s = alpha / r or alpha / sqrt(r)):

    A, B = 0, 0
    for t = 1 .. T:                                                                   (LOFTQ-2)
        Q      = quantize_4bit(float32(W - s B A))     the base absorbs what the adapter does not
        R      = W - dequantize_4bit(Q)                (out, in) the residual, float64
        U S Vh = svd(R)                                the best rank-r approximation of R is U_r S_r Vh_r
        B      = U_r sqrt(S_r / s)                     (out, r)  PEFT's split (L = U sqrt(S), R = sqrt(S) Vh),
        A      = sqrt(S_r / s) Vh_r                    (r, in)   divided by sqrt(s) each: s B A = U_r S_r Vh_r
    return Q, A, B                                     (LOFTQ-3)

so that W ~ dequantize(Q) + s B A.  The starting error is

    e(W, Q, A, B, s) = ||W - (dequantize(Q) + s B A)||_F                              (LOFTQ-4)

For T = 1 it is at most plain NF4's ||W - W_hat||_F (LOFTQ-5): Q is plain NF4's and s B A the best rank-r fit of its
error.  For T > 1 each SVD step can only lower the error for its Q, but the quantization step is not a projection
(a block's absmax moves with its target), so e is not guaranteed monotone in T; specs/loftq.md says what is tested.
"""

from __future__ import annotations

import numpy as np

from .checks import check_finite
from .lora import lora_scaling
from .quantized import Quantized4bit, dequantize_4bit, quantize_4bit


def low_rank_split(R: np.ndarray, r: int, s: float) -> tuple[np.ndarray, np.ndarray]:
    """(A float32[r, in], B float32[out, r]) with s B A = U_r S_r Vh_r, the best rank-r approximation of R (LOFTQ-2).

    R float64 [out, in]; the SVD in float64 (numpy's LAPACK gesdd), singular values split evenly between the two
    factors as PEFT's ``_low_rank_decomposition`` does (L = U sqrt(S), R = sqrt(S) Vh), each further divided by
    sqrt(s) so that the layer's scaling s brings the product back: B = U_r sqrt(S_r / s), A = sqrt(S_r / s) Vh_r.
    """
    U, S, Vh = np.linalg.svd(R, full_matrices=False)  # (out, k), (k,), (k, in), k = min(out, in)
    root = np.sqrt(S[:r] / s)  # (r,)
    B = U[:, :r] * root[None, :]  # (out, r)
    A = root[:, None] * Vh[:r]  # (r, in)
    return A.astype(np.float32), B.astype(np.float32)


def loftq_init(
    W: np.ndarray,
    *,
    r: int,
    alpha: float,
    rslora: bool = False,
    iters: int = 1,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
) -> tuple[Quantized4bit, np.ndarray, np.ndarray]:
    """(Q, A, B): T = ``iters`` rounds of quantize(W - s B A) and a rank-r SVD of W - dequantize(Q) (LOFTQ-1 .. 3).

    W float32 [out, in], finite; r <= min(out, in); iters >= 1.  The target W - s B A is formed in float64 from the
    float32 A, B of the previous round (the ones that would be returned) and rounded once to float32 before it is
    quantized with ``quantize_4bit`` (quant_type, blocksize, double_quant as given; QLoRA's NF4 + DQ by default).
    """
    W = _check_weight(W)
    out_f, in_f = W.shape
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or not 1 <= r <= min(out_f, in_f):
        raise ValueError(f"LoftQ rank r must be an integer in [1, min(out, in)] = [1, {min(out_f, in_f)}], got {r!r}")
    if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)) or iters < 1:
        raise ValueError(f"LoftQ iters (T) must be a positive integer, got {iters!r}")
    s = lora_scaling(alpha, r, rslora=rslora)
    W64 = W.astype(np.float64)  # (out, in)
    A = np.zeros((r, in_f), np.float32)  # (r, in)
    B = np.zeros((out_f, r), np.float32)  # (out, r)
    for _ in range(int(iters)):
        target = (W64 - s * (B.astype(np.float64) @ A.astype(np.float64))).astype(np.float32)  # (out, in)
        Q = quantize_4bit(target, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
        R = W64 - dequantize_4bit(Q, "float32").astype(np.float64)  # (out, in)
        A, B = low_rank_split(R, int(r), s)
    return Q, A, B


def reconstruction_error(
    W: np.ndarray, Q: Quantized4bit, A: np.ndarray | None = None, B: np.ndarray | None = None, s: float = 1.0
) -> float:
    """||W - (dequantize(Q) + s B A)||_F in float64 (LOFTQ-4); A = B = None: plain quantization's ||W - W_hat||_F."""
    W = _check_weight(W)
    if not isinstance(Q, Quantized4bit) or tuple(Q.shape) != W.shape:
        raise ValueError(f"Q must be a Quantized4bit of W's shape {W.shape}, got {getattr(Q, 'shape', type(Q))}")
    E = W.astype(np.float64) - dequantize_4bit(Q, "float32").astype(np.float64)  # (out, in)
    if (A is None) != (B is None):
        raise ValueError("give both A and B (the adapter) or neither (plain quantization)")
    if A is not None:
        A, B = np.asarray(A, np.float64), np.asarray(B, np.float64)
        if A.ndim != 2 or A.shape[1] != W.shape[1] or B.shape != (W.shape[0], A.shape[0]):
            raise ValueError(
                f"with W {W.shape}, A must be [r, {W.shape[1]}] and B [{W.shape[0]}, r]; got {A.shape}, {B.shape}"
            )
        E -= float(s) * (B @ A)
    return float(np.sqrt(np.sum(E * E)))


def _check_weight(W) -> np.ndarray:
    W = np.asarray(W)
    if W.dtype != np.float32 or W.ndim != 2 or W.size == 0:
        raise ValueError(
            f"W must be a non-empty float32 [out, in] weight, got {W.dtype} of shape {W.shape}; "
            "widen it with .astype(np.float32)"
        )
    check_finite(W, "W")
    return W
