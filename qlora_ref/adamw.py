"""AdamW, 32-bit and 8-bit blockwise state, and global-norm gradient clipping (specs/adamw.md, ADAMW-1 .. ADAMW-12).

The 32-bit step, in float32, one operation at a time (no fusion), every scalar cast to float32 first (ADAMW-2):

    m         = b1*m + (1-b1)*g
    v         = b2*v + (1-b2)*(g*g)
    c1        = 1 - b1**t
    c2        = sqrt(1 - b2**t)
    step_size = -lr*c2/c1
    p         = p + step_size * (m / (sqrt(v) + eps*c2))

    decay="after"  (bitsandbytes' kernel, the default):  then  p = p*(1 - lr*wd)            (ADAMW-3)
    decay="before" (torch.optim.AdamW):               first p = p*(1 - lr*wd), then the above

This is Adam with bias correction, m_hat / (sqrt(v_hat) + eps) with m_hat = m/c1, v_hat = v/c2^2, multiplied through
by c2.  The two decay placements differ by lr*wd*update = O(lr^2 * wd) per step (ADAMW-4).

8-bit state (ADAMW-6 .. ADAMW-8), bitsandbytes' blockwise Adam8bit: m and v live as uint8 codes into the signed
(m) and unsigned (v) dynamic maps with one float32 absmax per 256 values.  A step dequantizes both, runs the 32-bit
step above on them (p is updated from the new float32 states), then requantizes each with a fresh per-block absmax.

Gradient clipping (ADAMW-10) is torch.nn.utils.clip_grad_norm_'s rule: g *= min(1, max_norm / (||g||_2 + 1e-6)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .blockwise import dequantize_blockwise_8bit, quantize_blockwise_8bit
from .checks import NonFiniteError
from .codebooks import dynamic_map

DECAYS = ("after", "before")
BLOCKSIZE_8BIT = 256  # ADAMW-6: bitsandbytes' blockwise optimizer block
CLIP_EPS = 1e-6  # ADAMW-10: torch.nn.utils.clip_grad_norm_ adds this to the norm


# --- 32-bit ---------------------------------------------------------------------------------------------------------


def adamw_step(
    p: np.ndarray,
    g: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    t: int,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decay: str = "after",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One AdamW step in float32 with the op order above (ADAMW-1 .. ADAMW-3); returns new (p, m, v), inputs untouched.

    p, g, m, v: float32 arrays of one shape; t >= 1 the step number (1 on the first step); g must be finite.
    """
    _check_arrays(p=p, g=g, m=m, v=v)
    lr32, b1, b2, eps32, wd32, t32 = _check_hparams(t, lr, betas, eps, weight_decay, decay)
    one = np.float32(1.0)
    if decay == "before":
        p = p * (one - lr32 * wd32)
    m = b1 * m + (one - b1) * g
    v = b2 * v + (one - b2) * (g * g)
    c1, c2, step_size = adam_scalars(t32, lr32, b1, b2)
    p = p + step_size * (m / (np.sqrt(v) + eps32 * c2))
    if decay == "after":
        p = p * (one - lr32 * wd32)
    return p, m, v


def adam_scalars(t32: np.float32, lr32: np.float32, b1: np.float32, b2: np.float32):
    """(c1, c2, step_size) in float32 (ADAMW-2): c1 = 1 - b1**t, c2 = sqrt(1 - b2**t), step_size = -lr*c2/c1.

    Computed once per step on the host with numpy's float32 pow; a kernel takes these three values as arguments so that
    its per-element arithmetic matches the spec bit for bit (device powf may differ from the host's in the last ulp).
    """
    one = np.float32(1.0)
    c1 = one - b1**t32
    c2 = np.sqrt(one - b2**t32)
    step_size = -lr32 * c2 / c1
    return np.float32(c1), np.float32(c2), np.float32(step_size)


# --- 8-bit blockwise state ------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class AdamW8bitState:
    """Adam's moments as 8-bit blockwise codes (ADAMW-6), bitsandbytes' `state1/state2/absmax1/absmax2` layout.

    m_codes   uint8[n]                 into dynamic_map(signed=True)
    m_absmax  float32[ceil(n / 256)]   per-block max |m|
    v_codes   uint8[n]                 into dynamic_map(signed=False)
    v_absmax  float32[ceil(n / 256)]   per-block max v
    """

    m_codes: np.ndarray
    m_absmax: np.ndarray
    v_codes: np.ndarray
    v_absmax: np.ndarray

    def __post_init__(self) -> None:
        n = np.asarray(self.m_codes).size
        nblocks = -(-n // BLOCKSIZE_8BIT)
        for name, want_dtype, want_shape in (
            ("m_codes", np.uint8, (n,)),
            ("m_absmax", np.float32, (nblocks,)),
            ("v_codes", np.uint8, (n,)),
            ("v_absmax", np.float32, (nblocks,)),
        ):
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.dtype != want_dtype or a.shape != want_shape:
                got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
                raise ValueError(
                    f"AdamW8bitState.{name} must be {np.dtype(want_dtype).name}{list(want_shape)} for n = {n} "
                    f"(blocksize {BLOCKSIZE_8BIT}), got {got}"
                )
        if n == 0:
            raise ValueError("AdamW8bitState needs at least one element")

    @property
    def n(self) -> int:
        return int(self.m_codes.size)

    @property
    def blocksize(self) -> int:
        return BLOCKSIZE_8BIT

    @classmethod
    def zeros(cls, n: int) -> AdamW8bitState:
        """The initial state: all codes 0 and absmax 0, so m = v = 0 (bitsandbytes zero-fills both buffers)."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive integer (the parameter's element count), got {n!r}")
        nblocks = -(-int(n) // BLOCKSIZE_8BIT)
        return cls(
            m_codes=np.zeros(n, np.uint8),
            m_absmax=np.zeros(nblocks, np.float32),
            v_codes=np.zeros(n, np.uint8),
            v_absmax=np.zeros(nblocks, np.float32),
        )

    def dequantize(self) -> tuple[np.ndarray, np.ndarray]:
        """(m, v) float32[n]: code[q] * absmax[i // 256] (ADAMW-7)."""
        m = dequantize_blockwise_8bit(self.m_codes, self.m_absmax, dynamic_map(signed=True), BLOCKSIZE_8BIT, self.n)
        v = dequantize_blockwise_8bit(self.v_codes, self.v_absmax, dynamic_map(signed=False), BLOCKSIZE_8BIT, self.n)
        return m, v

    @classmethod
    def quantize(cls, m: np.ndarray, v: np.ndarray) -> AdamW8bitState:
        """Blockwise 8-bit codes of float32 m and v with fresh per-block absmax (ADAMW-8)."""
        m_codes, m_absmax = quantize_blockwise_8bit(np.ravel(m), dynamic_map(signed=True), BLOCKSIZE_8BIT)
        v_codes, v_absmax = quantize_blockwise_8bit(np.ravel(v), dynamic_map(signed=False), BLOCKSIZE_8BIT)
        return cls(m_codes=m_codes, m_absmax=m_absmax, v_codes=v_codes, v_absmax=v_absmax)


def adamw_step_8bit(
    p: np.ndarray,
    g: np.ndarray,
    state: AdamW8bitState,
    t: int,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decay: str = "after",
) -> tuple[np.ndarray, AdamW8bitState]:
    """AdamW with 8-bit blockwise state (ADAMW-7, ADAMW-8): returns the new p and a new state; inputs untouched.

    m, v        = state.dequantize()                      float32[n]
    p, m', v'   = adamw_step(p, g, m, v, t, ...)          the 32-bit step, p from the unquantized m', v'
    state'      = AdamW8bitState.quantize(m', v')         new absmax per 256-block, then codes
    """
    if not isinstance(state, AdamW8bitState):
        raise TypeError(f"state must be an AdamW8bitState (AdamW8bitState.zeros(p.size)), got {type(state).__name__}")
    p_arr = np.asarray(p)
    if p_arr.size != state.n:
        raise ValueError(f"state holds {state.n} values but p has {p_arr.size} (shape {p_arr.shape}); one state per p")
    m, v = state.dequantize()
    p_new, m_new, v_new = adamw_step(
        p, g, m.reshape(p_arr.shape), v.reshape(p_arr.shape), t,
        lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decay=decay,
    )  # fmt: skip
    return p_new, AdamW8bitState.quantize(m_new, v_new)


# --- gradient clipping ----------------------------------------------------------------------------------------------


def clip_grad_norm(grads: Sequence[np.ndarray], max_norm: float) -> tuple[list[np.ndarray], np.float32]:
    """Scale all grads by one factor so their global 2-norm is at most max_norm (ADAMW-10); returns (clipped, norm).

    total_norm = f32( sqrt( sum_i sum_j g_ij^2 ) )          the sum in float64, one rounding to float32
    coef       = f32(max_norm) / (total_norm + f32(1e-6))   float32
    g_i       <- g_i * min(coef, 1)                         float32, every tensor (torch multiplies even by 1)
    """
    if isinstance(grads, np.ndarray) or not isinstance(grads, Sequence) or len(grads) == 0:
        raise TypeError(f"grads must be a non-empty list/tuple of float32 arrays, got {type(grads).__name__}")
    max_norm = float(max_norm)
    if not np.isfinite(max_norm) or max_norm <= 0:
        raise ValueError(f"max_norm must be positive and finite, got {max_norm!r}")
    for i, gi in enumerate(grads):
        _check_arrays(**{f"grads[{i}]": gi})
    total_sq = sum(float(np.sum(np.square(gi, dtype=np.float64))) for gi in grads)
    total_norm = np.float32(np.sqrt(total_sq))
    coef = np.float32(max_norm) / (total_norm + np.float32(CLIP_EPS))
    coef = min(coef, np.float32(1.0))
    return [gi * coef for gi in grads], total_norm


# --- boundary checks ----------------------------------------------------------------------------------------------


def _check_arrays(**arrays: np.ndarray) -> None:
    """float32 ndarrays of one shape (ADAMW-11); the gradient(s) finite (ADAMW-12)."""
    shape = None
    for name, a in arrays.items():
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{name} must be a numpy float32 array, got {type(a).__name__}")
        if a.dtype != np.float32:
            raise TypeError(f"{name} must be float32 (optimizer math is float32), got {a.dtype}; cast it first")
        if shape is None:
            shape = a.shape
        elif a.shape != shape:
            first = next(iter(arrays))
            raise ValueError(f"{name} has shape {a.shape} but {first} has {shape}; p, g, m, v must match")
        if name == "g" or name.startswith("grads["):
            finite = np.isfinite(a)
            if not finite.all():
                flat = finite.ravel()
                first_bad = int(np.argmin(flat))
                raise NonFiniteError(
                    f"{name} has {flat.size - int(np.count_nonzero(flat))} non-finite value(s) (NaN/Inf); the first is "
                    f"{a.ravel()[first_bad]} at flat index {first_bad}. Skip this step (loss scaling overflow?) "
                    "or find where the NaN comes from; the optimizer will not write it into the state."
                )


def _check_hparams(t, lr, betas, eps, weight_decay, decay):
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 1:
        raise ValueError(f"step t must be an integer >= 1 (1 on the first step), got {t!r}")
    if t > 2**24:
        raise ValueError(f"step t = {t} is not exact in float32 (> 2**24); the bias corrections would be wrong")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    checks = (
        ("lr", lr, 0.0 <= float(lr) < np.inf),
        ("beta1", betas[0], 0.0 <= float(betas[0]) < 1.0),
        ("beta2", betas[1], 0.0 <= float(betas[1]) < 1.0),
        ("eps", eps, 0.0 <= float(eps) < np.inf),
        ("weight_decay", weight_decay, 0.0 <= float(weight_decay) < np.inf),
    )
    for name, value, ok in checks:
        if not ok:
            rng = "[0, 1)" if name.startswith("beta") else "[0, inf)"
            raise ValueError(f"{name} must be in {rng}, got {value!r}")
    if decay not in DECAYS:
        raise ValueError(f"decay must be 'after' (bitsandbytes) or 'before' (torch.optim.AdamW), got {decay!r}")
    f32 = np.float32
    return f32(lr), f32(betas[0]), f32(betas[1]), f32(eps), f32(weight_decay), f32(t)
