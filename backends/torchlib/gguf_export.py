"""The merged 16-bit model as one GGUF file, for llama.cpp-style readers (and transformers' GGUF loader).

    write_merged_gguf(model, tokenizer, "runs/merged.gguf", dtype="bfloat16")

The weights are `export.merged_state_dict`'s: every adapted linear W' = round_T(W_hat + s B A), one rounding (LORA-6,
the float32 dequantized base, the sum in float64), never re-quantized; a model without QLoRA layers (an already
merged Hugging Face model) is written as it is, cast to T.  The file holds:

- tensors under llama.cpp's names (``blk.N.attn_q.weight``, ...; the `gguf` package's TensorNameMap), matrices in T
  (F32 / F16 / BF16), 1-D tensors (the RMSNorm weights) in F32 (exact: every T widens to float32 without rounding);
  ``output.weight`` only for an untied head (a reader ties it to ``token_embd.weight`` when absent);
- q_proj and k_proj rows permuted per head from Hugging Face's rotary layout (row i pairs with row i + d/2, the
  ``rotate_half`` convention) to GGML's (row 2i pairs with 2i + 1): new row 2i = old row i, new row 2i + 1 = old row
  i + d/2, d = head_dim, over num_attention_heads heads for Q and num_key_value_heads for K.  transformers' GGUF
  loader applies the inverse, so the round trip gives the original rows bit for bit;
- the llama architecture metadata (context length, sizes, heads, rope base and dimension, the RMSNorm epsilon);
- the tokenizer as ``tokenizer.ggml.*``: model "gpt2" (byte-level BPE), the pre-tokenizer's name, every token by id
  with its type (1 normal, 3 control = special, 4 user-defined = added, not special), the merges, the bos / eos / unk
  / pad ids, whether encoding adds bos / eos, and the chat template.

Atomic: the file is written to a temporary file in the target directory and moved into place with ``os.replace``,
with the user's normal file mode (`files.write_atomically`); an existing file is replaced only with overwrite=True.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .export import merged_state_dict
from .files import write_atomically
from .prepare import qlora_layers

GGUF_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16", "half": "float16",
                  "bf16": "bfloat16"}  # fmt: skip
# The pre-tokenizer (how text is split before the merges) by its llama.cpp name: GPT-2's own split (the byte-level
# pre-tokenizer with its regex), or LLaMA-3's split regex before a byte-level step without one.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4


# --- the boundary ----------------------------------------------------------------------------------------------------


def _resolve_dtype(dtype) -> str:
    name = str(dtype).strip().lower().removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in GGUF_DTYPES:
        raise ValueError(
            f"GGUF export writes float32, float16 or bfloat16 tensors, got dtype={dtype!r}; pick one of those "
            "(quantize the written file with llama.cpp's llama-quantize for Q4/Q8 types)"
        )
    return name


def _check_config(config) -> dict:
    """The llama metadata of a LLaMA-family config, or ValueError naming what this writer cannot express."""
    model_type = getattr(config, "model_type", None)
    if model_type != "llama":
        raise ValueError(
            f"GGUF export writes the llama architecture; this model is {model_type!r}. Export it with "
            "--merged (safetensors) and convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    rope_type = rope.get("rope_type", (getattr(config, "rope_scaling", None) or {}).get("rope_type", "default"))
    problems = []
    if rope_type != "default":
        problems.append(f"rope scaling {rope_type!r}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("attention or MLP biases")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"activation {config.hidden_act!r}")
    if rope_theta is None:
        problems.append("no rope_theta")
    if problems:
        raise ValueError(
            f"GGUF export writes plain LLaMA models; this one has {', '.join(problems)}. Export it with --merged "
            "(safetensors) instead"
        )
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return dict(
        context_length=config.max_position_embeddings,
        embedding_length=config.hidden_size,
        block_count=config.num_hidden_layers,
        feed_forward_length=config.intermediate_size,
        head_count=heads,
        head_count_kv=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        rope_freq_base=float(rope_theta),
        rms_norm_eps=float(config.rms_norm_eps),
        vocab_size=config.vocab_size,
        tied=bool(getattr(config, "tie_word_embeddings", False)),
    )


# --- the weights -----------------------------------------------------------------------------------------------------


def permute_rotary_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's rotary row order -> GGML's, per head: new row 2i = old row i, new row 2i+1 = old row i + d/2.

    w [n_head * d, in]; example with d = 4, rows of one head [r0, r1, r2, r3] -> [r0, r2, r1, r3].
    """
    rows = w.shape[0]
    d = rows // n_head
    if d * n_head != rows or d % 2:
        raise ValueError(f"{rows} rows do not split into {n_head} heads of an even size")
    half = np.arange(d // 2)
    order = np.empty(d, np.int64)
    order[0::2], order[1::2] = half, half + d // 2  # within one head
    index = (np.arange(n_head)[:, None] * d + order[None, :]).ravel()  # (rows,)
    return w[index]


def _state_dict(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The merged tensors (QLoRA model: `merged_state_dict`), or an already merged model's own, cast; tied once."""
    if qlora_layers(model):
        return merged_state_dict(model, dtype)
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), tuple(v.shape))
        if v.numel() and key in seen:
            continue
        seen.add(key)
        out[k] = v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype)
    return out


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    """float32 / float16 as themselves, bfloat16 as its uint16 bits (NumPy has no bf16)."""
    t = t.contiguous()
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def gguf_tensors(model, dtype="bfloat16") -> dict[str, tuple[np.ndarray, str]]:
    """{gguf name: (array, GGML type name)} of the merged model, Q/K rows permuted, in the file's order (`_file_order`:
    the same file whatever order the state dict lists its tensors in)."""
    import gguf

    name = _resolve_dtype(dtype)
    meta = _check_config(model.config)
    tensors = _state_dict(model, getattr(torch, name))
    if meta["tied"]:
        tensors.pop("lm_head.weight", None)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, meta["block_count"])
    out, unmapped = {}, []
    for hf_name, t in tensors.items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            unmapped.append(hf_name)
            continue
        if t.ndim == 1:
            out[gguf_name] = (t.float().numpy(), "F32")  # exact widening of every 16-bit value
            continue
        a = _as_numpy(t)
        if hf_name.endswith("self_attn.q_proj.weight"):
            a = permute_rotary_rows(a, meta["head_count"])
        elif hf_name.endswith("self_attn.k_proj.weight"):
            a = permute_rotary_rows(a, meta["head_count_kv"])
        out[gguf_name] = (a, GGUF_DTYPES[name])
    if unmapped:
        raise ValueError(f"no llama GGUF name for {unmapped[:5]}: this writer handles the LLaMA layout only")
    return dict(sorted(out.items(), key=lambda kv: _file_order(kv[0])))


def _file_order(gguf_name: str) -> tuple:
    """token_embd, then blk.0.*, blk.1.*, ... (by name within a block), then output_norm and output."""
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return (1, int(parts[1]), gguf_name)
    return (0 if parts[0] == "token_embd" else 2, 0, gguf_name)


# --- the tokenizer ---------------------------------------------------------------------------------------------------


def _pre_tokenizer_name(backend_json: dict) -> str:
    pre = backend_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (
        len(steps) == 2
        and steps[0].get("type") == "Split"
        and (steps[0].get("pattern") or {}).get("Regex") == _LLAMA3_SPLIT
        and steps[1].get("type") == "ByteLevel"
        and not steps[1].get("use_regex", True)
    ):
        return "llama-bpe"
    raise ValueError(
        f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:120]}) is neither GPT-2's nor LLaMA-3's split; pass "
        "pre= with its llama.cpp name (tokenizer.ggml.pre)"
    )


def tokenizer_metadata(tokenizer, pre: str | None = None) -> dict:
    """The ``tokenizer.ggml.*`` values of a byte-level BPE tokenizer (a transformers fast tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"GGUF export needs a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    decoder = (spec.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or decoder != "ByteLevel":
        raise ValueError(
            f"GGUF export writes byte-level BPE tokenizers (GPT-2 style: SmolLM2, LLaMA-3); this one is "
            f"{model.get('type')!r} with a {decoder!r} decoder. Export with --merged and convert with llama.cpp"
        )
    vocab = tokenizer.get_vocab()  # token -> id, added tokens included
    n = max(vocab.values()) + 1
    if len(vocab) != n:
        raise ValueError(f"the tokenizer's ids are not 0..{n - 1} without gaps ({len(vocab)} tokens)")
    tokens = [""] * n
    for tok, i in vocab.items():
        tokens[i] = tok
    types = [TOKEN_NORMAL] * n
    for i, added in tokenizer.added_tokens_decoder.items():
        types[i] = TOKEN_CONTROL if added.special else TOKEN_USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    ids = {k: getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "unk", "pad")}
    return dict(
        pre=pre or _pre_tokenizer_name(spec),
        tokens=tokens,
        token_types=types,
        merges=merges,
        ids=ids,
        add_bos=len(full) > len(plain) and full[0] == ids["bos"],
        add_eos=len(full) > len(plain) and full[-1] == ids["eos"],
        chat_template=getattr(tokenizer, "chat_template", None),
    )


# --- the file --------------------------------------------------------------------------------------------------------


def write_merged_gguf(
    model, tokenizer, out_path, *, dtype="bfloat16", overwrite: bool = False, name: str | None = None, pre=None
) -> Path:
    """Write the merged model (QLoRA base + adapter merged, or a merged Hugging Face LLaMA) as one GGUF file.

    model: a prepared QLoRA model (merged here: `merged_state_dict`) or a plain transformers LlamaForCausalLM.
    tokenizer: its transformers fast tokenizer (byte-level BPE).  dtype: "bfloat16" | "float16" | "float32" (or a
    torch dtype).  overwrite: replace an existing file.  name: general.name (default: the config's
    _name_or_path).  pre: the pre-tokenizer's llama.cpp name when it is not GPT-2's or LLaMA-3's split.
    Every check runs before anything is written; ValueError says what to change.
    """
    import gguf

    out = Path(out_path)
    if out.suffix != ".gguf":
        raise ValueError(f"the GGUF output must be a file ending in .gguf, got {str(out)!r}")
    if out.is_dir():
        raise ValueError(f"{str(out)!r} is a directory; pass a file path ending in .gguf")
    if out.exists() and not overwrite:
        raise ValueError(f"{str(out)!r} exists; pass overwrite=True (--overwrite) to replace it")
    dtype_name = _resolve_dtype(dtype)
    meta = _check_config(model.config)
    tensors = gguf_tensors(model, dtype_name)
    tok = tokenizer_metadata(tokenizer, pre)
    if len(tok["tokens"]) > meta["vocab_size"]:
        raise ValueError(f"the tokenizer has {len(tok['tokens'])} tokens, the model's vocabulary {meta['vocab_size']}")

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, arch="llama")
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name or getattr(model.config, "_name_or_path", "") or "qlora-merged")
        w.add_file_type({"float32": gguf.LlamaFileType.ALL_F32, "float16": gguf.LlamaFileType.MOSTLY_F16,
                         "bfloat16": gguf.LlamaFileType.MOSTLY_BF16}[dtype_name])  # fmt: skip
        w.add_context_length(meta["context_length"])
        w.add_embedding_length(meta["embedding_length"])
        w.add_block_count(meta["block_count"])
        w.add_feed_forward_length(meta["feed_forward_length"])
        w.add_head_count(meta["head_count"])
        w.add_head_count_kv(meta["head_count_kv"])
        w.add_rope_dimension_count(meta["head_dim"])
        if meta["head_dim"] * meta["head_count"] != meta["embedding_length"]:
            w.add_key_length(meta["head_dim"])
            w.add_value_length(meta["head_dim"])
        w.add_rope_freq_base(meta["rope_freq_base"])
        w.add_layer_norm_rms_eps(meta["rms_norm_eps"])
        w.add_vocab_size(meta["vocab_size"])
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(tok["pre"])
        w.add_token_list(tok["tokens"])
        w.add_token_types(tok["token_types"])
        w.add_token_merges(tok["merges"])
        for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                         ("pad", w.add_pad_token_id)):  # fmt: skip
            if tok["ids"][key] is not None:
                add(tok["ids"][key])
        w.add_add_bos_token(tok["add_bos"])
        w.add_add_eos_token(tok["add_eos"])
        if tok["chat_template"]:
            w.add_chat_template(tok["chat_template"])
        for gguf_name, (a, ggml_type) in tensors.items():
            w.add_tensor(gguf_name, a, raw_dtype=getattr(gguf.GGMLQuantizationType, ggml_type))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    write_atomically(out, write)
    return out
