"""The QLoRA linear's forward and backward as plain torch functions of tensors (specs/lora.md LORA-2..LORA-4).

    y  = x W_hat^T + b + s * u B^T          u = drop(x) A^T            (forward)
    dX = dY W_hat + drop'(s dY B A)                                     (backward, W_hat dequantized again)
    dB = s dY^T u                           dA = (s dY B)^T drop(x)

    x  (M, in) compute dtype      W_hat (out, in) compute dtype, in a scratch buffer (never saved)
    A  (r, in), B (out, r)        LoRA dtype;  u (M, r) LoRA dtype, the only activation saved besides x
    noise (M, in) or None         keep / (1 - p): the dropout mask, redrawn from its seed in backward (LORA-3)

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
    xl = x2.to(lora_A.dtype)  # no copy when LoRA runs in the compute dtype
    xd = xl * noise if noise is not None else xl  # (M, in) drop(x)
    u = torch.mm(xd, lora_A.t())  # (M, r)
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
    xl = x2.to(lora_A.dtype)
    xd = xl * noise if noise is not None else xl  # (M, in), the forward's drop(x)
    dA = torch.mm(du.t(), xd)  # (r, in)
    dX = None
    if need_dx:
        W = weight()  # (out, in), dequantized again
        dX = torch.mm(dY2.to(W.dtype), W)  # (M, in)
        if noise is None and du.dtype == dX.dtype:
            dX.addmm_(du, lora_A)  # one fused GEMM + accumulate (the Guanaco recipe: LoRA in the compute dtype)
        else:
            dXl = torch.mm(du, lora_A)  # (M, in)
            if noise is not None:
                dXl.mul_(noise)
            dX.add_(dXl)  # mixed dtypes: summed in the wider one, rounded once into dX
    return dX, dA.to(lora_A.dtype), dB.to(lora_B.dtype)
