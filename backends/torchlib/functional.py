"""The QLoRA linear's forward and backward as plain torch functions of tensors (specs/lora.md LORA-2..LORA-4).

    y  = x W_hat^T + b + s * u B^T          u = drop(x) A^T            (forward)
    dX = dY W_hat + drop'(s dY B A)                                     (backward, W_hat dequantized again)
    dB = s dY^T u                           dA = (s dY B)^T drop(x)

    x  (M, in) compute dtype      W_hat (out, in) compute dtype, in a scratch buffer (never saved)
    A  (r, in), B (out, r)        LoRA dtype;  u (M, r) LoRA dtype, the only activation saved besides x
    noise (M, in) or None         keep / (1 - p): the dropout mask, redrawn from its seed in backward (LORA-3);
                                  or a layer.CounterNoise (LORA-8 under a StepSeed), which the backend applies in
                                  place of the tensor products below (the same bits, one launch, no mask stored)

Both the eager autograd function (layer.QLoRAFunction) and the torch custom operators (ops.py, for torch.compile
and CUDA graphs) call these two functions, so the two paths run the same kernels in the same order.
"""

from __future__ import annotations

import torch


def lora_forward(x2, W, lora_A, lora_B, bias, scaling: float, noise):
    """(y, u): y = x W^T + b + s u B^T in the compute dtype, u = drop(x) A^T in the LoRA dtype.  x2 (M, in)."""
    return add_lora(torch.mm(x2, W.t()), x2, lora_A, lora_B, bias, scaling, noise)  # (M, out)


def add_lora(y, x2, lora_A, lora_B, bias, scaling: float, noise):
    """(y, u): y += b + s u B^T in place, u = drop(x) A^T; y (M, out) holds the base product x W^T (a GEMM, or the
    decode path's 4-bit matvec)."""
    if bias is not None:
        y.add_(bias)
    u = torch.mm(drop(x2, lora_A.dtype, noise), lora_A.t())  # (M, r)
    if lora_B.dtype == y.dtype:
        y.addmm_(u, lora_B.t(), alpha=scaling)  # one GEMM accumulating into y
    else:
        y.add_(torch.mm(u * scaling, lora_B.t()))  # (M, out) in the LoRA dtype, one rounding into y
    return y, u


def lora_backward(dY2, x2, u, weight, lora_A, lora_B, scaling: float, noise, need_dx: bool):
    """(dX or None, dA, dB) for dY2 (M, out); ``weight()`` returns W_hat (out, in), dequantized on demand."""
    dYl = dY2.to(lora_B.dtype)
    dB = torch.mm(dYl.t(), u).mul_(scaling)  # (out, r)
    du = torch.mm(dYl, lora_B).mul_(scaling)  # (M, r)
    dA = torch.mm(du.t(), drop(x2, lora_A.dtype, noise))  # (r, in), the forward's drop(x) again
    dX = None
    if need_dx:
        W = weight()  # (out, in), dequantized again
        dX = torch.mm(dY2.to(W.dtype), W)  # (M, in)
        if noise is None and du.dtype == dX.dtype:
            dX.addmm_(du, lora_A)  # one fused GEMM + accumulate (the Guanaco recipe: LoRA in the compute dtype)
        else:
            dXl = torch.mm(du, lora_A)  # (M, in)
            if noise is None or isinstance(noise, torch.Tensor):
                dX.add_(dXl if noise is None else dXl.mul_(noise))  # mixed dtypes: summed in the wider one, once
            else:
                noise.add_dropped_(dX, dXl)
    return dX, dA.to(lora_A.dtype), dB.to(lora_B.dtype)


def drop(x2, dtype, noise):
    """drop(x) in the LoRA dtype: x2.to(dtype) (no copy when it is that dtype), times the noise tensor, or applied by
    a CounterNoise in one launch."""
    if noise is None:
        return x2.to(dtype)
    if isinstance(noise, torch.Tensor):
        return x2.to(dtype) * noise
    return noise.drop(x2, dtype)
