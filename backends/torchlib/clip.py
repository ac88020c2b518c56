"""Global-norm gradient clipping (ADAMW-10; QLoRA uses max_grad_norm 0.3), the spec's rule on torch gradients.

    total_norm = f32( sqrt( sum_i sum_j g_ij^2 ) )          squares summed in float64, one rounding to float32
    coef       = f32(max_norm) / (total_norm + f32(1e-6))   float32
    g_i       <- g_i * min(coef, 1)                         float32, every tensor, rounded once to g's dtype

The backend that computes on the gradients' device does it (`Backend.clip_grad_norm_`):

- "numpy" (CPU gradients): ``qlora_ref.adamw.clip_grad_norm`` itself, bit-identical to the spec.
- "cupy" (CUDA gradients): float64 reductions on the device.  Each square of a float32 is exact in float64; the
  float64 sums (numpy's pairwise order in the spec, the GPU's tree order here) each carry a relative error below
  log2(n)*2^-53, so the two float64 totals differ by far less than half a float32 ulp, and their float32 roundings can
  differ only when the exact value sits within that distance of a rounding boundary: total_norm agrees to within 1 ulp
  (almost always 0), coef to within 2 ulp, and each clipped gradient to within 3 ulp (0 whenever total_norm agrees).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from backends import Backend

from .optim_checks import backend_for

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[torch.Tensor] | torch.Tensor,
    max_norm: float = 0.3,
    *,
    error_if_nonfinite: bool = True,
    backend: str | Backend | None = None,
) -> torch.Tensor:
    """Scale the gradients of ``parameters`` in place so their global 2-norm is at most ``max_norm``.

    Returns the float32 norm before clipping (0-dim, on the gradients' device), like torch.nn.utils.clip_grad_norm_.
    Parameters without a gradient are skipped; a NaN/Inf gradient raises NonFiniteError before anything is scaled
    (on CUDA the check is a host synchronisation).  ``error_if_nonfinite=False``: no check and no synchronisation;
    a non-finite norm leaves every gradient as it is (torch's would scale them by NaN), for an optimizer with its
    own check to refuse (PagedAdamW(check_finite="deferred")).  ``backend``: default the one that computes on the
    gradients' device.
    """
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    max_norm = float(max_norm)
    if not np.isfinite(max_norm) or max_norm <= 0:
        raise ValueError(f"max_norm must be positive and finite, got {max_norm!r}")
    if not grads:
        raise ValueError("clip_grad_norm_ got no parameter with a gradient (call backward() first)")
    devices = {g.device for g in grads}
    if len(devices) != 1:
        raise ValueError(f"gradients must be on one device, got {sorted(map(str, devices))}")
    for i, g in enumerate(grads):
        if g.dtype not in _DTYPES or g.is_sparse:
            raise TypeError(f"gradient {i} is {g.layout} {g.dtype}; clip_grad_norm_ takes dense float gradients")
    device = devices.pop()
    total_norm = backend_for(device, backend).clip_grad_norm_(grads, max_norm, error_if_nonfinite=error_if_nonfinite)
    return torch.as_tensor(total_norm, dtype=torch.float32, device=device)
