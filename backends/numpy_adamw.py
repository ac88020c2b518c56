"""The numpy backend's AdamW: the spec's step per tensor over host arrays, and the spec's gradient clipping.

    p_k, m_k, v_k = qlora_ref.adamw.adamw_step(p_k, g_k, m_k, v_k, t_k, ...)      32-bit states (ADAMW-2, ADAMW-3)
    p_k, state_k  = qlora_ref.adamw.adamw_step_8bit(p_k, g_k, state_k, t_k, ...)  8-bit states (ADAMW-7, ADAMW-8)
    p_k          <- the new float32 values rounded once to p_k's dtype             (as torch's .to(dtype))

Bit-identical to the spec by construction: nothing here computes, it reads the caller's arrays (numpy arrays or torch
CPU tensors, bf16 as uint16 bits through backends.bridge) as float32 and writes the result back in place.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qlora_ref import adamw as spec
from qlora_ref.dtypes import bf16_to_f32, f32_to_bf16

from .adamw_state import STATE_NAMES, StepScalars, check_state_options, nonfinite_error, state_nbytes
from .bridge import dtype_name, is_torch, numpy_to_torch, torch_to_numpy


class HostAdamWStates:
    """The states as numpy arrays in host memory (`backends.adamw_state.AdamWStates`); nothing to page."""

    pageable = False
    resident = True

    def __init__(self, sizes: Sequence[int], state_bits: int):
        self.sizes = list(sizes)
        self.state_bits = state_bits
        if state_bits == 32:
            self.states = [(np.zeros(n, np.float32), np.zeros(n, np.float32)) for n in self.sizes]  # (m, v)
        else:
            self.states = [spec.AdamW8bitState.zeros(n) for n in self.sizes]
        self.nbytes = sum(state_nbytes(n, state_bits) for n in self.sizes)

    def page_in(self) -> None:  # host memory is where they live
        return None

    def page_out(self, sync: bool = True) -> None:
        return None

    def location(self) -> str:
        return "host"

    def free_bytes(self) -> int:
        return 0

    def export(self) -> list[dict[str, np.ndarray]]:
        if self.state_bits == 32:
            return [{"m": m.copy(), "v": v.copy()} for m, v in self.states]
        return [{k: getattr(s, k).copy() for k in STATE_NAMES[8]} for s in self.states]

    def load(self, arrays: list[dict[str, np.ndarray]]) -> None:
        if self.state_bits == 32:
            self.states = [(np.array(a["m"], np.float32), np.array(a["v"], np.float32)) for a in arrays]
        else:
            self.states = [spec.AdamW8bitState(**{k: np.array(a[k]) for k in STATE_NAMES[8]}) for a in arrays]


def adamw_states(sizes, *, state_bits=32, device=None, paged=True, placement="device", margin_bytes=None,
                 free_memory_fn=None, chunk=4096) -> HostAdamWStates:  # fmt: skip
    """Zeroed host states; the device-memory options (device, paged, placement, margins, chunk) do not apply here."""
    return HostAdamWStates(check_state_options(sizes, state_bits, paged, placement, chunk), state_bits)


def _float32(x, what: str) -> np.ndarray:
    """x's values as a flat float32 array, exactly (BW-1): numpy arrays or torch CPU tensors, bf16 as uint16 bits."""
    if is_torch(x):
        if x.device.type != "cpu":
            raise TypeError(f"{what} is a torch tensor on {x.device}; the numpy backend takes CPU tensors")
        bits = torch_to_numpy(x).reshape(-1)
        return bf16_to_f32(bits) if dtype_name(x) == "bfloat16" else bits.astype(np.float32)
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{what} must be a numpy array or a torch CPU tensor, got {type(x).__name__}")
    if x.dtype == np.uint16:
        return bf16_to_f32(x.reshape(-1))
    if x.dtype not in (np.float32, np.float16):
        raise TypeError(f"{what} has dtype {x.dtype}; AdamW takes float32, float16 or bfloat16 (uint16 bits)")
    return x.reshape(-1).astype(np.float32)


def _write(x, values32: np.ndarray) -> None:
    """x[...] = values32, rounded once to x's dtype (torch's copy_ for tensors; the spec's f32_to_bf16 for bits)."""
    if is_torch(x):
        x.copy_(numpy_to_torch(np.asarray(values32, np.float32)).view(x.shape))
    elif x.dtype == np.uint16:
        x.reshape(-1)[...] = f32_to_bf16(values32)
    else:
        x.reshape(-1)[...] = values32.astype(x.dtype)


def adamw_step(params, grads, states: HostAdamWStates, index, scalars: Sequence[StepScalars], *, decay="after",
               check_finite=True, skip=None) -> None:  # fmt: skip
    """One AdamW step in place for params[k] with grads[k] on states' tensor index[k] (module docstring).

    check_finite="deferred": no raise; skip (one int32, numpy array or CPU tensor) <- 1 and nothing written when a
    gradient holds NaN/Inf, else 0 and the step (ADAMW-12, deferred)."""
    if not len(params) == len(grads) == len(index) == len(scalars):
        raise ValueError("params, grads, index and scalars must have one entry per tensor")
    g32s = [_float32(g, f"gradient of parameter {i}") for i, g in zip(index, grads, strict=True)]
    if check_finite == "deferred":
        bad = any(not np.isfinite(g32).all() for g32 in g32s)
        flag = skip.numpy() if is_torch(skip) else skip
        flag[...] = 1 if bad else 0
        if bad:
            return
    elif check_finite:  # ADAMW-12: every gradient checked before anything is written
        for i, g32 in zip(index, g32s, strict=True):
            err = nonfinite_error(i, g32)
            if err is not None:
                raise err
    for p, g32, i, s in zip(params, g32s, index, scalars, strict=True):
        p32 = _float32(p, f"parameter {i}")
        if p32.size != states.sizes[i]:
            raise ValueError(f"parameter {i} has {p32.size} values but its state holds {states.sizes[i]}")
        kw = dict(lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay, decay=decay)
        if states.state_bits == 32:
            p_new, m, v = spec.adamw_step(p32, g32, *states.states[i], s.t, **kw)
            states.states[i] = (m, v)
        else:
            p_new, states.states[i] = spec.adamw_step_8bit(p32, g32, states.states[i], s.t, **kw)
        _write(p, p_new)


def clip_grad_norm_(grads, max_norm: float, *, error_if_nonfinite: bool = True) -> np.float32:
    """ADAMW-10 in place: the spec's `clip_grad_norm` (raises NonFiniteError itself); returns the float32 norm.
    error_if_nonfinite=False: a NaN/Inf gradient leaves every gradient as it is and the norm non-finite, no raise."""
    g32 = [_float32(g, f"gradient {k}") for k, g in enumerate(grads)]
    if not error_if_nonfinite and not all(np.isfinite(g).all() for g in g32):
        return np.float32(np.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in g32)))
    clipped, total_norm = spec.clip_grad_norm(g32, max_norm)
    for g, c in zip(grads, clipped, strict=True):
        _write(g, c)
    return total_norm
