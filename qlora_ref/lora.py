"""LoRA: the low-rank adapter QLoRA trains beside the frozen 4-bit weight (specs/lora.md, rules LORA-1 .. LORA-7).

Shapes follow PEFT (`lora_A = nn.Linear(in, r)`, `lora_B = nn.Linear(r, out)`), so A is [r, in] and B is [out, r]:

    s       = alpha / r                 (LORA-1; alpha / sqrt(r) with rsLoRA)
    mask    = keep / (1 - p)            (LORA-3: inverted dropout, the keep mask passed in, so runs are deterministic)
    xd      = x * mask                  (N, in)
    u       = xd A^T                    (N, r)
    y       = x W^T + s * u B^T         (N, out)           (LORA-2: W frozen)

The hand-derived backward (LORA-4), for an upstream gradient dy = dL/dy of shape (N, out):

    dB = s * dy^T u                     (out, r)
    du = s * dy B                       (N, r)
    dA = du^T xd                        (r, in)
    dx = dy W + (du A) * mask           (N, in)            (no dW: the base weight is frozen)

Merging (LORA-6) folds the adapter into a 16-bit weight with a single rounding:  W' = round_T(W + s * B A), where the
sum is formed in float64 and rounded once to the weight's dtype T (bf16 via round-to-odd to float32, then
round-to-nearest-even to bf16, which is one correct rounding; see `_f64_to_f32_round_to_odd`).

Initialisation (LORA-5) is PEFT's `reset_lora_parameters`: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in))
(gain sqrt(2 / (1 + a^2)) = sqrt(1/3), bound gain * sqrt(3 / fan_in) = 1 / sqrt(in)), or N(0, (1/r)^2) for
init="gaussian"; B = 0, so the adapted layer starts equal to the base layer.
"""

from __future__ import annotations

import math

import numpy as np

from .checks import check_finite
from .dtypes import f32_to_bf16, to_float32

COMPUTE_DTYPES = (np.float32, np.float64)
INITS = ("kaiming_uniform", "gaussian")


# --- scalars and initialisation ---------------------------------------------------------------------------------


def lora_scaling(alpha: float, r: int, *, rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA (LORA-1); PEFT's `scaling[adapter]`."""
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1:
        raise ValueError(f"rank r must be a positive integer, got {r!r}")
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"lora alpha must be a positive finite number, got {alpha!r}")
    return alpha / math.sqrt(r) if rslora else alpha / int(r)


def lora_init(
    in_features: int, out_features: int, r: int, *, rng: np.random.Generator, init: str = "kaiming_uniform"
) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's default adapter initialisation (LORA-5): A float32[r, in], B float32[out, r] = 0.

    kaiming_uniform: A ~ U(-1/sqrt(in), 1/sqrt(in))  (torch's kaiming_uniform_ with a = sqrt(5), fan_in = in)
    gaussian:        A ~ N(0, std = 1/r)               (PEFT's init_lora_weights="gaussian")
    """
    for name, v in (("in_features", in_features), ("out_features", out_features), ("r", r)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    if init == "kaiming_uniform":
        bound = 1.0 / math.sqrt(in_features)
        A = rng.uniform(-bound, bound, size=(r, in_features)).astype(np.float32)  # (r, in)
    elif init == "gaussian":
        A = rng.normal(0.0, 1.0 / r, size=(r, in_features)).astype(np.float32)  # (r, in)
    else:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    B = np.zeros((out_features, r), np.float32)  # (out, r)
    return A, B


def dropout_keep(shape: tuple, p: float, rng: np.random.Generator) -> np.ndarray:
    """A keep mask for inverted dropout: bool array, each entry True with probability 1 - p (LORA-3)."""
    _check_p(p)
    return rng.random(shape) >= p


# Counter-based keep mask (LORA-8): a pure function of (seed, salt, index), so a GPU can draw it from a seed held in
# device memory (a CUDA graph replays it with each step's new seed) and a backward or a checkpoint recompute redraws
# the forward's mask exactly.  splitmix64 (Steele, Lea & Flood 2014): the state after i + 1 steps of GOLDEN from the
# key, through the finalizer; the top 53 bits against t = floor(p 2^53).
GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment (2^64 / golden ratio, odd)
SALT_MUL = np.uint64(0xD1B54A32D192ED03)  # an odd multiplier spreading the per-layer salts over the state space
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def splitmix64_mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 values (arithmetic mod 2^64)."""
    z = z.astype(np.uint64, copy=True)
    z ^= z >> np.uint64(30)
    z *= _M1
    z ^= z >> np.uint64(27)
    z *= _M2
    z ^= z >> np.uint64(31)
    return z


def keep_scale(p: float) -> float:
    """1 / (1 - p) in float32, the value of a kept entry of the dropout mask (LORA-3), as a Python float."""
    _check_p(p)
    return float(np.float32(1.0) / np.float32(1.0 - p))


def keep_threshold(p: float) -> int:
    """t = floor(p * 2^53): keep when the top 53 bits are >= t, so P(keep) = 1 - t / 2^53 (|error| < 2^-53)."""
    _check_p(p)
    return int(p * 2.0**53)  # p * 2^53 is exact (a power-of-two scaling of a float64), int() floors it


def dropout_keep_counter(shape: tuple, p: float, seed: int, salt: int) -> np.ndarray:
    """The keep mask of LORA-8: keep[i] = mix(seed + salt * SALT_MUL + (i + 1) * GOLDEN) >> 11 >= floor(p 2^53).

    i is the flat (row-major) index; seed and salt are taken mod 2^64 (a negative int64 seed is its two's complement).
    """
    t = keep_threshold(p)
    n = int(np.prod(shape, dtype=np.int64))
    with np.errstate(over="ignore"):
        key = np.uint64((int(seed) + int(salt) * int(SALT_MUL)) % 2**64)
        z = key + (np.arange(1, n + 1, dtype=np.uint64) * GOLDEN)
        return ((splitmix64_mix(z) >> np.uint64(11)) >= np.uint64(t)).reshape(shape)


# --- forward and backward -----------------------------------------------------------------------------------------


def lora_forward(
    x: np.ndarray,
    W: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    *,
    alpha: float,
    rslora: bool = False,
    p: float = 0.0,
    keep: np.ndarray | None = None,
) -> np.ndarray:
    """y = x W^T + s * (x * keep/(1-p)) A^T B^T  (LORA-2, LORA-3).

    x: float32 or float64 [..., in]; A [r, in] and B [out, r] in x's dtype; W [out, in] in x's dtype, or a 16-bit
    weight (float16, or bfloat16 as uint16 bits) that is read exactly and widened to x's dtype.  `keep` (bool, x's
    shape) is required when p > 0 and must be None when p == 0.  Arithmetic is in x's dtype.
    """
    x, W, A, B, mask, s = _prepare(x, W, A, B, alpha=alpha, rslora=rslora, p=p, keep=keep)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    xd = x2 if mask is None else x2 * mask.reshape(x2.shape)  # (N, in)
    u = xd @ A.T  # (N, r)
    y = x2 @ W.T + (u @ B.T) * s  # (N, out)
    return y.reshape(*lead, W.shape[0])  # (..., out)


def lora_backward(
    dy: np.ndarray,
    x: np.ndarray,
    W: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    *,
    alpha: float,
    rslora: bool = False,
    p: float = 0.0,
    keep: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dx, dA, dB) for dy = dL/dy (LORA-4); W is frozen, so there is no dW.  Recomputes xd and u from x.

    dB = s dy^T u,  dA = s (dy B)^T xd,  dx = dy W + (s (dy B) A) * mask.   Same dtype rules as `lora_forward`.
    """
    x, W, A, B, mask, s = _prepare(x, W, A, B, alpha=alpha, rslora=rslora, p=p, keep=keep)
    dy = np.asarray(dy)
    if dy.dtype != x.dtype or dy.shape != (*x.shape[:-1], W.shape[0]):
        raise ValueError(
            f"dy must have x's dtype {x.dtype} and shape {(*x.shape[:-1], W.shape[0])} (x's leading dims, out), "
            f"got dtype {dy.dtype} shape {dy.shape}"
        )
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    dy2 = dy.reshape(-1, W.shape[0])  # (N, out)
    m2 = None if mask is None else mask.reshape(x2.shape)  # (N, in)
    xd = x2 if m2 is None else x2 * m2  # (N, in)
    u = xd @ A.T  # (N, r)
    dB = (dy2.T @ u) * s  # (out, r)
    du = (dy2 @ B) * s  # (N, r)
    dA = du.T @ xd  # (r, in)
    dx_lora = du @ A  # (N, in)
    if m2 is not None:
        dx_lora = dx_lora * m2
    dx = dy2 @ W + dx_lora  # (N, in)
    return dx.reshape(x.shape), dA, dB


# --- merge ----------------------------------------------------------------------------------------------------------


def lora_merge(
    W: np.ndarray, A: np.ndarray, B: np.ndarray, *, alpha: float, rslora: bool = False, dtype: str | None = None
) -> np.ndarray:
    """W' = round_T(W + s * B A), one rounding to W's dtype T (LORA-6).

    W: [out, in] float32, float16, or bfloat16 (uint16 bits with dtype="bfloat16", or an ml_dtypes bfloat16 array);
    A float32[r, in], B float32[out, r].  The sum is formed in float64 (every float32 product of B A is exact there;
    the r-term sums carry float64 rounding only) and rounded once to T.  Returns W' in W's format (bf16 as uint16 bits).
    """
    W32, wdtype = to_float32(W, dtype)
    A = _expect_f32(A, "A")
    B = _expect_f32(B, "B")
    if W32.ndim != 2 or A.ndim != 2 or B.ndim != 2:
        raise ValueError(f"W, A, B must be 2-D, got shapes {W32.shape}, {A.shape}, {B.shape}")
    out_f, in_f = W32.shape
    r = A.shape[0]
    if A.shape != (r, in_f) or B.shape != (out_f, r):
        raise ValueError(
            f"with W [out, in] = {W32.shape}, A must be [r, {in_f}] and B [{out_f}, r]; got {A.shape}, {B.shape}"
        )
    for name, arr in (("W", W32), ("A", A), ("B", B)):
        check_finite(arr, name)
    s = lora_scaling(alpha, r, rslora=rslora)
    merged64 = W32.astype(np.float64) + s * (B.astype(np.float64) @ A.astype(np.float64))  # (out, in)
    if wdtype == "float32":
        return merged64.astype(np.float32)
    if wdtype == "float16":
        return merged64.astype(np.float16)  # numpy converts float64 -> float16 directly, one rounding
    return f32_to_bf16(_f64_to_f32_round_to_odd(merged64))


def _f64_to_f32_round_to_odd(x64: np.ndarray) -> np.ndarray:
    """float64 -> float32 rounding to odd: truncate toward zero, then set the last bit if anything was dropped.

    A value rounded to odd in a format with at least p + 2 significand bits and then rounded to nearest-even to p bits
    is the correctly rounded p-bit value (Boldo & Melquiond, "Emulation of FMA and correctly rounded sums: proved
    algorithms using rounding to odd", 2008).  float32 (24 bits) >= bf16 (8 bits) + 2, over bf16's whole exponent range.
    """
    with np.errstate(over="ignore"):  # beyond float32's range: inf, stepped back to float32 max below
        y = x64.astype(np.float32)
    away = np.abs(y.astype(np.float64)) > np.abs(x64)  # RNE rounded away from zero: step back toward zero
    y = np.where(away, np.nextafter(y, np.float32(0)), y)
    inexact = y.astype(np.float64) != x64
    return (y.view(np.uint32) | inexact.astype(np.uint32)).view(np.float32)


# --- boundary checks ----------------------------------------------------------------------------------------------


def _check_p(p: float) -> float:
    p = float(p)
    if not (0.0 <= p < 1.0):
        raise ValueError(f"dropout probability p must be in [0, 1), got {p!r}")
    return p


def _expect_f32(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.float32:
        raise TypeError(
            f"{name} must be float32 (the trained adapter), got {a.dtype}; cast it with .astype(np.float32)"
        )
    return a


def _prepare(x, W, A, B, *, alpha, rslora, p, keep):
    """Validate the forward/backward inputs; return (x, W, A, B, mask or None, s) in the compute dtype."""
    x, A, B = np.asarray(x), np.asarray(A), np.asarray(B)
    if x.dtype not in COMPUTE_DTYPES:
        raise TypeError(f"x must be float32 or float64, got {x.dtype}")
    dt = x.dtype
    if A.dtype != dt or B.dtype != dt:
        raise TypeError(f"A and B must have x's dtype {dt}, got {A.dtype} and {B.dtype}")
    W = np.asarray(W)
    if W.dtype != dt:
        if W.dtype == np.float64 or W.dtype.name not in ("float32", "float16", "uint16", "bfloat16"):
            raise TypeError(
                f"W must be x's dtype {dt}, float16, or bfloat16 bits (uint16); got {W.dtype}. Cast x or W to match."
            )
        W = to_float32(W, None)[0].astype(dt)
    if x.ndim < 1 or W.ndim != 2 or A.ndim != 2 or B.ndim != 2:
        raise ValueError(
            f"need x [..., in], W [out, in], A [r, in], B [out, r]; got ndim {x.ndim}, {W.ndim}, {A.ndim}, {B.ndim}"
        )
    out_f, in_f = W.shape
    r = A.shape[0]
    if x.shape[-1] != in_f or A.shape != (r, in_f) or B.shape != (out_f, r):
        raise ValueError(
            f"shape mismatch: x {x.shape} (last dim = in), W {W.shape} [out, in], A {A.shape} [r, in], B {B.shape} "
            "[out, r]; these follow PEFT's lora_A.weight and lora_B.weight"
        )
    s = dt.type(lora_scaling(alpha, r, rslora=rslora))
    p = _check_p(p)
    if p == 0.0:
        if keep is not None:
            raise ValueError("keep was given but p == 0 (no dropout); pass keep=None, or the p the mask was drawn with")
        return x, W, A, B, None, s
    if keep is None:
        raise ValueError(f"p = {p} > 0 needs an explicit keep mask (bool, shape {x.shape}); draw one with dropout_keep")
    keep = np.asarray(keep)
    if keep.dtype != np.bool_ or keep.shape != x.shape:
        raise ValueError(f"keep must be a bool array of x's shape {x.shape}, got dtype {keep.dtype} shape {keep.shape}")
    mask = keep.astype(dt) / dt.type(1.0 - p)  # (..., in): 0 or 1/(1-p)
    return x, W, A, B, mask, s
