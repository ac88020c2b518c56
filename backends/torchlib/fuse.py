"""The non-GEMM work of each decoder block fused: by own CUDA kernels (``fuse_kernels``) or by torch.compile.

``fuse_kernels(model)`` (prepare_model's ``fuse``) swaps, in place, every RMSNorm of a LLaMA-family model for
``FusedRMSNorm`` (the same weight Parameter under the same name: state-dict keys unchanged), every SwiGLU MLP's
forward for one that computes silu(gate) * up in one launch, every attention's rotary embedding of q and k for
one launch, and a causal LM's loss_function for ``causal_lm_loss`` (the token cross-entropy and its logits gradient
read straight from the 16-bit logits, where transformers' ForCausalLMLoss first writes them again in float32); all are
autograd Functions over backends/cupy_backend/decoder.py (kernels/rmsnorm.cu, swiglu.cu, rope.cu, cross_entropy.cu:
one launch forward, one backward, where eager transformers runs 8 and ~12 for a norm, 10 for RoPE).  The math is
transformers' (the .cu headers say where the roundings fall): the norm, the activation and the loss equal to it within
a few units of the last place, not bit for bit; the rotation gives its values exactly, forward and backward, so
``fuse_kernels(model, exact=True)`` swaps only that one and keeps transformers' numerics.  A module whose weight
trains, or whose inputs are not CUDA tensors of one kernel dtype in the kernels' layout, runs the eager formula.

RoPE has no module to swap: the attention's forward calls its modeling module's ``apply_rotary_pos_emb``.  That name
is replaced, once per modeling module, by ``fused_rope_dispatch`` around the original, which runs the kernel only
inside the forward of an attention module that fuse_kernels marked (a context variable says so) and calls the
original everywhere else: other models of the class, torch.compile's tracing, CPU tensors.

A LLaMA block in eager PyTorch runs its normalisations and activations as chains of small memory-bound kernels
(RMSNorm alone: upcast, square, mean, rsqrt, two multiplies, downcast).  ``fuse_blocks(model)`` compiles, in place
(``nn.Module.compile``: names and state-dict keys unchanged), each block's attention, MLP and RMSNorm modules and the
final norm, so inductor fuses those chains into a few kernels around the QLoRA layers, which it calls through the
``qlora::linear`` custom operator (ops.py) without a graph break.  The block's own ``__call__`` stays eager, so
gradient checkpointing (transformers wraps it there) keeps working and recomputes through the compiled modules.
Static shapes (``dynamic=False``): each new sequence length compiles once; pad or bucket lengths.
"""

from __future__ import annotations

import contextvars
import inspect
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

        g, u = g.contiguous(), u.contiguous()  # swiglu.cu's flat layout
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

    fused = "rmsnorm"

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


# --- RoPE ----------------------------------------------------------------------------------------------------------

ATTENTIONS = ("LlamaAttention", "MistralAttention", "Qwen2Attention")  # q, k rotated by apply_rotary_pos_emb
_ROPE_ON = contextvars.ContextVar("qlora_ref_fused_rope", default=False)


def rope_reference(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' apply_rotary_pos_emb, as its eager ops compute it (the tests' reference)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

    def rotate_half(x):
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        from backends.cupy_backend.decoder import rope

        qo, ko = torch.empty_like(q), torch.empty_like(k)  # q's layout (the transposed projection): no copy after
        ctx.save_for_backward(cos, sin)
        ctx.layout = (qo.shape, qo.stride(), ko.shape, ko.stride())
        return rope(q, k, cos, sin, qo, ko)

    @staticmethod
    def backward(ctx, gq, gk):
        from backends.cupy_backend.decoder import rope, rope_fits

        cos, sin = ctx.saved_tensors
        if not rope_fits(gq, gk, cos, sin):
            gq, gk = gq.contiguous(), gk.contiguous()
        qs, qst, ks, kst = ctx.layout  # the inputs' gradients in the outputs' (= the inputs') layout
        dq = torch.empty_strided(qs, qst, dtype=gq.dtype, device=gq.device)
        dk = torch.empty_strided(ks, kst, dtype=gk.dtype, device=gk.device)
        return (*rope(gq, gk, cos, sin, dq, dk, backward=True), None, None)


def _rope_fits(q, k, cos, sin) -> bool:
    from backends.cupy_backend.decoder import rope_fits

    return not (torch.compiler.is_compiling() or cos.requires_grad or sin.requires_grad) and rope_fits(q, k, cos, sin)


def rope(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb (unsqueeze_dim 1): rope.cu's one launch each way where its layout fits
    (decoder.rope_fits; cos and sin constants), else the eager ops (rope_reference).  The same values either way."""
    return _RoPE.apply(q, k, cos, sin) if _rope_fits(q, k, cos, sin) else rope_reference(q, k, cos, sin)


def fused_rope_dispatch(original):
    """``apply_rotary_pos_emb`` for a modeling module: rope.cu inside a marked attention (module docstring),
    ``original`` otherwise."""

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if not torch.compiler.is_compiling() and _ROPE_ON.get() and not args and set(kwargs) <= {"unsqueeze_dim"}:
            if kwargs.get("unsqueeze_dim", 1) == 1 and _rope_fits(q, k, cos, sin):
                return _RoPE.apply(q, k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.original = original
    return apply_rotary_pos_emb


def _rope_attention_forward(self, *args, **kwargs):
    token = _ROPE_ON.set(True)
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        _ROPE_ON.reset(token)


def _fuse_rope(module) -> bool:
    """Mark one attention module (and patch its modeling module once); False if its forward calls no
    apply_rotary_pos_emb."""
    namespace = getattr(inspect.unwrap(type(module).forward), "__globals__", {})  # past its decorators
    fn = namespace.get("apply_rotary_pos_emb")
    if fn is None:
        return False
    if getattr(fn, "original", None) is None:
        namespace["apply_rotary_pos_emb"] = fused_rope_dispatch(fn)
    module.forward = types.MethodType(_rope_attention_forward, module)
    return True


# --- the LM's loss -------------------------------------------------------------------------------------------------


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, target, ignore_index):
        from backends.cupy_backend.decoder import cross_entropy_forward

        loss, lse = cross_entropy_forward(z, target, ignore_index)
        ctx.save_for_backward(z, target, lse)
        ctx.ignore_index = ignore_index
        return loss

    @staticmethod
    def backward(ctx, g):
        from backends.cupy_backend.decoder import cross_entropy_backward

        z, target, lse = ctx.saved_tensors
        return cross_entropy_backward(z, target, lse, g.float().contiguous(), ctx.ignore_index), None, None


def causal_lm_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **kw):
    """transformers' ForCausalLMLoss (labels shifted by one, the mean over the scored tokens, or their sum over
    ``num_items_in_batch``) with cross_entropy.cu reading the logits as they come: no float32 copy of tokens x
    vocab.  The eager formula where the kernel does not apply (CPU tensors, other dtypes, torch.compile's tracing)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    if not _fusable(logits) or torch.compiler.is_compiling():
        return ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                               ignore_index=ignore_index, shift_labels=shift_labels, **kw)  # fmt: skip
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    target = shift_labels.reshape(-1).to(device=logits.device, dtype=torch.int64).contiguous()
    total = _CrossEntropy.apply(logits.reshape(-1, vocab_size).contiguous(), target, int(ignore_index)).sum()
    if num_items_in_batch is None:
        return total / (target != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _fuse_loss(model) -> bool:
    """A causal LM's loss_function set to causal_lm_loss (True also when it already was)."""
    if not type(model).__name__.endswith("ForCausalLM") or getattr(model, "loss_type", None) not in (
        None,
        "ForCausalLM",
    ):
        return False
    if not isinstance(getattr(type(model), "loss_function", None), property):
        return False
    model.loss_function = causal_lm_loss
    return True


# --- the swap ------------------------------------------------------------------------------------------------------


def fuse_kernels(model, *, exact: bool = False) -> dict[str, int]:
    """Swap the RMSNorms, SwiGLU MLP forwards, RoPE and a causal LM's loss of ``model`` for the fused ones (module
    docstring), in place; ``exact=True``: RoPE only (transformers' values).  Returns {"norms", "mlps", "ropes",
    "losses"}: how many of each the model runs fused, counting those an earlier call swapped."""
    norms = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if getattr(module, "fused", None) is not None:
            continue
        if kind in ATTENTIONS and _fuse_rope(module):
            module.fused = "rope"
        elif exact:
            continue
        elif kind in NORMS and hasattr(module, "variance_epsilon"):
            norms.append(name)
        elif kind in MLPS and getattr(getattr(module, "config", None), "hidden_act", None) == "silu":
            module.forward = types.MethodType(_fused_mlp_forward, module)
            module.fused = "swiglu"
    for name in norms:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, attr, FusedRMSNorm(getattr(owner, attr)))
    swapped = getattr(model, "_loss_function", None) is causal_lm_loss
    losses = int(swapped) if exact else int(_fuse_loss(model))
    kinds = [getattr(m, "fused", None) for m in model.modules()]
    return {"norms": kinds.count("rmsnorm"), "mlps": kinds.count("swiglu"), "ropes": kinds.count("rope"),
            "losses": losses}  # fmt: skip
