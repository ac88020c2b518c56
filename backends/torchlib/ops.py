"""The QLoRA linear as torch custom operators, so ``torch.compile`` traces through a QLoRA layer without a graph break.

    qlora::linear(x2, A, B, bias, handle, scaling, seed) -> (y, u)               forward (functional.lora_forward)
    qlora::linear_backward(dY2, x2, u, A, B, handle, scaling, seed, need_dx)     -> (dX, dA, dB)

``handle`` names the layer (``register``): the frozen 4-bit weight is the layer's, not an operator input, so the
compiler sees only activations and LoRA parameters (fake implementations give their shapes and dtypes), while the
implementation dequantizes through the layer's bound backend launch.  ``seed``: -1 no dropout, -2 the layer's step
seed (LORA-8), else a host seed.  The two are joined by ``torch.library.register_autograd``.  Eager code takes the
cheaper ``layer.QLoRAFunction`` path; both call the same two functions in functional.py.
"""

from __future__ import annotations

import weakref

import torch

from .functional import lora_backward, lora_forward

_LAYERS: list[weakref.ref] = []  # handle -> the QLoRALinear that owns it


def register(layer) -> int:
    """A handle for ``layer`` (an int the custom operators carry instead of the 4-bit weight)."""
    _LAYERS.append(weakref.ref(layer))
    return len(_LAYERS) - 1


def layer_of(handle: int):
    layer = _LAYERS[handle]() if 0 <= handle < len(_LAYERS) else None
    if layer is None:
        raise RuntimeError(f"QLoRA layer handle {handle} refers to no live layer (the layer was deleted)")
    return layer


@torch.library.custom_op("qlora::linear", mutates_args=())
def linear(
    x2: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    bias: torch.Tensor | None,
    handle: int,
    scaling: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    layer = layer_of(handle)
    noise = layer.dropout_factor(x2.shape, seed, lora_A.dtype) if seed != -1 else None
    return lora_forward(x2, layer.dequantized(), lora_A, lora_B, bias, scaling, noise)


@linear.register_fake
def _(x2, lora_A, lora_B, bias, handle, scaling, seed):
    M = x2.shape[0]
    return x2.new_empty(M, lora_B.shape[0]), x2.new_empty(M, lora_A.shape[0], dtype=lora_A.dtype)


@torch.library.custom_op("qlora::linear_backward", mutates_args=())
def linear_backward(
    dY2: torch.Tensor,
    x2: torch.Tensor,
    u: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    handle: int,
    scaling: float,
    seed: int,
    need_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    layer = layer_of(handle)
    noise = layer.dropout_factor(x2.shape, seed, lora_A.dtype) if seed != -1 else None
    dX, dA, dB = lora_backward(dY2, x2, u, layer.dequantized, lora_A, lora_B, scaling, noise, need_dx)
    return (dX if dX is not None else x2.new_empty(0)), dA, dB


@linear_backward.register_fake
def _(dY2, x2, u, lora_A, lora_B, handle, scaling, seed, need_dx):
    dX = x2.new_empty(x2.shape) if need_dx else x2.new_empty(0)
    return dX, torch.empty_like(lora_A), torch.empty_like(lora_B)


def _setup_context(ctx, inputs, output):
    x2, lora_A, lora_B, _bias, handle, scaling, seed = inputs
    ctx.save_for_backward(x2, output[1], lora_A, lora_B)  # x and u only; A, B are the parameters themselves
    ctx.handle, ctx.scaling, ctx.seed = handle, scaling, seed


def _backward(ctx, dY2, _du):
    x2, u, lora_A, lora_B = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    dX, dA, dB = linear_backward(dY2, x2, u, lora_A, lora_B, ctx.handle, ctx.scaling, ctx.seed, need_dx)
    return (dX if need_dx else None), dA, dB, None, None, None, None


torch.library.register_autograd("qlora::linear", _backward, setup_context=_setup_context)
