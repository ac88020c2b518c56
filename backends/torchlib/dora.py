"""The DoRA layer: QLoRALinear plus PEFT's trainable magnitude vector (specs/dora.md, the spec is qlora_ref/dora.py).

    V   = W_hat + s B A               W_hat = dequantize(q), in the shared scratch (layer.dequantized(), BW-7)
    n_o = ||V[o, :]||_2               (out,) over the input dimension, block-row by block-row (DORA-1, DORA-2)
    g   = m / n                       m = lora_magnitude_vector (out,), trainable; n detached (DORA-6)
    y   = (x - xd) W_hat^T + g * z + b,   z = xd W_hat^T + s (xd A^T) B^T        (DORA-4; p = 0: y = g * z + b)

Backward (DORA-5), dY (M, out), gy = g * dY:

    dm = sum_M (dY * z) / n       dB = s gy^T u       dA = (s gy B)^T xd
    dX = dY W_hat + ((gy - dY) W_hat + s gy B A) * mask          (p = 0: gy W_hat + s gy B A)

The dequantized weight is never stored: W_hat lives in the one scratch buffer every QLoRA layer shares
(``QLoRALinear.dequantized``, the backend's own launch, numpy or CuPy), and the norm walks it ``block_rows`` rows at a
time so that V never exists beyond one block (DORA-2).  Saved for backward: x, u = xd A^T (M, r) and n (out,); z is
recomputed in backward from a second dequantization (one more GEMM, instead of an (M, out) activation).  The norm and
g are float32 (the LoRA dtype) whatever the compute dtype.

The layer runs eagerly: under ``torch.compile`` its forward is excluded from tracing (``torch.compiler.disable``), a
graph break, since the QLoRA custom operators (ops.py) carry LoRA's math, not DoRA's.
"""

from __future__ import annotations

import torch
from torch import nn

from .dtypes import as_torch_dtype, round_f64
from .layer import QLoRALinear

DEFAULT_BLOCK_ELEMENTS = 1 << 20  # rows per norm step: max(1, this // in) (4 MiB of float32 V at a time)


def weight_norm(W: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, block_rows=None):
    """n_o = ||W[o] + s (B A)[o]||_2 (out,), a block of rows at a time, in the wider of W's and the LoRA dtype (DORA-2).

    Returns a detached tensor: DoRA treats the norm as a constant (DORA-6)."""
    out_f, in_f = W.shape
    dt = torch.promote_types(W.dtype, lora_A.dtype)
    step = block_rows or max(1, DEFAULT_BLOCK_ELEMENTS // in_f)
    A = lora_A.detach().to(dt)  # (r, in)
    n = torch.empty(out_f, dtype=dt, device=W.device)  # (out,)
    for o0 in range(0, out_f, step):
        V = W[o0 : o0 + step].to(dt) + scaling * (lora_B.detach()[o0 : o0 + step].to(dt) @ A)  # (rows, in)
        n[o0 : o0 + step] = torch.linalg.vector_norm(V, dim=1)
    return n


class DoRAFunction(torch.autograd.Function):
    """y = (x - xd) W_hat^T + g * (xd W_hat^T + s u B^T) + b (module docstring); saves x, u and n."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, magnitude, layer, seed):
        x2 = x.reshape(-1, layer.in_features)  # (M, in)
        noise = layer.noise(x2.shape, seed, lora_A.dtype) if seed is not None else None
        W = layer.dequantized()  # (out, in) compute dtype, in the shared scratch
        n = weight_norm(W, lora_A, lora_B, layer.scaling, layer.block_rows)  # (out,)
        g = magnitude.detach().to(n.dtype) / n  # (out,)
        xl = x2.to(lora_A.dtype)
        xd = xl * noise if noise is not None else xl  # (M, in)
        u = torch.mm(xd, lora_A.t())  # (M, r)
        z = torch.mm(xd.to(W.dtype), W.t()).to(n.dtype) + layer.scaling * torch.mm(u, lora_B.t()).to(n.dtype)
        y = g * z  # (M, out)
        if noise is not None:  # the base term sees x, the DoRA correction xd (PEFT's form)
            y = y + torch.mm(x2 - xd.to(W.dtype), W.t()).to(n.dtype)  # (M, out)
        if layer.bias is not None:
            y = y + layer.bias.to(n.dtype)
        ctx.save_for_backward(x, u, n, lora_A, lora_B, magnitude)
        ctx.layer, ctx.seed = layer, seed
        return y.to(x.dtype).view(*x.shape[:-1], layer.out_features)

    @staticmethod
    def backward(ctx, dY):
        x, u, n, lora_A, lora_B, magnitude = ctx.saved_tensors
        layer, seed, s = ctx.layer, ctx.seed, ctx.layer.scaling
        x2 = x.reshape(-1, layer.in_features)  # (M, in)
        noise = layer.noise(x2.shape, seed, lora_A.dtype) if seed is not None else None
        xl = x2.to(lora_A.dtype)
        xd = xl * noise if noise is not None else xl  # (M, in), the forward's drop(x)
        W = layer.dequantized()  # (out, in), dequantized again
        dY2 = dY.reshape(-1, layer.out_features).to(n.dtype)  # (M, out)
        g = magnitude.to(n.dtype) / n  # (out,)
        z = torch.mm(xd.to(W.dtype), W.t()).to(n.dtype) + s * torch.mm(u, lora_B.t()).to(n.dtype)  # (M, out)
        dm = (dY2 * z).sum(0) / n  # (out,)
        gy = dY2 * g  # (M, out)
        gyl = gy.to(lora_B.dtype)
        dB = s * torch.mm(gyl.t(), u)  # (out, r)
        du = s * torch.mm(gyl, lora_B)  # (M, r)
        dA = torch.mm(du.t(), xd)  # (r, in)
        dX = None
        if ctx.needs_input_grad[0]:
            if noise is None:
                dX = torch.mm(gy.to(W.dtype), W).to(du.dtype) + torch.mm(du, lora_A)  # (M, in)
            else:
                dXd = torch.mm((gy - dY2).to(W.dtype), W).to(du.dtype) + torch.mm(du, lora_A)  # (M, in)
                dX = torch.mm(dY2.to(W.dtype), W).to(du.dtype) + dXd * noise
            dX = dX.to(x.dtype).view(x.shape)
        return dX, dA.to(lora_A.dtype), dB.to(lora_B.dtype), dm.to(magnitude.dtype), None, None


class DoRALinear(QLoRALinear):
    """A QLoRALinear with PEFT's DoRA magnitude ``lora_magnitude_vector`` (out,), trainable, in the LoRA dtype.

    Same constructor as QLoRALinear (``from_linear`` too), plus ``block_rows`` (rows per norm step; None: about 1M
    elements at a time).  The magnitude is initialised to ||W_hat + s B A||_row of the adapter as constructed
    (DORA-3: with PEFT's B = 0, the layer starts equal to the base); call ``reset_magnitude()`` after changing A or B
    by hand (LoftQ does).
    """

    def __init__(self, q, *, block_rows: int | None = None, **kw):
        super().__init__(q, **kw)
        bad = isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1
        if block_rows is not None and bad:
            raise ValueError(f"block_rows must be a positive int (rows per norm step) or None, got {block_rows!r}")
        self.block_rows = block_rows
        self.lora_magnitude_vector = nn.Parameter(
            torch.empty(self.out_features, device=self.device, dtype=self.lora_A.dtype)
        )
        self.reset_magnitude()

    def weight_norm(self) -> torch.Tensor:
        """n = ||W_hat + s B A||_row (out,), float32 (or float64 for float64 compute), detached (DORA-2, DORA-6)."""
        return weight_norm(self.dequantized(), self.lora_A, self.lora_B, self.scaling, self.block_rows)

    def reset_magnitude(self) -> None:
        """m = ||W_hat + s B A||_row of the current adapter (DORA-3), so that g = 1."""
        with torch.no_grad():
            self.lora_magnitude_vector.copy_(self.weight_norm().to(self.lora_magnitude_vector.dtype))

    def merged_weight(self, dtype=torch.float32) -> torch.Tensor:
        """W' = T(g[:, None] * (W_hat + s B A)), float64 throughout, one rounding to T (DORA-7)."""
        with torch.no_grad():
            V = self.dequantize_weight(torch.float32).double()  # (out, in)
            V += self.scaling * torch.mm(self.lora_B.double(), self.lora_A.double())
            g = self.lora_magnitude_vector.double() / torch.linalg.vector_norm(V, dim=1)  # (out,)
            return round_f64(g[:, None] * V, as_torch_dtype(dtype))

    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input's last dimension is {x.shape[-1]}, this layer takes {self.in_features}")
        if x.device.type != self.device.type:
            raise ValueError(f"input is on {x.device} but this layer's 4-bit weight is on {self.device}")
        in_dtype = x.dtype
        x = x.to(self.compute_dtype)
        seed = self.call_seed()
        y = DoRAFunction.apply(x, self.lora_A, self.lora_B, self.lora_magnitude_vector, self, seed)
        return y.to(in_dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"
