"""The 4-bit matrix-vector product of decoding: y = x · dequantize(q)^T, 1..16 tokens (specs/matvec.md, MV-1 .. MV-9).

What a GPU decode kernel computes, with every rounding written down, so that a kernel can be checked against it bit
for bit (same order) or within a derived bound (any order).  q is a 2-D `Quantized4bit` [out, in] (NF4 or FP4, plain
or double-quantized absmax, any block size); x is [T, in], T = 1..16, float32 or bfloat16.

    w[o, j]   = BW-7's float32 decode: ftz(table[code] * absmax_hat[b]), absmax_hat decoded first (DQ-3)    (MV-2)
    p[t,o,j]  = f32(x[t, j] * w[o, j])                           one float32 multiply, no FMA                (MV-3)
    row o is cut into segments by the flat block boundaries: element j of row o is flat index o*in + j, in block
    (o*in + j) // blocksize; a segment is the run of a row's elements in one block (a whole block when
    in % blocksize == 0; the first and last segments of a row may be partial otherwise)
    s[t,o,c]  = ((0 + p_first) + p_next) + ...                   float32, in j order, within segment c       (MV-4)
    y32[t,o]  = ((0 + s[.., 0]) + s[.., 1]) + ...                float32, in segment order
    y[t,o]    = round_T(y32)                                     once, T = bfloat16 (RNE) or float32         (MV-5)

LoRA (MV-6, unmerged): u = x A^T (float32, sequential over in), v = u B^T (float32, sequential over r),
y32 = f32(y32_base + f32(f32(s) * v)), then MV-5.  LoRA merged (MV-7): W' = round_T'(W_hat + s B A) (LORA-6, one
rounding to the 16-bit T'), read by the same accumulation as w.

The bound (MV-8), against the float64 product of the same decoded weights: standard model, u = 2^-24,
gamma_k = k u / (1 - k u).  In the stated order every term passes through at most one multiply, L - 1 additions in
its segment (L = the row's longest segment) and C - 1 additions across the row's C segments, so with
k = L + C - 1 (<= in):

    |y - y_exact| <= gamma_k * sum_j |x_j| |w_j|  +  halfulp_T(y)  +  in * 2^-149

halfulp_T(y): half the spacing from |y| to the next larger T value (RNE moves y32 at most that far; 0 for float32);
in * 2^-149: gradual underflow, the error of a subnormal float32 product (<= 2^-150 each; additions with a subnormal
result are exact).  Any other summation tree (lanes, shuffles, FMA contraction) has depth <= in: `any_order=True`
uses k = in.  The derivations of the LoRA terms are in `matvec_bound` and specs/matvec.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .checks import check_finite
from .dtypes import bf16_to_f32, f32_to_bf16, resolve_dtype, to_float32
from .lora import _f64_to_f32_round_to_odd, lora_scaling
from .quantized import Quantized4bit, dequantize_4bit

MAX_TOKENS = 16  # the decode kernel's range: more tokens go through dequantize + GEMM
OUT_DTYPES = ("bfloat16", "float32")
ORDERS = ("spec", "any")  # a backend's summation order: the spec's (MV-4, the same bits) or any (MV-8, any_order)
MERGED_DTYPES = ("bfloat16", "float16", "float32")
U32 = 2.0**-24  # float32 unit roundoff
U64 = 2.0**-53
# unit roundoff and half the smallest subnormal of each 16-bit merge dtype (MV-7)
MERGE_ROUNDING = {"bfloat16": (2.0**-8, 2.0**-134), "float16": (2.0**-11, 2.0**-25), "float32": (U32, 2.0**-150)}
UNDERFLOW32 = 2.0**-149  # twice the largest error of one subnormal float32 product (2^-150), margin for propagation


def gamma(k, u: float = U32):
    """gamma_k = k u / (1 - k u): the relative bound of k successive roundings (Higham, Lemma 3.1)."""
    k = np.asarray(k, np.float64)
    return k * u / (1.0 - k * u)


@dataclass(frozen=True)
class LoraTerm:
    """The adapter beside the 4-bit base (shapes of PEFT, specs/lora.md): A float32 [r, in], B float32 [out, r].

    s = lora_scaling(alpha, r, rslora) (LORA-1).  merged=False: two thin products added to the base's float32
    accumulator (MV-6); merged=True: the weight W' = round_{merged_dtype}(W_hat + s B A) is read instead (MV-7).
    """

    A: np.ndarray  # (r, in)
    B: np.ndarray  # (out, r)
    alpha: float
    rslora: bool = False
    merged: bool = False
    merged_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        object.__setattr__(self, "merged_dtype", resolve_dtype(self.merged_dtype, "merged_dtype"))

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, int(np.asarray(self.A).shape[0]), rslora=self.rslora)


# --- MV-4: the segments of a row ----------------------------------------------------------------------------------


def segments(out_f: int, in_f: int, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """(seg, pos) int64 [out, in]: segment index within its row and position within its block of every element.

    seg[o, j] = (o*in + j) // blocksize - (o*in) // blocksize,  pos[o, j] = (o*in + j) % blocksize.
    Example, in = 5, blocksize = 4: row 0 = [0 0 0 0 | 1], row 1 = [0 0 0 | 1 1]  (flat 5..7 in block 1, 8..9 in 2).
    """
    flat = np.arange(out_f, dtype=np.int64)[:, None] * in_f + np.arange(in_f, dtype=np.int64)[None, :]  # (out, in)
    seg = flat // blocksize - (flat[:, :1] // blocksize)
    return seg, flat % blocksize


def depth(out_f: int, in_f: int, blocksize: int) -> np.ndarray:
    """k[o] = L_o + C_o - 1: the most roundings a term of row o passes through in the MV-4 order (MV-8)."""
    seg, _ = segments(out_f, in_f, blocksize)
    C = seg[:, -1] + 1  # (out,) segments per row
    L = np.array([np.bincount(row).max() for row in seg], np.int64)  # (out,) longest segment
    return L + C - 1


def _accumulate(x32: np.ndarray, w32: np.ndarray, blocksize: int) -> np.ndarray:
    """MV-3, MV-4: y32[t, o] = across-segment float32 sum of in-segment float32 sums of f32(x_j * w_oj)."""
    T, in_f = x32.shape
    out_f = w32.shape[0]
    seg, pos = segments(out_f, in_f, blocksize)
    C = int(seg[:, -1].max()) + 1
    P = np.zeros((T, out_f, C, blocksize), np.float32)  # products at (segment, position in block); 0 elsewhere
    rows = np.arange(out_f)[:, None]
    P[:, rows, seg, pos] = x32[:, None, :] * w32[None, :, :]  # (T, out, in) one float32 rounding each
    s = np.zeros((T, out_f, C), np.float32)
    for p in range(blocksize):  # in block order; a padding slot adds +0.0, which is exact
        s = s + P[..., p]
    y32 = np.zeros((T, out_f), np.float32)
    for c in range(C):  # segment order; a row with fewer segments adds +0.0
        y32 = y32 + s[..., c]
    return y32


# --- the product ----------------------------------------------------------------------------------------------------


def matvec_4bit(x, q: Quantized4bit, *, dtype=None, out_dtype="bfloat16", lora: LoraTerm | None = None) -> np.ndarray:
    """y = round_T(x · W_hat^T [+ s (x A^T) B^T]) in the order of MV-2 .. MV-7.

    x: [T, in] or [in] (one token), T = 1..16: float32, or bfloat16 (a torch bf16 tensor, an ml_dtypes array, or
    uint16 bits with dtype="bfloat16"), widened exactly (MV-1).  q: 2-D Quantized4bit [out, in].  out_dtype:
    "bfloat16" (returned as uint16 bits) or "float32".  Returns [T, out] (or [out] for a 1-D x).
    """
    x32, w32, one_token, out, lora = _prepare(x, q, dtype, out_dtype, lora)
    if lora is not None and lora.merged:
        y32 = _accumulate(x32, merged_weight(q, lora), q.blocksize)  # MV-7
    else:
        y32 = _accumulate(x32, w32, q.blocksize)  # MV-4
        if lora is not None:  # MV-6
            u = _sequential_dot(x32, np.asarray(lora.A, np.float32))  # (T, r)
            v = _sequential_dot(u, np.asarray(lora.B, np.float32))  # (T, out)
            y32 = y32 + np.float32(lora.scaling) * v
    y = y32 if out == "float32" else f32_to_bf16(y32)  # MV-5: the one rounding of the output
    return y[0] if one_token else y


def _sequential_dot(a32: np.ndarray, b32: np.ndarray) -> np.ndarray:
    """c[t, o] = ((0 + f32(a_t0 b_o0)) + f32(a_t1 b_o1)) + ...  float32, in index order (MV-6)."""
    c = np.zeros((a32.shape[0], b32.shape[0]), np.float32)
    for k in range(a32.shape[1]):
        c = c + a32[:, k : k + 1] * b32[None, :, k]
    return c


def merged_weight(q: Quantized4bit, lora: LoraTerm) -> np.ndarray:
    """W' = round_T'(W_hat + s B A) as float32 (MV-7, LORA-6): the sum in float64, one rounding to T'."""
    w64 = dequantize_4bit(q, "float32").astype(np.float64)
    d64 = w64 + lora.scaling * (np.asarray(lora.B, np.float64) @ np.asarray(lora.A, np.float64))  # (out, in)
    if lora.merged_dtype == "float32":
        return d64.astype(np.float32)
    if lora.merged_dtype == "float16":
        return d64.astype(np.float16).astype(np.float32)
    return bf16_to_f32(f32_to_bf16(_f64_to_f32_round_to_odd(d64)))


# --- MV-8: the reference and the bound -------------------------------------------------------------------------


def matvec_f64(x, q: Quantized4bit, *, dtype=None, lora: LoraTerm | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(y64, abs64) [T, out]: x · (W_hat + s B A)^T in float64, and the same sum over |operands| (the abs-graph).

    The weights are the MV-2 float32 decode, so y64 measures the accumulation only; the float64 error of y64 itself
    (<= gamma_{in+r+2}(2^-53) abs64) is inside `matvec_bound`.
    """
    x32, w32, one_token, _, lora = _prepare(x, q, dtype, "float32", lora)
    x64, w64 = x32.astype(np.float64), w32.astype(np.float64)
    y64, abs64 = x64 @ w64.T, np.abs(x64) @ np.abs(w64).T
    if lora is not None:
        s = lora.scaling
        A, B = np.asarray(lora.A, np.float64), np.asarray(lora.B, np.float64)
        y64 = y64 + s * ((x64 @ A.T) @ B.T)
        abs64 = abs64 + abs(s) * ((np.abs(x64) @ np.abs(A).T) @ np.abs(B).T)
    return (y64[0], abs64[0]) if one_token else (y64, abs64)


def halfulp(y, out_dtype) -> np.ndarray:
    """Half the spacing from |y| to the next larger value of out_dtype (float64); 0 for float32 (no rounding)."""
    y = np.asarray(y)
    if resolve_dtype(out_dtype, "out_dtype") == "float32":
        return np.zeros(y.shape)
    mag = y.view(np.uint16) & np.uint16(0x7FFF)  # |y| as bf16 bits
    up = bf16_to_f32(mag + np.uint16(1)).astype(np.float64) - bf16_to_f32(mag).astype(np.float64)
    return up / 2


def matvec_bound(
    x, q: Quantized4bit, y, *, dtype=None, out_dtype="bfloat16", lora: LoraTerm | None = None, any_order=False
) -> np.ndarray:
    """Element-wise bound on |y - y64| for a result y of out_dtype (MV-8), y64 from `matvec_f64`.

    base (MV-4):   gamma_k S + halfulp(y) + in 2^-149,  S = |x| |W_hat|^T,  k = L + C - 1 per row (`depth`), or in
                   with any_order=True (any summation tree of in products, FMA or not, has at most in roundings on
                   a term)
    unmerged (MV-6): k -> k + 1 for the base (the final add), plus gamma_{in+r+3} |s| (|x| |A|^T) |B|^T: u_k within
                   gamma_in of exact, v within gamma_r (1 + gamma_in) + gamma_in <= gamma_{in+r}, f32(s) and the
                   product t = s v two more roundings, the final add one more (Higham, Lemma 3.3)
    merged (MV-7):  gamma_k |x| |W'|^T + u_T' |x| |D|^T + tiny_T' sum|x| + gamma_{r+2}(2^-53) |x| |D|_abs^T, D =
                   W_hat + s B A exact: W' is within u_T' |D| + tiny_T' of D, with D itself formed in float64
    all:           + gamma_{in+r+2}(2^-53) abs64 for y64's own float64 error.
    """
    x32, w32, one_token, out, lora = _prepare(x, q, dtype, out_dtype, lora)
    out_f, in_f = q.shape
    k = np.full(out_f, in_f) if any_order else depth(out_f, in_f, q.blocksize)  # (out,)
    ax, aw = np.abs(x32.astype(np.float64)), np.abs(w32.astype(np.float64))  # (T, in), (out, in)
    y = np.asarray(y)
    y2 = y[None] if one_token else y
    bound = halfulp(y2, out) + in_f * UNDERFLOW32  # (T, out)
    r = 0
    if lora is None:
        bound = bound + gamma(k)[None, :] * (ax @ aw.T)
    else:
        s = abs(lora.scaling)
        A, B = np.abs(np.asarray(lora.A, np.float64)), np.abs(np.asarray(lora.B, np.float64))
        r = A.shape[0]
        ba = s * (B @ A)  # (out, in) |s| |B| |A|
        if lora.merged:
            wm = np.abs(merged_weight(q, lora).astype(np.float64))
            d_abs = aw + ba  # >= |D|
            u_t, tiny_t = MERGE_ROUNDING[lora.merged_dtype]
            bound = bound + gamma(k)[None, :] * (ax @ wm.T) + (u_t + gamma(r + 2, U64)) * (ax @ d_abs.T)
            bound = bound + tiny_t * ax.sum(axis=1, keepdims=True)
        else:
            bound = bound + gamma(k + 1)[None, :] * (ax @ aw.T) + gamma(in_f + r + 3) * s * ((ax @ A.T) @ B.T)
            bound = bound + (in_f * s * B.sum(axis=1)[None, :] + r * s + 2) * UNDERFLOW32  # u, v, t underflow
    _, abs64 = matvec_f64(x32, q, lora=lora)
    bound = bound + gamma(in_f + r + 2, U64) * (abs64[None] if abs64.ndim == 1 else abs64)
    return bound[0] if one_token else bound


# --- MV-1, MV-9: the boundary -----------------------------------------------------------------------------------


def launch_dtypes(tokens, x_dtype, out_dtype, order) -> tuple[str, str]:
    """(x dtype name, out dtype name) of a bound matvec (a backend's ``bind_matvec_4bit``) after checking its
    arguments against MV-1: 1..MAX_TOKENS tokens, x float32 or bfloat16, out one of OUT_DTYPES, order one of ORDERS."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if isinstance(tokens, bool) or not isinstance(tokens, (int, np.integer)) or not 1 <= tokens <= MAX_TOKENS:
        raise ValueError(f"tokens must be an int in 1..{MAX_TOKENS}, got {tokens!r}")
    x_name, out_name = resolve_dtype(x_dtype, "x_dtype"), resolve_dtype(out_dtype, "out_dtype")
    if x_name not in ("float32", "bfloat16") or out_name not in OUT_DTYPES:
        raise ValueError(f"x_dtype and out_dtype must be float32 or bfloat16, got {x_dtype!r}, {out_dtype!r}")
    return x_name, out_name


def _prepare(x, q, dtype, out_dtype, lora):
    if not isinstance(q, Quantized4bit) or len(q.shape) != 2:
        raise ValueError(f"q must be a 2-D (out, in) Quantized4bit, got {type(q).__name__} {getattr(q, 'shape', '')}")
    out = resolve_dtype(out_dtype, "out_dtype")
    if out not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype!r}")
    x32, name = to_float32(x, dtype, strict=True)
    if name == "float16":
        raise TypeError("x must be float32 or bfloat16 (the decode kernel's inputs), got float16; cast it first")
    out_f, in_f = q.shape
    one_token = x32.ndim == 1
    x32 = x32[None] if one_token else x32
    if x32.ndim != 2 or x32.shape[1] != in_f:
        raise ValueError(f"x must be [T, {in_f}] or [{in_f}] for q of shape {q.shape}, got {x32.shape}")
    if not 1 <= x32.shape[0] <= MAX_TOKENS:
        raise ValueError(
            f"the 4-bit matvec takes 1..{MAX_TOKENS} tokens, got {x32.shape[0]}; more go through "
            "dequantize_4bit + a matrix product"
        )
    check_finite(x32, "x")
    if lora is not None:
        if not isinstance(lora, LoraTerm):
            raise TypeError(f"lora must be a LoraTerm, got {type(lora).__name__}")
        A, B = np.asarray(lora.A), np.asarray(lora.B)
        if A.dtype != np.float32 or B.dtype != np.float32:
            raise TypeError(f"LoRA A and B must be float32, got {A.dtype} and {B.dtype}")
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != in_f or B.shape != (out_f, A.shape[0]):
            raise ValueError(
                f"with q [out, in] = {q.shape}, A must be [r, {in_f}] and B [{out_f}, r]; got {A.shape}, {B.shape}"
            )
        check_finite(A, "A")
        check_finite(B, "B")
    w32 = dequantize_4bit(q, "float32")  # MV-2: BW-7's float32 decode, DQ-3 absmax first
    return x32, w32, one_token, out, lora
