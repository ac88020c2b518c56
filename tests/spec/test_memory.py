"""The memory ledger (specs/memory.md): the paper's numbers, exact byte counts against our tensors, bitsandbytes,
transformers and PEFT, and the ledger's arithmetic."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qlora_ref as Q
from qlora_ref import memory as M
from qlora_ref.adamw import AdamW8bitState

GUANACO_65B = M.Recipe(seq_len=16 + 512, batch=1, r=64, lora_dropout=0.05)  # finetune_guanaco_65b.sh: source+target


def test_mem1_bits_per_param_and_the_0373_saving():
    """MEM-1: 4 + 32/64 = 4.5 and 4 + 8/64 + 32/(64*256) = 4.126953125 (the paper's 4.127); saving 0.373 bits."""
    assert M.bits_per_param(64, double_quant=False) == 4.5
    assert M.bits_per_param(64, double_quant=True) == 4.126953125
    saved = M.bits_per_param(double_quant=False) - M.bits_per_param(double_quant=True)
    assert saved == 0.373046875 and round(saved, 3) == 0.373
    assert round(M.bits_per_param(), 3) == 4.127


def test_mem1_double_quant_saves_about_3gb_on_65b():
    """MEM-1, MEM-2: on LLaMA-65B's 64.8e9 quantized weights double quantization saves 0.373/8 bytes each: ~3 GB.
    The exact per-tensor ledger agrees with the asymptotic bits to within the per-tensor rounding (< 1 MB)."""
    with_dq = M.estimate(M.llama_65b, M.Recipe(seq_len=512, batch=1, double_quant=True)).components["base_4bit"]
    without = M.estimate(M.llama_65b, M.Recipe(seq_len=512, batch=1, double_quant=False)).components["base_4bit"]
    saved = without - with_dq
    assert 2.9e9 < saved < 3.1e9
    assert abs(saved - 0.373046875 / 8 * M.llama_65b.n_linear) < 1e6
    assert abs(with_dq - M.bits_per_param() / 8 * M.llama_65b.n_linear) < 1e6


def test_mem11_guanaco_65b_fits_in_48gb():
    """MEM-11: the Guanaco-65B recipe (r=64 on all 7 linears, bf16 adapters, paged 32-bit AdamW, NF4 + double quant,
    gradient checkpointing, batch 1 x 528 tokens) totals under 48 GB, with the 4-bit weights the largest term."""
    led = M.estimate(M.llama_65b, GUANACO_65B)
    assert led.fits(48) and led.total < 48e9
    assert max(led.components, key=led.components.get) == "base_4bit"
    assert 33e9 < led.components["base_4bit"] < 34e9  # 64.76e9 * 4.127 / 8
    assert round(led.total / 1e9, 1) == 46.0 and round(led.components["base_4bit"] / 1e9, 1) == 33.4  # as MEM-11 says
    # 16-bit full finetuning of the same model: weights and grads in 16 bits plus float32 Adam m and v: > 780 GB
    assert M.llama_65b.n_params * (2 + 2 + 8) > 780e9


def test_mem11_guanaco_33b_fits_a_24gb_card_with_paging():
    """MEM-11: Guanaco-33B on one 24 GB GPU: what must stay resident once the paged optimizer state is evicted fits."""
    led = M.estimate(M.llama_33b, GUANACO_65B)  # the same recipe
    assert led.pageable == led.components["optimizer"] > 0
    assert led.fits(24, allow_paging=True)
    assert led.resident == led.total - led.pageable
    assert round(led.resident / 1e9, 1) == 20.8 and round(led.pageable / 1e9, 1) == 3.9  # the figures MEM-11 quotes


def test_mem3_preset_parameter_counts_are_llama_1():
    """MEM-3: the presets reproduce LLaMA-1's parameter counts (as Hugging Face reports them)."""
    assert M.llama_7b.n_params == 6_738_415_616
    assert M.llama_13b.n_params == 13_015_864_320
    assert M.llama_33b.n_params == 32_528_943_616
    assert M.llama_65b.n_params == 65_285_660_672


@given(
    st.integers(1, 5000),
    st.sampled_from([64, 128, 256]),
    st.booleans(),
    st.sampled_from(["float32", "bfloat16"]),
    st.integers(0, 2**32 - 1),
)
def test_mem2_quantized_bytes_equal_our_tensors(n, blocksize, dq, dtype, seed):
    """MEM-2: quantized_bytes(n) is the byte count of the arrays quantize_4bit returns (packed, absmax or
    absmax_q + nested_absmax + float32 offset)."""
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    q = Q.quantize_4bit(Q.f32_to_bf16(x) if dtype == "bfloat16" else x, blocksize=blocksize, double_quant=dq,
                        dtype=dtype)  # fmt: skip
    got = q.packed.nbytes
    got += (q.absmax_q.nbytes + q.nested_absmax.nbytes + 4) if dq else q.absmax.nbytes
    assert M.quantized_bytes(n, blocksize=blocksize, double_quant=dq) == got


@pytest.mark.parametrize("n", [64, 1000, 64 * 256 + 3, 4096 * 11])
@pytest.mark.parametrize("dq", [False, True])
def test_mem2_quantized_bytes_equal_bitsandbytes(n, dq):
    """MEM-2: the same count as bitsandbytes' quantize_4bit state (CPU build)."""
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(torch.randn(n), blocksize=64, compress_statistics=dq, quant_type="nf4")
    got = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    if dq:
        got += state.state2.absmax.numel() * state.state2.absmax.element_size() + state.offset.element_size()
    assert M.quantized_bytes(n, blocksize=64, double_quant=dq) == got


def test_mem3_mem4_counts_match_transformers_and_peft():
    """MEM-3, MEM-4: a tiny grouped-query LLaMA built by transformers has ModelShape.n_params parameters, and PEFT's
    LoRA on the seven linears adds exactly n_lora(r) trainable ones; shape_from_dict reads the HF config."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=101, tie_word_embeddings=False,
    )  # fmt: skip
    shape = M.shape_from_dict(cfg.to_dict())
    assert (shape.hidden, shape.kv_heads, shape.vocab) == (64, 2, 101)
    model = LlamaForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == shape.n_params
    r = 8
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=16, target_modules=targets))
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == shape.n_lora(r)


def test_mem6_optimizer_bytes_match_the_8bit_state():
    """MEM-6: 8-bit AdamW keeps 2 bytes + 8/256 per value (AdamW8bitState's arrays), 32-bit AdamW 8 bytes; tensors
    under 4096 values stay 32-bit as in bitsandbytes."""
    for k in (4096, 4097, 64 * 8192):
        s = AdamW8bitState.zeros(k)
        nbytes = s.m_codes.nbytes + s.m_absmax.nbytes + s.v_codes.nbytes + s.v_absmax.nbytes
        assert nbytes == 2 * k + 8 * math.ceil(k / 256)
    tiny = M.ModelShape("tiny", hidden=64, intermediate=128, layers=1, heads=4, kv_heads=4, vocab=10)
    small = M.Recipe(seq_len=8, batch=1, r=2)  # every adapter tensor < 4096 values: 8-bit falls back to 32-bit
    opt8 = M.optimizer_bytes(tiny, replace(small, optimizer="adamw_8bit"))
    assert opt8 == M.optimizer_bytes(tiny, replace(small, optimizer="adamw_32bit")) == 8 * tiny.n_lora(2)
    big8 = M.estimate(M.llama_7b, M.Recipe(8, 1, optimizer="adamw_8bit")).components["optimizer"]
    big32 = M.estimate(M.llama_7b, M.Recipe(8, 1, optimizer="adamw_32bit")).components["optimizer"]
    assert abs(big8 / big32 - (2 + 8 / 256) / 8) < 1e-3


@given(
    st.sampled_from(list(M.PRESETS.values())),
    st.integers(1, 4096),
    st.integers(1, 8),
    st.booleans(),
    st.sampled_from(["sdpa", "eager"]),
    st.sampled_from([0.0, 0.1]),
    st.sampled_from(["float32", "bfloat16"]),
)
def test_mem7_mem8_activation_terms_scale_as_derived(shape, seq_len, batch, ckpt, attention, p, lora_dtype):
    """MEM-7, MEM-8: activations and the loss head are linear in batch; checkpointing never costs more; stored
    terms (weights, adapters, optimizer) do not depend on the batch."""
    recipe = M.Recipe(seq_len, 1, checkpointing=ckpt, attention=attention, lora_dropout=p, lora_dtype=lora_dtype)
    one = M.estimate(shape, recipe).components
    many = M.estimate(shape, replace(recipe, batch=batch)).components
    for name in ("activations", "loss_head"):
        assert many[name] == batch * one[name]
    for name in ("base_4bit", "embeddings", "norms", "lora_params", "lora_grads", "optimizer", "dequant_scratch"):
        assert many[name] == one[name]
    full = M.estimate(shape, replace(recipe, batch=batch, checkpointing=False)).components["activations"]
    assert many["activations"] <= full


def test_mem12_ledger_table_and_fits():
    """MEM-12: the table lists every component and the total; fits compares with gb * 10^9."""
    led = M.estimate(M.llama_7b, M.Recipe(seq_len=512, batch=1))
    text = led.table()
    for name in led.components:
        assert name in text
    assert f"{led.total:,}" in text and "resident" in text and str(led) == text
    assert led.fits(led.total / 1e9) and not led.fits(led.total / 1e9 - 1e-9)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(seq_len=0), "seq_len must be a positive integer"),
        (dict(batch=1.5), "batch must be a positive integer"),
        (dict(optimizer="sgd"), "optimizer must be one of"),
        (dict(lora_dtype="float64"), "lora_dtype must be one of"),
        (dict(attention="flash"), "attention must be one of"),
        (dict(lora_dropout=1.0), "lora_dropout"),
    ],
)
def test_mem_rejects_bad_arguments(kwargs, match):
    """MEM-12: bad arguments raise ValueError naming the argument and what it got."""
    with pytest.raises(ValueError, match=match):
        M.Recipe(**{"seq_len": 512, "batch": 1, **kwargs})


def test_mem_rejects_bad_shapes():
    """MEM-3: heads must divide hidden, kv_heads divide heads; estimate wants a ModelShape; bits need ints."""
    with pytest.raises(ValueError, match="heads must divide"):
        M.ModelShape("bad", hidden=100, intermediate=8, layers=1, heads=3, kv_heads=3, vocab=10)
    with pytest.raises(TypeError, match="ModelShape"):
        M.estimate({"hidden": 1}, M.Recipe(seq_len=1, batch=1))
    with pytest.raises(TypeError, match="Recipe"):
        M.estimate(M.llama_7b, dict(seq_len=1, batch=1))
    with pytest.raises(ValueError, match="blocksize"):
        M.bits_per_param(0)
    with pytest.raises(ValueError, match="lacks 'hidden_size'"):
        M.shape_from_dict({})
    with pytest.raises(ValueError, match="gb must be positive"):
        M.estimate(M.llama_7b, M.Recipe(seq_len=1, batch=1)).fits(0)


@pytest.mark.parametrize("lora_dtype", ["float32", "bfloat16"])
def test_mem5_mem9_mem10_grads_loss_head_and_scratch(lora_dtype):
    """MEM-5: one gradient per LoRA parameter in its dtype; MEM-9: (2c + 8) T V for the loss head; MEM-10: the
    dequant scratch is dequant_buffers x c x the largest weight."""
    shape = M.llama_7b
    seq_len, batch = 512, 2
    ledger = M.estimate(shape, M.Recipe(seq_len, batch, r=16, lora_dtype=lora_dtype, dequant_buffers=3))
    l_bytes = 4 if lora_dtype == "float32" else 2
    c = ledger.components
    assert c["lora_grads"] == c["lora_params"] == l_bytes * shape.n_lora(16)
    assert c["loss_head"] == (2 * 2 + 8) * seq_len * batch * shape.vocab
    assert c["dequant_scratch"] == 3 * 2 * shape.hidden * shape.intermediate


def test_mem7_peft_lora_inputs_and_mem10_peft_buffers():
    """MEM-7: PEFT's LoRA branch saves a copy of each adapted input, (1 + l) T n with dropout (bool mask + dropped
    copy), l T n for a cast to another lora_dtype, nothing otherwise; MEM-10: PEFT's layers hold 2 dequantized
    weights; the ledger's activations are the block's terms plus these copies (MEM-8 with checkpointing)."""
    shape, T = M.llama_65b, 512
    h, i = shape.hidden, shape.intermediate
    inputs = 6 * h + i  # q, k, v, gate, up read h values per token, down reads i (o_proj reads h too: 6 of width h)
    plain = M.Recipe(seq_len=T, batch=1)
    assert M.lora_input_bytes(shape, plain) == 0
    assert M.lora_input_bytes(shape, replace(plain, lora_dropout=0.05)) == (1 + 2) * T * inputs
    assert M.lora_input_bytes(shape, replace(plain, lora_dtype="float32")) == 4 * T * inputs
    assert M.dequant_scratch_bytes(shape, plain) == 2 * 2 * h * i
    dropout = replace(plain, lora_dropout=0.05)
    block = M.block_bytes(shape, dropout) + M.lora_input_bytes(shape, dropout)
    in_flight = 2 * 2 * T * (h + i)
    assert M.estimate(shape, dropout).components["activations"] == shape.layers * 2 * T * h + block + in_flight
