"""fuse_kernels on the CPU: what it swaps, and that off the GPU the swapped modules compute transformers' own
formula bit for bit (the fused kernels themselves: tests/torchlib/test_fused_decoder_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_DECODER

from backends.torchlib.fuse import (
    FusedRMSNorm,
    causal_lm_loss,
    fuse_kernels,
    rms_norm_reference,
    rope_reference,
    swiglu,
)

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_transformers_rmsnorm_bit_for_bit(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (torch.randn(3, 7, 48) * 4).to(dtype)
    assert torch.equal(rms_norm_reference(x, norm.weight, 1e-5), norm(x))
    assert torch.equal(FusedRMSNorm(norm)(x), norm(x))  # CPU tensors: the eager formula
    g, u = torch.randn(4, 9).to(dtype), torch.randn(4, 9).to(dtype)
    assert torch.equal(swiglu(g, u), torch.nn.functional.silu(g) * u)


def test_fuse_kernels_swaps_norms_and_mlps_and_keeps_the_model():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_DECODER)).eval()
    ids = torch.randint(0, TINY_DECODER["vocab_size"], (2, 11))
    before, keys = model(input_ids=ids, labels=ids), model.state_dict().keys()
    n = TINY_DECODER["num_hidden_layers"]
    assert fuse_kernels(model) == {"norms": 2 * n + 1, "mlps": n, "ropes": n, "losses": 1}
    assert isinstance(model.model.norm, FusedRMSNorm) and isinstance(model.model.layers[0].input_layernorm,
                                                                     FusedRMSNorm)  # fmt: skip
    assert model.state_dict().keys() == keys
    assert model.loss_function is causal_lm_loss
    after = model(input_ids=ids, labels=ids)  # CPU tensors: transformers' own formulas, loss included
    assert torch.equal(after.logits, before.logits) and torch.equal(after.loss, before.loss)


@pytest.mark.parametrize("argv, want", [([], "exact"), (["--fuse"], True)])
def test_finetune_passes_its_fuse_flag_to_prepare_model(monkeypatch, argv, want):
    """The command's --fuse reaches prepare_model through load_prepared; off (the default) keeps transformers'
    numerics: only the exact kernels ("exact": RoPE)."""
    import backends.torchlib.load as load
    from backends.app.cli import finetune_config_from_argv
    from backends.app.model import load_prepared

    seen = {}
    monkeypatch.setattr(load, "load_model", lambda path, **kw: seen.update(kw) or "model")
    cfg = finetune_config_from_argv(["--backend", "cupy", *argv])
    assert load_prepared(cfg.model, "unused") == "model" and seen["fuse"] is want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_reference_is_transformers_apply_rotary_pos_emb_bit_for_bit(dtype):
    from transformers.models.llama import modeling_llama

    original = getattr(modeling_llama.apply_rotary_pos_emb, "original", modeling_llama.apply_rotary_pos_emb)
    q = torch.randn(2, 5, 4, 16).to(dtype).transpose(1, 2)  # (B, H, S, D) as the attention transposes it
    k = torch.randn(2, 5, 2, 16).to(dtype).transpose(1, 2)
    cos, sin = torch.randn(2, 5, 16).to(dtype), torch.randn(2, 5, 16).to(dtype)
    for ours, theirs in zip(rope_reference(q, k, cos, sin), original(q, k, cos, sin), strict=True):
        assert torch.equal(ours, theirs)


def test_fuse_kernels_exact_marks_only_the_attentions_and_patches_their_module_once():
    """exact=True: RoPE only; the modeling module's apply_rotary_pos_emb is wrapped once (a second model, a second
    call), and on the CPU every model, marked or not, computes what it did before, bit for bit."""
    from transformers.models.llama import modeling_llama

    torch.manual_seed(0)
    a = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_DECODER)).eval()
    b = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_DECODER)).eval()
    ids = torch.randint(0, TINY_DECODER["vocab_size"], (2, 11))
    before_a, before_b = a(input_ids=ids).logits, b(input_ids=ids).logits
    n = TINY_DECODER["num_hidden_layers"]
    assert fuse_kernels(a, exact=True) == {"norms": 0, "mlps": 0, "ropes": n, "losses": 0}
    wrapped = modeling_llama.apply_rotary_pos_emb
    assert wrapped.original is not None and getattr(wrapped.original, "original", None) is None
    assert fuse_kernels(a, exact=True) == {
        "norms": 0,
        "mlps": 0,
        "ropes": n,
        "losses": 0,
    }  # already marked: counted, not redone
    assert fuse_kernels(a) == {"norms": 2 * n + 1, "mlps": n, "ropes": n, "losses": 1}  # the rest added later
    assert modeling_llama.apply_rotary_pos_emb is wrapped
    assert torch.equal(a(input_ids=ids).logits, before_a) and torch.equal(b(input_ids=ids).logits, before_b)


def test_prepare_model_refuses_an_unknown_fuse():
    from backends.torchlib import prepare_model

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_DECODER))
    with pytest.raises(ValueError, match="fuse must be True, False or 'exact'"):
        prepare_model(model, fuse="rope")
