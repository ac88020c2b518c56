"""DoRALinear and DoRA adapters (specs/dora.md): the layer against the spec and a dense autograd reference, the
model at init, and PEFT round trips both ways (PEFT computes the same logits from our adapter, we from PEFT's).

Tolerances: float64 layer vs spec / autograd: 2 gamma_k of the abs-graph on each side (k = in + r + out + 8); float32
logits vs PEFT: 64 eps32 of the logits' scale, as for LoRA (tests/torchlib/test_model_export.py, specs/lora.md).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import TINY_DECODER
from safetensors.torch import load_file

import qlora_ref
from backends.torchlib import (
    DoRALinear,
    adapter_prepare_kwargs,
    load_peft_adapter,
    prepare_model,
    qlora_layers,
    save_peft_adapter,
    trainable_parameters,
)
from backends.torchlib.layer import draw_dropout_seed
from qlora_ref.dora import dora_backward, dora_forward

transformers = pytest.importorskip("transformers")
U64 = 2.0**-53
EPS32 = float(np.finfo(np.float32).eps)
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))


def gamma(k, u=U64):
    return k * u / (1 - k * u)


def tiny_llama(seed=0):
    cfg = transformers.LlamaConfig(**TINY_DECODER, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomised(model, seed=1):
    """B != 0 and m != n: the adapter and the magnitude both change the logits."""
    torch.manual_seed(seed)
    for m in qlora_layers(model).values():
        m.reset_lora_parameters("random")
        with torch.no_grad():
            m.lora_magnitude_vector.mul_(torch.empty_like(m.lora_magnitude_vector).uniform_(0.5, 1.5))
    return model


def f64_layer(out_f=12, in_f=40, r=3, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=True)
    layer = DoRALinear.from_linear(lin, r=r, alpha=6, dropout=dropout, lora_dtype="float64", compute_dtype="float64",
                                   block_rows=5)  # fmt: skip
    layer.reset_lora_parameters("random")
    with torch.no_grad():
        layer.lora_magnitude_vector.uniform_(0.5, 2.0)
    return layer


@pytest.mark.parametrize("dropout", [0.0, 0.5])  # 1 / (1 - p) exact in float32 (LORA-3)
def test_layer_matches_the_spec_forward_and_backward(dropout):
    """DORA-2 .. DORA-5: DoRALinear (float64) vs qlora_ref.dora on the layer's own 4-bit state, dropout included
    (the layer's mask redrawn from its seed), within 2 gamma_k of the abs-graph each side."""
    layer = f64_layer(dropout=dropout).train()
    x = torch.randn(5, 40, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(5, 12, dtype=torch.float64)
    torch.manual_seed(11)
    y = layer(x)
    y.backward(dy)
    torch.manual_seed(11)
    seed = draw_dropout_seed() if dropout else None
    keep = None if seed is None else (layer.noise((5, 40), seed, torch.float64) > 0).numpy()
    args = (layer.q, layer.lora_A.detach().numpy(), layer.lora_B.detach().numpy())
    m = layer.lora_magnitude_vector.detach().numpy()
    kw = dict(alpha=6, p=dropout, keep=keep)
    bias = layer.bias.numpy()
    want_y = dora_forward(x.detach().numpy(), *args, m, **kw) + bias
    want = dora_backward(dy.numpy(), x.detach().numpy(), *args, m, **kw)
    got = (x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.lora_magnitude_vector.grad)
    scale = lambda a: np.abs(a).max() + 1.0  # noqa: E731
    k = 40 + 3 + 12 + 8
    np.testing.assert_allclose(y.detach().numpy(), want_y, rtol=0, atol=4 * gamma(k) * 64 * scale(want_y))
    for name, g, w in zip(("dx", "dA", "dB", "dm"), got, want, strict=True):
        np.testing.assert_allclose(g.numpy(), w, rtol=0, atol=4 * gamma(k) * 64 * scale(w), err_msg=name)


def test_magnitude_gradient_matches_autograd_of_a_dense_reference():
    """DORA-5, DORA-6: dm, dA, dB, dx of the hand-derived backward vs torch autograd through the dense float64 map
    y = (m / n.detach()) * (x (W_hat + s B A)^T) + b, and dm differs from the undetached map's gradient."""
    layer = f64_layer()
    x = torch.randn(4, 40, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(4, 12, dtype=torch.float64)
    layer(x).backward(dy)
    W = layer.dequantize_weight(torch.float64)
    A, B, m = (t.detach().clone().requires_grad_() for t in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector))
    x2 = x.detach().clone().requires_grad_()
    V = W + layer.scaling * B @ A
    y = (m / torch.linalg.vector_norm(V, dim=1).detach()) * (x2 @ V.T) + layer.bias
    y.backward(dy)
    for ours, ref in ((x.grad, x2.grad), (layer.lora_A.grad, A.grad), (layer.lora_B.grad, B.grad),
                      (layer.lora_magnitude_vector.grad, m.grad)):  # fmt: skip
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    V = W + layer.scaling * B @ A
    undetached = torch.autograd.grad(((m / torch.linalg.vector_norm(V, dim=1)) * (x2 @ V.T) * dy).sum(), A)[0]
    assert (undetached - A.grad).abs().max() > 1e-6  # the detach is a real choice, and ours is PEFT's


def test_dora_model_starts_equal_to_the_plain_qlora_model():
    """DORA-3: with PEFT's init (B = 0) m = ||W_hat||_row, g = 1, so the DoRA model's logits are QLoRA's."""
    plain, dora = tiny_llama(), tiny_llama()
    prepare_model(plain, r=4, alpha=8)
    prepare_model(dora, r=4, alpha=8, use_dora=True)
    assert dora.qlora_config.use_dora and all(isinstance(m, DoRALinear) for m in qlora_layers(dora).values())
    a, b = logits(plain), logits(dora)
    assert (a - b).abs().max().item() <= 64 * EPS32 * a.abs().max().item()
    names = {n for n, p in dora.named_parameters() if p.requires_grad}
    assert len(trainable_parameters(dora)) == 3 * len(qlora_layers(dora))
    assert sum(n.endswith("lora_magnitude_vector") for n in names) == len(qlora_layers(dora))


def test_peft_loads_our_dora_adapter_and_computes_the_same_logits(tmp_path):
    """DORA-1, DORA-3, DORA-4: save_peft_adapter writes use_dora: true and PEFT's lora_magnitude_vector keys;
    PeftModel.from_pretrained on a base holding our W_hat reproduces our logits (B != 0, m != n)."""
    peft = pytest.importorskip("peft")
    model = tiny_llama(seed=3)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    prepare_model(model, r=4, alpha=8, use_dora=True)
    randomised(model.eval())
    ours = logits(model)
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny-llama")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["peft_type"] == "LORA"
    keys = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    assert len(keys) == 3 * len(qlora_layers(model))

    base = tiny_llama(seed=3)
    sd = dict(original)
    for name, m in qlora_layers(model).items():
        sd[f"{name}.weight"] = m.dequantize_weight(torch.float32)
    base.load_state_dict(sd)
    without = logits(base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    assert peft_model.peft_config["default"].use_dora
    theirs = logits(peft_model)
    scale = ours.abs().max().item()
    assert (theirs - without).abs().max().item() > 1e-3 * scale  # the adapter is active
    assert (theirs - ours).abs().max().item() <= 64 * EPS32 * scale


def test_peft_trained_dora_adapter_loads_into_ours_and_round_trips(tmp_path):
    """DORA-3: a DoRA adapter PEFT wrote (get_peft_model(use_dora=True) on our W_hat, perturbed) loads into a DoRA
    model prepared with adapter_prepare_kwargs and gives PEFT's logits; reloading our own save is bit for bit; a
    plain model refuses a DoRA adapter."""
    peft = pytest.importorskip("peft")
    ours_model = tiny_llama(seed=4)
    original = {k: v.clone() for k, v in ours_model.state_dict().items()}
    prepare_model(ours_model, r=4, alpha=8, use_dora=True)
    base = tiny_llama(seed=4)
    sd = dict(original)
    for name, m in qlora_layers(ours_model).items():
        sd[f"{name}.weight"] = m.dequantize_weight(torch.float32)
    base.load_state_dict(sd)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True))
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.05)
    pm.eval()
    theirs = logits(pm)
    pm.save_pretrained(tmp_path / "peft")

    kw = adapter_prepare_kwargs(tmp_path / "peft")
    assert kw["use_dora"] is True
    load_peft_adapter(ours_model.eval(), tmp_path / "peft")
    ours = logits(ours_model)
    assert (theirs - ours).abs().max().item() <= 64 * EPS32 * theirs.abs().max().item()

    save_peft_adapter(ours_model, tmp_path / "again")
    fresh = tiny_llama(seed=4)
    prepare_model(fresh, **{k: v for k, v in adapter_prepare_kwargs(tmp_path / "again").items() if k != "target"})
    load_peft_adapter(fresh.eval(), tmp_path / "again")
    assert torch.equal(logits(fresh), ours)
    plain = tiny_llama(seed=4)
    prepare_model(plain, r=4, alpha=8)
    with pytest.raises(ValueError, match="use_dora=True"):
        load_peft_adapter(plain, tmp_path / "again")


def test_merged_dora_weight_is_what_the_layer_computes_with():
    """DORA-7: x W'^T + b with W' = merged_weight(float64) matches the layer's forward (float64)."""
    layer = f64_layer()
    x = torch.randn(3, 40, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
        W = layer.merged_weight(torch.float64)
    torch.testing.assert_close(x @ W.T + layer.bias, y, rtol=1e-12, atol=1e-12)
    layer32 = DoRALinear(layer.q, r=3, alpha=6)  # float32 A, B, m: what the spec's merge takes
    with torch.no_grad():
        for a, b in ((layer32.lora_A, layer.lora_A), (layer32.lora_B, layer.lora_B),
                     (layer32.lora_magnitude_vector, layer.lora_magnitude_vector)):  # fmt: skip
            a.copy_(b.float())
    spec = qlora_ref.dora.dora_merge(layer32.q, *(t.detach().numpy() for t in (layer32.lora_A, layer32.lora_B,
                                     layer32.lora_magnitude_vector)), alpha=6)  # fmt: skip
    # float64 throughout, one rounding; the norm's float64 summation order may differ (torch vs numpy): <= 1 ulp
    np.testing.assert_allclose(layer32.merged_weight(torch.float32).numpy(), spec, rtol=EPS32, atol=0)


def test_dora_model_trains_the_magnitude():
    """DORA-5: one backward through a prepared DoRA model reaches every magnitude vector."""
    model = tiny_llama()
    prepare_model(model, r=4, alpha=8, use_dora=True, dropout=0.1, gradient_checkpointing=True)
    model.train()
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    for name, m in qlora_layers(model).items():
        g = m.lora_magnitude_vector.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().max() > 0, name


def test_boundary_errors():
    """DORA-7: bad DoRA settings are refused at the boundary, saying what to pass."""
    with pytest.raises(ValueError, match="use_dora"):
        prepare_model(tiny_llama(), r=4, use_dora="yes")
    q = qlora_ref.quantize_4bit(np.ones((4, 64), np.float32))
    with pytest.raises(ValueError, match="block_rows"):
        DoRALinear(q, r=2, block_rows=0)
