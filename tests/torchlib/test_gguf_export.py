"""GGUF export of the merged model (backends/torchlib/gguf_export.py), read back by three readers.

- llama.cpp's own Python reader (`gguf.GGUFReader`): every tensor bit for bit what was written (Q/K rows in GGML's
  rotary order), the llama metadata and the tokenizer keys;
- transformers' GGUF loader: the weights bit for bit ``merged_state_dict`` at the written dtype (it undoes the Q/K
  permutation), logits equal to the merged model's within float32 rounding of the same weights (64 eps32 of the
  logits' scale, the bound tests/torchlib/test_model_export.py states for a reload), the tokenizer's ids equal;
- the project's own path (`load_model` / `load_tokenizer` on a .gguf: converted once into the model cache).

Most tests use a byte-level BPE tokenizer trained here on a few lines (a few hundred tokens: transformers parses a
GGUF's vocabulary in pure Python, ~20 s per read for SmolLM2's 49,152 tokens on this CPU); the slow test runs the
conftest's tiny model with SmolLM2's own tokenizer.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import TINY_DECODER

from backends.torchlib import load_model, load_tokenizer, prepare_model, qlora_layers
from backends.torchlib.export import merged_state_dict
from backends.torchlib.gguf_export import permute_rotary_rows, write_merged_gguf

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

TEXTS = ["Hello world, this is a tiny tokenizer.", "Reverse the list: 1 2 3 4 5", "The quick brown fox jumps."] * 20
SAMPLES = ["Hello world 12345", "<|im_start|>user\nReverse the list: 3 2 1<|im_end|>", "unseen wörds ünïcode ✓"]
EPS32 = float(np.finfo(np.float32).eps)


def small_tokenizer():
    """A byte-level BPE (GPT-2's split), 300 tokens, SmolLM2's three special tokens first."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk.train_from_iterator(
        TEXTS,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )  # fmt: skip


def qlora_model(vocab: int, tie: bool = True, seed: int = 0):
    """The tiny LLaMA, prepared (NF4, double quant), with random B != 0 so the merge changes every adapted weight."""
    cfg = transformers.LlamaConfig(**{**TINY_DECODER, "vocab_size": vocab}, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    prepare_model(model, r=4, alpha=8)
    torch.manual_seed(seed + 1)
    for m in qlora_layers(model).values():
        m.reset_lora_parameters("random")
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def merged_hf(model, dtype):
    """The merged model as plain transformers in float32 holding merged_state_dict(model, dtype)'s values (widened
    exactly; the model is not cast, which would round its rotary inv_freq buffer to 16 bits too)."""
    cfg = transformers.LlamaConfig(**{k: v for k, v in model.config.to_dict().items() if k != "quantization_config"})
    plain = transformers.LlamaForCausalLM(cfg).eval()
    missing, unexpected = plain.load_state_dict(merged_state_dict(model, dtype), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    plain.tie_weights()
    return plain


def read_back(path, dtype):
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()


@pytest.fixture(scope="module")
def tok():
    return small_tokenizer()


@pytest.fixture(scope="module")
def written(tok, tmp_path_factory):
    """(model, {dtype: path}) — the QLoRA model and its GGUF in bf16 and float32."""
    model = qlora_model(len(tok))
    d = tmp_path_factory.mktemp("gguf")
    return model, {dt: write_merged_gguf(model, tok, d / f"m-{dt}.gguf", dtype=dt) for dt in ("bfloat16", "float32")}


def ids_for(vocab: int):
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(7))


# --- the permutation ---------------------------------------------------------------------------------------------


def test_permutation_by_hand_and_inverted_by_transformers():
    """d = 4: rows [r0, r1, r2, r3] of each head -> [r0, r2, r1, r3]; transformers' loader maps it back exactly."""
    w = np.arange(16, dtype=np.float32).reshape(8, 2)  # 2 heads of d = 4, rows 0..7
    p = permute_rotary_rows(w, 2)
    np.testing.assert_array_equal(p[:, 0], [0, 4, 2, 6, 8, 12, 10, 14])  # rows 0 2 1 3 | 4 6 5 7
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    proc = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((64, 64)).astype(np.float32), rng.standard_normal((32, 64)).astype(np.float32)
    np.testing.assert_array_equal(proc.process(permute_rotary_rows(q, 4), "blk.0.attn_q.weight").weights, q)
    np.testing.assert_array_equal(proc.process(permute_rotary_rows(k, 2), "blk.0.attn_k.weight").weights, k)
    with pytest.raises(ValueError, match="heads"):
        permute_rotary_rows(np.zeros((6, 2), np.float32), 2)  # d = 3 is odd


# --- llama.cpp's reader ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gguf_reader_sees_what_was_written(written, tok, dtype):
    """Every tensor bit for bit (matrices in the dtype, Q/K in GGML's order, norms F32), llama and tokenizer keys."""
    model, paths = written
    r = gguf.GGUFReader(paths[dtype])
    f = {k: v.contents() for k, v in r.fields.items() if k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")}
    assert f["general.architecture"] == "llama"
    assert f["llama.block_count"] == TINY_DECODER["num_hidden_layers"]
    assert f["llama.embedding_length"] == 64 and f["llama.feed_forward_length"] == 192
    assert f["llama.attention.head_count"] == 4 and f["llama.attention.head_count_kv"] == 2
    assert f["llama.rope.dimension_count"] == 16 and f["llama.vocab_size"] == len(tok)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt2"
    assert f["tokenizer.ggml.bos_token_id"] == tok.bos_token_id and f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert r.fields["tokenizer.ggml.tokens"].contents() == [tok.convert_ids_to_tokens(i) for i in range(len(tok))]
    assert f["tokenizer.ggml.token_type"][:3] == [3, 3, 3] and set(f["tokenizer.ggml.token_type"][3:]) == {1}
    want = merged_state_dict(model, getattr(torch, dtype))
    got = {t.name: t for t in r.tensors}
    assert "output.weight" not in got  # tied head
    assert len(got) == len(want)  # lm_head is tied: written once
    for i in range(TINY_DECODER["num_hidden_layers"]):
        for hf, gg, heads in (("self_attn.q_proj", "attn_q", 4), ("self_attn.k_proj", "attn_k", 2),
                              ("self_attn.v_proj", "attn_v", None), ("mlp.down_proj", "ffn_down", None)):  # fmt: skip
            w = want[f"model.layers.{i}.{hf}.weight"]
            t = got[f"blk.{i}.{gg}.weight"]
            assert t.tensor_type.name == {"bfloat16": "BF16", "float32": "F32"}[dtype]
            a = w.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else w.numpy()
            if heads:
                a = permute_rotary_rows(a, heads)
            np.testing.assert_array_equal(np.asarray(t.data).ravel().view(a.dtype).reshape(a.shape), a)
        norm = got[f"blk.{i}.attn_norm.weight"]
        assert norm.tensor_type.name == "F32"
        np.testing.assert_array_equal(np.asarray(norm.data), want[f"model.layers.{i}.input_layernorm.weight"].float())


# --- transformers' GGUF loader ---------------------------------------------------------------------------------------


def test_transformers_reads_the_weights_bit_for_bit(written):
    """Every parameter equals merged_state_dict at bf16, the Q/K permutation undone."""
    model, paths = written
    back = read_back(paths["bfloat16"], torch.bfloat16)
    want = merged_state_dict(model, torch.bfloat16)
    sd = back.state_dict()
    assert back.config.tie_word_embeddings and back.config.num_key_value_heads == 2
    for k, v in want.items():
        assert sd[k].dtype == torch.bfloat16 and torch.equal(sd[k], v), k


def test_logits_equal_the_merged_model(written, tok):
    """float32 file: the QLoRA model's own (unmerged) logits within 64 eps32 of their scale (one float32 rounding of
    each merged weight, then float32 arithmetic); bf16 file: the bf16 merged weights run in float32, the same way."""
    model, paths = written
    ids = ids_for(len(tok))
    ref = logits(model, ids)
    got = logits(read_back(paths["float32"], torch.float32), ids)
    assert (got - ref).abs().max().item() <= 64 * EPS32 * ref.abs().max().item()
    ref16 = logits(merged_hf(model, torch.bfloat16), ids)
    got16 = logits(read_back(paths["bfloat16"], torch.float32), ids)
    assert (got16 - ref16).abs().max().item() <= 64 * EPS32 * ref16.abs().max().item()
    assert (ref16 - ref).abs().max().item() > 0  # the bf16 rounding is visible: the file is not the float32 one


def test_transformers_tokenizer_encodes_the_same(written, tok):
    _, paths = written
    p = paths["bfloat16"]
    back = transformers.AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    for s in SAMPLES:
        assert back(s, add_special_tokens=False)["input_ids"] == tok(s, add_special_tokens=False)["input_ids"], s
        assert back.decode(back(s)["input_ids"]) == tok.decode(tok(s)["input_ids"])
    assert back.eos_token == tok.eos_token and back.bos_token == tok.bos_token


def test_untied_head_writes_output_weight(tok, tmp_path):
    model = qlora_model(len(tok), tie=False, seed=3)
    p = write_merged_gguf(model, tok, tmp_path / "untied.gguf", dtype="float16")
    names = {t.name: t for t in gguf.GGUFReader(p).tensors}
    assert names["output.weight"].tensor_type.name == "F16"
    back = read_back(p, torch.float16)
    assert not back.config.tie_word_embeddings
    assert torch.equal(back.lm_head.weight, merged_state_dict(model, torch.float16)["lm_head.weight"])


# --- the project's own reader ---------------------------------------------------------------------------------------


def test_project_loader_reads_it(written, tok, tmp_path, monkeypatch):
    """load_model / load_tokenizer on the .gguf (converted into the model cache): the same weights and ids; prepared
    for QLoRA it quantizes like any base."""
    monkeypatch.setenv("QLORA_MODEL_CACHE", str(tmp_path / "cache"))
    model, paths = written
    plain = load_model(paths["bfloat16"], prepare=False, dtype="bfloat16")
    sd = plain.state_dict()
    for k, v in merged_state_dict(model, torch.bfloat16).items():
        assert torch.equal(sd[k], v), k
    back = load_tokenizer(paths["bfloat16"])
    for s in SAMPLES:
        assert back(s)["input_ids"] == tok(s)["input_ids"], s
    prepared = load_model(paths["bfloat16"], backend="numpy", r=2, alpha=4)
    assert len(qlora_layers(prepared)) == len(qlora_layers(model))
    assert torch.isfinite(logits(prepared, ids_for(len(tok)))).all()


# --- bad input ---------------------------------------------------------------------------------------------------


def test_bad_input_is_one_clear_error_and_nothing_written(written, tok, tmp_path):
    model, paths = written
    target = tmp_path / "x.gguf"
    target.write_bytes(b"keep me")
    with pytest.raises(ValueError, match="overwrite=True"):
        write_merged_gguf(model, tok, target)
    assert target.read_bytes() == b"keep me"
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        write_merged_gguf(model, tok, tmp_path / "q.gguf", dtype="q4_0")
    mistral = transformers.MistralForCausalLM(
        transformers.MistralConfig(**{**TINY_DECODER, "vocab_size": len(tok)})
    )  # fmt: skip
    with pytest.raises(ValueError, match="llama architecture.*'mistral'"):
        write_merged_gguf(mistral, tok, tmp_path / "m.gguf")
    with pytest.raises(ValueError, match=r"\.gguf"):
        write_merged_gguf(model, tok, tmp_path / "m.bin")
    assert sorted(os.listdir(tmp_path)) == ["x.gguf"]  # no temporary files left
    write_merged_gguf(model, tok, target, overwrite=True, dtype="float32")
    assert target.read_bytes() == paths["float32"].read_bytes()  # deterministic, and replaced whole
    assert (target.stat().st_mode & 0o777) == (paths["float32"].stat().st_mode & 0o777)


def test_plain_merged_model_is_written_as_is(written, tok, tmp_path):
    """An already merged transformers model (no QLoRA layers) gives the file of the QLoRA model it came from."""
    model, _ = written
    a = write_merged_gguf(merged_hf(model, torch.bfloat16), tok, tmp_path / "plain.gguf", name="m")
    b = write_merged_gguf(model, tok, tmp_path / "qlora.gguf", name="m")
    assert a.read_bytes() == b.read_bytes()


# --- the conftest's tiny model with SmolLM2's tokenizer (slow: transformers parses 49,152 tokens per read) -------


@pytest.mark.slow
def test_tiny_hf_dir_with_smollm2_tokenizer(tiny_hf_dir, tokenizer, tmp_path):
    model = load_model(tiny_hf_dir, backend="numpy", r=4, alpha=8)
    torch.manual_seed(5)
    for m in qlora_layers(model).values():
        m.reset_lora_parameters("random")
    p = write_merged_gguf(model.eval(), tokenizer, tmp_path / "tiny.gguf", dtype="bfloat16")
    back = read_back(p, torch.float32)  # one read (~25 s here): float32 holds every bf16 value exactly
    sd = back.state_dict()
    for k, v in merged_state_dict(model, torch.bfloat16).items():
        assert sd[k].dtype == torch.float32 and torch.equal(sd[k], v.float()), k  # the bf16 bits, widened
    ids = ids_for(len(tokenizer))
    ref16 = logits(merged_hf(model, torch.bfloat16), ids)
    assert (logits(back, ids) - ref16).abs().max().item() <= 64 * EPS32 * ref16.abs().max().item()
    tok_back = transformers.AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    for s in SAMPLES:
        assert tok_back(s)["input_ids"] == tokenizer(s)["input_ids"], s
