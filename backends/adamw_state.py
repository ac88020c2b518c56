"""What both backends' AdamW step share: the step's scalars, the state layout, the states' interface and its errors.

The step (specs/adamw.md, `qlora_ref.adamw`), float32, one operation at a time, every scalar cast to float32 first:

    m = b1*m + (1-b1)*g                    v = b2*v + (1-b2)*(g*g)                                    (ADAMW-2)
    c1 = 1 - b1**t                         c2 = sqrt(1 - b2**t)            step_size = -lr*c2/c1
    p = p + step_size * (m / (sqrt(v) + eps*c2))
    decay="after"  (default, bitsandbytes):        then p = p*(1 - lr*wd)                             (ADAMW-3)
    decay="before" (torch.optim.AdamW placement):  p = p*(1 - lr*wd) first

`step_scalars` evaluates the scalars once per (t, hyperparameters) on the host with the spec's own expressions
(`qlora_ref.adamw.adam_scalars`), so a kernel given them does only correctly rounded mul/add/div/sqrt per element.
The numpy backend reads the step's inputs (t, lr, betas, eps, weight_decay) from the same object and calls the spec.

State layout per tensor of n values:
    state_bits=32:  m, v                  float32[n]
    state_bits=8:   m_codes, v_codes      uint8[n]                 (ADAMW-6: signed map for m, unsigned for v)
                    m_absmax, v_absmax    float32[ceil(n / 256)]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from qlora_ref import adamw as spec
from qlora_ref.checks import NonFiniteError

BLOCKSIZE_8BIT = spec.BLOCKSIZE_8BIT  # ADAMW-6: 256 values per 8-bit state block
ALIGN = 256  # bytes; every state array starts on this boundary (the device arena's layout, counted on the host too)
STATE_NAMES = {32: ("m", "v"), 8: ("m_codes", "m_absmax", "v_codes", "v_absmax")}
PLACEMENTS = ("device", "host")


class DeviceMemoryError(RuntimeError):
    """Not enough free device memory to allocate or page in the optimizer states (we refuse to oversubscribe)."""


# ---- the scalars of one step ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepScalars:
    """One AdamW step's inputs (t and the hyperparameters) and the float32 scalars a kernel takes (ADAMW-2)."""

    t: int
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    b1: np.float32
    one_minus_b1: np.float32
    b2: np.float32
    one_minus_b2: np.float32
    step_size: np.float32  # -lr*c2/c1
    eps_c2: np.float32  # eps*c2
    decay: np.float32  # 1 - lr*wd


KERNEL_SCALARS = ("b1", "one_minus_b1", "b2", "one_minus_b2", "step_size", "eps_c2", "decay")


def step_scalars(t: int, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> StepScalars:
    """The step's scalars by the spec's own expressions (ADAMW-2, `qlora_ref.adamw.adam_scalars`), all float32."""
    if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= 2**24:
        raise ValueError(f"step t must be an integer in [1, 2**24] (exact in float32), got {t!r}")
    check_hyper(lr, betas, eps, weight_decay)
    f = np.float32
    lr32, b1, b2, eps32, wd32 = f(lr), f(betas[0]), f(betas[1]), f(eps), f(weight_decay)
    one = f(1.0)
    _, c2, step_size = spec.adam_scalars(f(t), lr32, b1, b2)
    return StepScalars(
        t=t,
        lr=lr,
        betas=(betas[0], betas[1]),
        eps=eps,
        weight_decay=weight_decay,
        b1=b1,
        one_minus_b1=f(one - b1),
        b2=b2,
        one_minus_b2=f(one - b2),
        step_size=f(step_size),
        eps_c2=f(eps32 * c2),
        decay=f(one - lr32 * wd32),
    )


def check_hyper(lr, betas, eps, weight_decay) -> None:
    """ADAMW-11's hyperparameter ranges, with messages that name the argument."""
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite float >= 0, got {lr!r}")
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two floats in [0, 1), got {betas!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0 and math.isfinite(weight_decay)):
        raise ValueError(f"weight_decay must be a finite float >= 0, got {weight_decay!r}")


# ---- the state layout -----------------------------------------------------------------------------------------


def state_layout(n: int, state_bits: int) -> dict[str, tuple[type, int]]:
    """{state name: (numpy dtype, element count)} of one tensor of n values (module docstring)."""
    nblocks = -(-n // BLOCKSIZE_8BIT)
    if state_bits == 32:
        return {"m": (np.float32, n), "v": (np.float32, n)}
    return {"m_codes": (np.uint8, n), "m_absmax": (np.float32, nblocks),
            "v_codes": (np.uint8, n), "v_absmax": (np.float32, nblocks)}  # fmt: skip


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def state_nbytes(n: int, state_bits: int) -> int:
    """Bytes of one tensor's states, every array ALIGN-aligned."""
    return sum(aligned(np.dtype(dtype).itemsize * count) for dtype, count in state_layout(n, state_bits).values())


def check_state_options(sizes: Sequence[int], state_bits: int, paged: bool, placement: str, chunk: int) -> list[int]:
    """The boundary of `adamw_states` (both backends): returns the sizes as ints."""
    if state_bits not in (32, 8):
        raise ValueError(f"state_bits must be 32 or 8, got {state_bits!r}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be 'device' or 'host', got {placement!r}")
    if placement == "host" and not paged:
        raise ValueError("placement='host' keeps the states in managed memory: it needs paged=True")
    if not isinstance(chunk, int) or chunk <= 0 or chunk % 1024:
        raise ValueError(f"chunk must be a positive multiple of 1024 elements, got {chunk!r}")
    out = [int(n) for n in sizes]
    if not out or any(n < 1 for n in out):
        raise ValueError(f"sizes must be a non-empty list of positive element counts, got {list(sizes)!r}")
    return out


def nonfinite_error(i: int, g32: np.ndarray) -> NonFiniteError | None:
    """ADAMW-12's error for gradient i (float32 values on the host), or None when every value is finite."""
    finite = np.isfinite(g32)
    if finite.all():
        return None
    first = int(np.argmin(finite))
    return NonFiniteError(
        f"gradient of parameter {i} has {finite.size - int(np.count_nonzero(finite))} non-finite value(s) "
        f"(NaN/Inf); the first is {g32[first]} at flat index {first}. Nothing was updated: skip this step "
        "(loss-scale overflow?) or find where the NaN comes from."
    )


# ---- the states object's interface (what `Backend.adamw_states` returns) --------------------------------------


class AdamWStates(Protocol):
    """Zero-initialised AdamW states of a list of tensors, held where the backend computes."""

    sizes: list[int]  # elements per tensor
    state_bits: int  # 32 or 8
    nbytes: int  # bytes of state, alignment included
    pageable: bool  # states in managed memory that page_out() can move to the host
    resident: bool  # on the device the step runs on (host memory counts as resident for the numpy backend)

    def page_in(self) -> None:
        """Bring the states to the device (DeviceMemoryError when free memory is short); a no-op where they live."""
        ...

    def page_out(self, sync: bool = True) -> None:
        """Move the states to host memory (ValueError unless pageable); with sync, done on return."""
        ...

    def location(self) -> str:
        """Where the states were last put: "host" or "device"."""
        ...

    def free_bytes(self) -> int:
        """Free device memory as this object sees it (0 on the host)."""
        ...

    def export(self) -> list[dict[str, np.ndarray]]:
        """Host copies of every tensor's states, by STATE_NAMES[state_bits] (layout in `state_layout`)."""
        ...

    def load(self, arrays: list[dict[str, np.ndarray]]) -> None:
        """Write host arrays (checked by the caller against `state_layout`) into the states."""
        ...
