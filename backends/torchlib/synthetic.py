"""LLaMA-shaped QLoRA models with random weights, made on the device one linear at a time (memory and speed runs).

    model = random_qlora_model(qlora_ref.memory.llama_65b, backend="cupy", r=64, lora_dtype="bfloat16")

The skeleton is built by transformers on the meta device (no memory).  Then every decoder linear weight W (out, in)
is drawn W ~ N(0, std^2) in bfloat16 directly on the backend's device, quantized there (NF4 + double quantization
by default) and dropped before the next one is drawn, so the model never exists in 16 bits: the LLaMA-65B shape
would need 130 GB, its 4-bit form is 33.4 GB.  Embeddings and the LM head are N(0, std^2) in the compute dtype,
RMSNorm weights are ones, the rotary tables are computed on the device.  The result is what ``prepare_model``
returns for a real checkpoint (QLoRALinear everywhere but the LM head, ``model.qlora_config`` set).
"""

from __future__ import annotations

import torch
from torch import nn

from .dtypes import DTYPE_NAMES, as_torch_dtype
from .layer import QLoRALinear
from .prepare import QLoRAConfig, _target_names, enable_checkpointing, replace_linears
from .scratch import scratch_buffer


class HostEmbedding(nn.Module):
    """A frozen input embedding whose table lives in pinned host memory.

        out[t] = weight[ids[t]]      gathered on the CPU, then one (T, h) host-to-device copy

    Frozen only (no gradient reaches the table); the ids are read back to the host, one small synchronisation.
    """

    def __init__(self, weight: torch.Tensor, device: torch.device):
        super().__init__()
        table = weight.detach().cpu()
        self.weight = nn.Parameter(table.pin_memory() if torch.cuda.is_available() else table, requires_grad=False)
        self.device = torch.device(device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight.index_select(0, ids.reshape(-1).cpu())  # (T, h)
        return rows.view(*ids.shape, rows.shape[-1]).to(self.device, non_blocking=True)


def llama_config(shape, *, max_positions: int = 4096):
    """A transformers LlamaConfig with the dimensions of a ``qlora_ref.memory.ModelShape`` (sdpa attention)."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=shape.tie_embeddings, use_cache=False,
        attn_implementation="sdpa",
    )  # fmt: skip


def random_qlora_model(
    shape,
    *,
    backend="cupy",
    r: int = 64,
    alpha: float = 16,
    dropout: float = 0.0,
    quant_type: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    lora_dtype="bfloat16",
    compute_dtype=None,
    std: float = 0.02,
    seed: int = 0,
    gradient_checkpointing: bool = True,
    embeddings_on_host: bool = False,
    init_lora: str = "peft",
    progress: bool = False,
):
    """A QLoRA LlamaForCausalLM of `shape` with N(0, std^2) weights, quantized as they are made (module docstring)."""
    import transformers

    from backends import get_backend, placement

    if embeddings_on_host and shape.tie_embeddings:
        raise ValueError("embeddings_on_host needs untied embeddings (the LM head uses the table on the device)")
    be = get_backend(backend) if isinstance(backend, str) else backend
    device = torch.device("cuda", torch.cuda.current_device()) if be.device == "cuda" else torch.device("cpu")
    cdt = as_torch_dtype(compute_dtype if compute_dtype is not None else placement(be)[1])
    ldt = as_torch_dtype(lora_dtype)
    cfg = llama_config(shape)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    gen = torch.Generator(device=device).manual_seed(seed)
    names = _target_names(model, "all-linear")

    def random_quantized(name, linear):
        w = torch.empty(linear.out_features, linear.in_features, device=device, dtype=torch.bfloat16)
        w.normal_(0.0, std, generator=gen)
        q = be.quantize_4bit(w, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
        return QLoRALinear(q, backend=be, r=r, alpha=alpha, dropout=dropout, lora_dtype=ldt, compute_dtype=cdt,
                           init=init_lora)  # fmt: skip

    desc = f"random {shape.name} -> {quant_type}" if progress else None
    largest = replace_linears(model, names, random_quantized, desc=desc)
    for mname, module in model.named_modules():
        if isinstance(module, QLoRALinear):
            continue
        for pname, p in list(module.named_parameters(recurse=False)):
            if p.device.type != "meta":
                continue
            data = torch.empty(p.shape, device=device, dtype=cdt)
            if "norm" in mname or pname != "weight" or p.dim() == 1:
                data.fill_(1.0)
            else:
                data.normal_(0.0, std, generator=gen)
            module._parameters[pname] = nn.Parameter(data, requires_grad=False)
    if shape.tie_embeddings:
        model.tie_weights()
    if embeddings_on_host:
        model.model.embed_tokens = HostEmbedding(model.model.embed_tokens.weight, device)
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=cfg).to(device)  # built off the meta device
    # trainable: only the LoRA A/B each QLoRALinear made; every other parameter was created frozen above
    scratch_buffer(largest, device, cdt)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # return the 16-bit weights' cached blocks: they were transient
    if gradient_checkpointing:
        enable_checkpointing(model, use_reentrant=False)
    model.qlora_config = QLoRAConfig(
        backend=be.name, r=r, alpha=alpha, dropout=dropout, target="all-linear", quant_type=quant_type,
        double_quant=double_quant, blocksize=blocksize, lora_dtype=DTYPE_NAMES[ldt], compute_dtype=DTYPE_NAMES[cdt],
        gradient_checkpointing=gradient_checkpointing, target_modules=names,
    )  # fmt: skip
    return model
