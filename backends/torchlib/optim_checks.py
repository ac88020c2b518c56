"""PagedAdamW's boundary (optim.py): which backend computes on the tensors (clip.py's too), and the checks made
before any state is written.

backend_for(device, backend)     the backend that computes on the tensors' device: the one named, checked against
                                 the device, else the first of BACKENDS whose `placement` is that device type
                                 (numpy for CPU tensors, cupy for CUDA ones)
common_device(params)            the one device every parameter is on (CPU, or one CUDA device)
check_param(i, p)                float32 / bfloat16 / float16 (PARAM_DTYPES), contiguous
check_grad(i, p)                 p.grad dense, contiguous, of p's dtype, shape and device
checked_states(state, params, state_bits)
                                 (steps, host arrays) of a state dict's "state": every parameter present, each step an
                                 int >= 0, each state array of `backends.adamw_state.state_layout`'s dtype and size
                                 for its parameter (32-bit: m, v float32[n]; 8-bit: m_codes, v_codes uint8[n],
                                 m_absmax, v_absmax float32[ceil(n/256)])

Each raises ValueError (TypeError for a dtype or a sparse gradient) naming the parameter by its index.
"""

from __future__ import annotations

import numpy as np
import torch

from backends import BACKENDS, Backend, get_backend, placement
from backends.adamw_state import STATE_NAMES, state_layout

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

__all__ = ["PARAM_DTYPES", "backend_for", "check_grad", "check_param", "checked_states", "common_device"]


def backend_for(device: torch.device, backend: str | Backend | None = None) -> Backend:
    """The backend that computes on ``device``: the one named (checked against the device), else the one of BACKENDS
    whose placement (`backends.placement`) is the tensors' device type (numpy for CPU tensors, cupy for CUDA ones)."""
    if backend is None:
        names = [name for name in BACKENDS if placement(name)[0] == device.type]
        if not names:
            raise ValueError(f"no backend computes on {device} (backends: {BACKENDS}); move the tensors first")
        backend = names[0]
    be = get_backend(backend) if isinstance(backend, str) else backend
    if placement(be)[0] != device.type:
        raise ValueError(f"the {be.name} backend computes on {placement(be)[0]}, but the tensors are on {device}")
    return be


def checked_states(state: dict, params: list[torch.Tensor], state_bits: int):
    """(steps, host arrays) of a state dict's "state", each checked against `state_layout` of its parameter."""
    names = STATE_NAMES[state_bits]
    steps, arrays = [], []
    for i, p in enumerate(params):
        if i not in state:
            raise ValueError(f"state dict has no state for parameter {i} (shape {tuple(p.shape)})")
        entry = state[i]
        missing = [k for k in ("step", *names) if k not in entry]
        if missing:
            raise ValueError(f"state of parameter {i} lacks {missing} (has {sorted(entry)})")
        step = entry["step"]
        step = int(step.item()) if isinstance(step, torch.Tensor) else step
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"state of parameter {i}: step must be an int >= 0, got {entry['step']!r}")
        n = p.numel()
        out = {}
        for k, (dtype, size) in state_layout(n, state_bits).items():
            a = entry[k]
            a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
            if a.dtype != dtype or a.size != size:
                raise ValueError(
                    f"state {k!r} of parameter {i} (shape {tuple(p.shape)}, {n} elements) is "
                    f"{a.dtype}[{a.size}], expected {np.dtype(dtype).name}[{size}]: the state dict belongs to "
                    "different parameters"
                )
            out[k] = np.ascontiguousarray(a.ravel())
        steps.append(step)
        arrays.append(out)
    return steps, arrays


def common_device(params: list[torch.Tensor]) -> torch.device:
    if not params:
        raise ValueError("PagedAdamW got no parameters")
    devices = {p.device for p in params}
    if len(devices) != 1:
        got = sorted(map(str, devices))
        raise ValueError(f"all parameters must be on one device (CPU or one CUDA device), got {got}")
    return devices.pop()


def check_param(i: int, p: torch.Tensor) -> None:
    if p.dtype not in PARAM_DTYPES:
        raise TypeError(f"parameter {i} has dtype {p.dtype}; PagedAdamW takes float32, bfloat16 or float16")
    if not p.is_contiguous():
        raise ValueError(f"parameter {i} (shape {tuple(p.shape)}) is not contiguous; make it contiguous first")


def check_grad(i: int, p: torch.Tensor) -> None:
    g = p.grad
    if g.is_sparse:
        raise TypeError(f"parameter {i} has a sparse gradient; PagedAdamW supports dense gradients only")
    if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
        raise ValueError(
            f"gradient of parameter {i} is {g.dtype}{tuple(g.shape)} on {g.device}, "
            f"expected {p.dtype}{tuple(p.shape)} on {p.device}"
        )
    if not g.is_contiguous():
        raise ValueError(f"gradient of parameter {i} is not contiguous")
    check_param(i, p)
