"""The non-GEMM work of each decoder block fused by torch.compile: RMSNorm, RoPE, SwiGLU, residual casts.

A LLaMA block in eager PyTorch runs its normalisations and activations as chains of small memory-bound kernels
(RMSNorm alone: upcast, square, mean, rsqrt, two multiplies, downcast).  ``fuse_blocks(model)`` compiles, in place
(``nn.Module.compile``: names and state-dict keys unchanged), each block's attention, MLP and RMSNorm modules and the
final norm, so inductor fuses those chains into a few kernels around the QLoRA layers, which it calls through the
``qlora::linear`` custom operator (ops.py) without a graph break.  The block's own ``__call__`` stays eager, so
gradient checkpointing (transformers wraps it there) keeps working and recomputes through the compiled modules.
Static shapes (``dynamic=False``): each new sequence length compiles once; pad or bucket lengths.
"""

from __future__ import annotations

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
