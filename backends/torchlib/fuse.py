"""The non-GEMM work of each decoder block fused: by own CUDA kernels (``fuse_kernels``) or by torch.compile.

``fuse_kernels(model)`` (the cupy backend's default, app/model.py) swaps, in place, every RMSNorm of a LLaMA-family
model for ``FusedRMSNorm`` (the same weight Parameter under the same name: state-dict keys unchanged) and every
SwiGLU MLP's forward for one that computes silu(gate) * up in one launch; both are autograd Functions over
backends/cupy_backend/decoder.py (kernels/rmsnorm.cu, swiglu.cu: one launch forward, one backward, where eager
transformers runs 8 and ~12 for a norm).  The math is transformers' (the .cu headers say where the roundings fall):
equal to it within a few units of the last place, not bit for bit.  A module whose weight trains, or whose inputs
are not CUDA tensors of the weight's dtype, runs the eager formula.

A LLaMA block in eager PyTorch runs its normalisations and activations as chains of small memory-bound kernels
(RMSNorm alone: upcast, square, mean, rsqrt, two multiplies, downcast).  ``fuse_blocks(model)`` compiles, in place
(``nn.Module.compile``: names and state-dict keys unchanged), each block's attention, MLP and RMSNorm modules and the
final norm, so inductor fuses those chains into a few kernels around the QLoRA layers, which it calls through the
``qlora::linear`` custom operator (ops.py) without a graph break.  The block's own ``__call__`` stays eager, so
gradient checkpointing (transformers wraps it there) keeps working and recomputes through the compiled modules.
Static shapes (``dynamic=False``): each new sequence length compiles once; pad or bucket lengths.
"""

from __future__ import annotations

import types

import torch
from torch import nn

PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")


def decoder_blocks(model) -> list[nn.Module]:
    """The decoder blocks of a LLaMA-family causal LM (model.model.layers)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers: fuse_blocks takes a LLaMA-family causal LM")
    return list(layers)


def fuse_blocks(model, *, backend: str = "inductor", mode: str | None = None) -> int:
    """Compile every block's attention, MLP and norms (and the final norm) in place; returns how many modules."""
    n = 0
    for block in decoder_blocks(model):
        for name in PARTS:
            part = getattr(block, name, None)
            if part is not None:
                part.compile(backend=backend, mode=mode, dynamic=False)
                n += 1
    final = getattr(model.model, "norm", None)
    if final is not None:
        final.compile(backend=backend, mode=mode, dynamic=False)
        n += 1
    return n


# --- own kernels ---------------------------------------------------------------------------------------------------

NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")  # w * (x * rsqrt(mean(x^2) + eps)).to(T), weight in T
MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP")  # down(act(gate(x)) * up(x)); fused when act is silu


def rms_norm_reference(x, weight, eps: float):
    """transformers' LlamaRMSNorm, as its eager ops compute it (the fallback and the tests' reference)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        from backends.cupy_backend.decoder import rmsnorm_forward

        y, rstd = rmsnorm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        from backends.cupy_backend.decoder import rmsnorm_backward

        x, weight, rstd = ctx.saved_tensors
        return rmsnorm_backward(dy, x.contiguous(), weight, rstd), None, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u):
        from backends.cupy_backend.decoder import swiglu_forward

        g, u = g.contiguous(), u.contiguous()
        ctx.save_for_backward(g, u)
        return swiglu_forward(g, u)

    @staticmethod
    def backward(ctx, dh):
        from backends.cupy_backend.decoder import swiglu_backward

        return swiglu_backward(*ctx.saved_tensors, dh)


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fusable(*ts) -> bool:
    return all(t.is_cuda and t.dtype == ts[0].dtype for t in ts) and ts[0].dtype in _KERNEL_DTYPES


class FusedRMSNorm(nn.Module):
    """An RMSNorm (``NORMS``) computed by rmsnorm.cu: the wrapped module's weight Parameter and epsilon."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = norm.variance_epsilon

    def forward(self, x):
        if self.weight.requires_grad or not _fusable(x, self.weight) or torch.compiler.is_compiling():
            return rms_norm_reference(x, self.weight, self.variance_epsilon)
        return _RMSNorm.apply(x, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, fused"


def swiglu(g, u):
    """silu(g) * u: swiglu.cu's one launch for CUDA tensors of one kernel dtype, else the eager ops."""
    if not _fusable(g, u) or torch.compiler.is_compiling():
        return nn.functional.silu(g) * u
    return _SwiGLU.apply(g, u)


def _fused_mlp_forward(self, x):
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def fuse_kernels(model) -> dict[str, int]:
    """Swap the RMSNorms and SwiGLU MLP forwards of ``model`` for the fused ones (module section above), in place;
    returns {"norms": n, "mlps": m}, how many were swapped."""
    norms = []
    for name, module in model.named_modules():
        if type(module).__name__ in NORMS and hasattr(module, "variance_epsilon"):
            norms.append(name)
        elif type(module).__name__ in MLPS and getattr(getattr(module, "config", None), "hidden_act", None) == "silu":
            module.forward = types.MethodType(_fused_mlp_forward, module)
            module.fused_swiglu = True
    for name in norms:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, attr, FusedRMSNorm(getattr(owner, attr)))
    return {"norms": len(norms), "mlps": sum(1 for m in model.modules() if getattr(m, "fused_swiglu", False))}
