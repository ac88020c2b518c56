"""The memory ledger: what QLoRA finetuning keeps on the GPU, term by term (specs/memory.md, rules MEM-1 .. MEM-12).

    bits_per_param(64, double_quant=False) = 4 + 32/64              = 4.5       (MEM-1)
    bits_per_param(64, double_quant=True)  = 4 + 8/64 + 32/(64*256) = 4.127     (MEM-1; saves 0.373 bits/param)

`estimate(shape, seq_len=..., batch=...)` adds up, in bytes, for a LLaMA-style decoder (`ModelShape`):

    base_4bit          4-bit codes + quantization constants of every q,k,v,o,gate,up,down weight   (MEM-2)
    embeddings         embed_tokens + lm_head in 16 bits (one matrix when tied)                      (MEM-3)
    norms              RMSNorm weights (float32 in QLoRA's recipe)                                   (MEM-3)
    lora_params        r * (in + out) per adapted linear, in lora_dtype                              (MEM-4)
    lora_grads         the same count, in lora_dtype (a gradient has its parameter's dtype)          (MEM-5)
    optimizer          AdamW m and v: 8 bytes/param (32-bit) or 2 bytes + 2 absmax/256 (8-bit)       (MEM-6)
    activations        what autograd saves, all layers or checkpoints + one recomputed layer          (MEM-7, MEM-8)
    loss_head          logits and the cross-entropy's float32 log-probabilities and their gradient    (MEM-9)
    dequant_scratch    16-bit copies of the largest weight, dequantized for a matmul                  (MEM-10)

Bytes are exact for the stored tensors (MEM-2 .. MEM-6) and a documented model for the transient ones (MEM-7 ..
MEM-10).  GB here is 10^9 bytes, the paper's unit; `fits(gb)` compares against gb * 10^9 (stricter than GiB).
The CUDA context and kernels are one measured constant, CUDA_OVERHEAD_BYTES (MEM-14; `qlora memory` adds it, pass
`overhead_bytes`); allocator fragmentation is not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GB = 10**9
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
OPTIMIZERS = ("adamw_32bit", "paged_adamw_32bit", "adamw_8bit", "paged_adamw_8bit")
ATTENTIONS = ("sdpa", "eager")
LAYERS = ("peft", "qlora-ref")
# MEM-14: device memory a CUDA training process holds beyond its tensors, measured on an H100 80GB (torch 2.11 +
# CuPy 14.2, CUDA 13.0 driver, benchmarks/bench_memory.py): the context after the first kernel and cuBLAS handle
# 0.76 GB, plus 0.10 - 0.54 GB outside both allocators once training runs (lazily loaded kernels, driver mappings).
CUDA_OVERHEAD_BYTES = 1_000_000_000
MIN_8BIT_SIZE = 4096  # MEM-6: bitsandbytes keeps 32-bit state for tensors with fewer elements
OPTIMIZER_BLOCKSIZE_8BIT = 256


def _check_positive_int(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def _check_nonneg_int(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")


# --- MEM-1, MEM-2: the 4-bit storage ----------------------------------------------------------------------------


def bits_per_param(blocksize: int = 64, double_quant: bool = True, nested_blocksize: int = 256) -> float:
    """Storage bits per quantized weight, in the limit of large tensors (MEM-1).

    without double quant: 4 + 32/blocksize                           (one float32 absmax per block)
    with double quant:    4 + 8/blocksize + 32/(blocksize*nested)    (8-bit absmax, one float32 per 256 of them)
    """
    _check_positive_int(blocksize=blocksize, nested_blocksize=nested_blocksize)
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * nested_blocksize)
    return 4 + 32 / blocksize


def quantized_bytes(n: int, *, blocksize: int = 64, double_quant: bool = True, nested_blocksize: int = 256) -> int:
    """Exact bytes of one 4-bit tensor of n values, as `Quantized4bit` / bitsandbytes store it (MEM-2).

        packed codes      ceil(n / 2)                 uint8, two codes a byte
        absmax            4 * nblocks                 float32, nblocks = ceil(n / blocksize)      (no double quant)
        absmax_q          nblocks                     uint8                                        (double quant)
        nested_absmax     4 * ceil(nblocks / nested)  float32                                      (double quant)
        offset            4                           float32 scalar                               (double quant)

    The 16-entry code table (64 B) and the 256-entry nested map (1 KiB) per weight are left out (< 1 MB for 65B).
    """
    _check_positive_int(n=n, blocksize=blocksize, nested_blocksize=nested_blocksize)
    nblocks = -(-n // blocksize)
    packed = (n + 1) // 2
    if double_quant:
        return packed + nblocks + 4 * -(-nblocks // nested_blocksize) + 4
    return packed + 4 * nblocks


# --- the model ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """A LLaMA-style decoder: the dimensions that set every memory term."""

    name: str
    hidden: int  # d_model
    intermediate: int  # SwiGLU width (gate/up out, down in)
    layers: int  # decoder blocks
    heads: int  # query heads
    kv_heads: int  # key/value heads (== heads without grouped-query attention)
    vocab: int  # embedding rows
    tie_embeddings: bool = False  # lm_head shares embed_tokens' matrix

    def __post_init__(self) -> None:
        _check_positive_int(
            hidden=self.hidden, intermediate=self.intermediate, layers=self.layers, heads=self.heads,
            kv_heads=self.kv_heads, vocab=self.vocab,
        )  # fmt: skip
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"{self.name}: heads must divide hidden and kv_heads divide heads, got {self}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, in_features, out_features) of one block's seven linears, all quantized and LoRA-adapted."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        return [
            ("q_proj", h, h), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", h, h),
            ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h),
        ]  # fmt: skip

    @property
    def n_linear(self) -> int:
        return self.layers * sum(fin * fout for _, fin, fout in self.linears())

    @property
    def n_embedding(self) -> int:
        return self.vocab * self.hidden * (1 if self.tie_embeddings else 2)

    @property
    def n_norm(self) -> int:
        return (2 * self.layers + 1) * self.hidden  # two RMSNorms per block and the final one

    @property
    def n_params(self) -> int:
        return self.n_linear + self.n_embedding + self.n_norm

    def n_lora(self, r: int) -> int:
        """r * (in + out) summed over every adapted linear (MEM-4)."""
        return self.layers * sum(r * (fin + fout) for _, fin, fout in self.linears())


# LLaMA-1 (Touvron et al., 2023, Table 2), vocabulary 32000, untied embeddings.
llama_7b = ModelShape("llama-7b", hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000)
llama_13b = ModelShape("llama-13b", hidden=5120, intermediate=13824, layers=40, heads=40, kv_heads=40, vocab=32000)
llama_33b = ModelShape("llama-33b", hidden=6656, intermediate=17920, layers=60, heads=52, kv_heads=52, vocab=32000)
llama_65b = ModelShape("llama-65b", hidden=8192, intermediate=22016, layers=80, heads=64, kv_heads=64, vocab=32000)
PRESETS = {s.name: s for s in (llama_7b, llama_13b, llama_33b, llama_65b)}


# --- the ledger ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ledger:
    """Bytes per component, the part a paged optimizer can evict to host memory, and the resolved configuration."""

    components: dict[str, int]
    pageable: int = 0
    config: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.components.values())

    @property
    def resident(self) -> int:
        """The bytes that must stay on the device: total minus what paging can move to the host."""
        return self.total - self.pageable

    def fits(self, gb: float, *, allow_paging: bool = False) -> bool:
        """total (or `resident` with allow_paging) <= gb * 10^9 bytes (MEM-11)."""
        if not gb > 0:
            raise ValueError(f"gb must be positive, got {gb!r}")
        return (self.resident if allow_paging else self.total) <= gb * GB

    def table(self) -> str:
        """The ledger as an aligned text table: component, bytes, GB, share of the total."""
        total = self.total
        rows = [f"{'component':<18}{'bytes':>16}{'GB':>10}{'share':>8}"]
        for name, b in self.components.items():
            rows.append(f"{name:<18}{b:>16,}{b / GB:>10.3f}{b / total:>8.1%}")
        rows.append(f"{'total':<18}{total:>16,}{total / GB:>10.3f}{1:>8.0%}")
        if self.pageable:
            rows.append(f"{'  pageable':<18}{self.pageable:>16,}{self.pageable / GB:>10.3f}")
            rows.append(f"{'  resident':<18}{self.resident:>16,}{self.resident / GB:>10.3f}")
        cfg = ", ".join(f"{k}={v}" for k, v in self.config.items())
        return "\n".join([cfg, *rows])

    def __str__(self) -> str:
        return self.table()


def estimate(
    shape: ModelShape,
    *,
    seq_len: int,
    batch: int,
    r: int = 64,
    checkpointing: bool = True,
    double_quant: bool = True,
    blocksize: int = 64,
    lora_dtype: str = "bfloat16",
    optimizer: str = "paged_adamw_32bit",
    compute_dtype: str = "bfloat16",
    embed_dtype: str = "bfloat16",
    norm_dtype: str = "float32",
    lora_dropout: float = 0.0,
    attention: str = "sdpa",
    dequant_buffers: int | None = None,
    overhead_bytes: int = 0,
    layer: str = "peft",
    step_in_backward: bool = False,
    offload_checkpoints: bool = False,
    embeddings_on_host: bool = False,
) -> Ledger:
    """The QLoRA training-memory ledger for one GPU (MEM-2 .. MEM-11).  Defaults are the Guanaco scripts' recipe.

    T = batch * seq_len tokens, c = bytes(compute_dtype), l = bytes(lora_dtype), h = hidden, i = intermediate,
    a = heads, V = vocab, L = layers, P = shape.n_lora(r).

    base_4bit       = L * sum over the 7 linears of quantized_bytes(in * out)                          (MEM-2)
    embeddings      = bytes(embed_dtype) * V * h * (1 if tied else 2);  norms = bytes(norm_dtype) * (2L+1) h  (MEM-3)
    lora_params     = l * P                                                                              (MEM-4)
    lora_grads      = l * P                                                                              (MEM-5)
    optimizer       = 8 P (32-bit: float32 m and v, whatever the parameter dtype); 8-bit: per adapter tensor of
                      k >= 4096 values 2k + 8 ceil(k/256) (codes + two float32 absmax per 256), else 8k     (MEM-6)
                      paged_* optimizers mark these bytes `pageable` (unified memory the driver may evict).
    layer           = what autograd saves in one decoder block (MEM-7):
                        2 RMSNorms      2 * (4 + c) T h      float32 copy of the input + the normed output
                        q, k, v         3 c T h              after RoPE, saved by attention
                        attention out   c T h                saved by o_proj
                        softmax state   sdpa: 4 T a  |  eager: (4 + c) batch a seq_len^2
                        SwiGLU          4 c T i              gate, silu(gate), up, silu(gate)*up
                        LoRA            7 l T r (the A outputs) + per adapted linear with in features n:
                                        (1 + l) T n with dropout (bool mask + dropped copy), l T n when
                                        lora_dtype != compute_dtype (the cast copy), else 0
    activations     = L * layer                       without checkpointing                            (MEM-8)
                    = L * c T h + layer               with checkpointing: block inputs + one recomputed block
                      + 2 c T (h + i) either way: the residual-stream and MLP gradients in flight
    loss_head       = (2c + 8) T V: logits (c), float32 log-probs (4), their gradient (4), logits grad (c) (MEM-9)
    dequant_scratch = dequant_buffers * c * max(in * out): dequantized weight for forward/backward    (MEM-10)

    Implementation switches (MEM-13): layer="peft" is bitsandbytes + PEFT (the Guanaco scripts: dropout mask and
    dropped copy, cast copies, dequant_buffers 2 by default); layer="qlora-ref" is backends.torchlib.QLoRALinear
    (redraws the dropout mask from a seed and casts transiently: no per_in term; one shared scratch buffer).
    step_in_backward: each gradient is freed by its optimizer step as soon as it exists (PagedAdamW.hook_into_backward),
    so lora_grads = l * the largest adapter tensor.  offload_checkpoints: the L block inputs live in host memory
    (torch.autograd.graph.save_on_cpu around a re-entrant checkpointed forward), dropping L c T h from the device.
    embeddings_on_host: the input table stays in host memory (backends.torchlib.synthetic.HostEmbedding); untied models
    keep only the LM head on the device.
    """
    for name, dt in (("lora_dtype", lora_dtype), ("compute_dtype", compute_dtype), ("embed_dtype", embed_dtype),
                     ("norm_dtype", norm_dtype)):  # fmt: skip
        if dt not in BYTES:
            raise ValueError(f"{name} must be one of {tuple(BYTES)}, got {dt!r}")
    if not isinstance(shape, ModelShape):
        raise TypeError(f"shape must be a ModelShape (e.g. qlora_ref.memory.llama_65b), got {type(shape).__name__}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    _check_positive_int(seq_len=seq_len, batch=batch, r=r, blocksize=blocksize)
    if dequant_buffers is None:
        dequant_buffers = 2 if layer == "peft" else 1
    _check_nonneg_int(dequant_buffers=dequant_buffers, overhead_bytes=overhead_bytes)
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")

    c, lb = BYTES[compute_dtype], BYTES[lora_dtype]
    h, i, a, V, L = shape.hidden, shape.intermediate, shape.heads, shape.vocab, shape.layers
    T = batch * seq_len
    linears = shape.linears()
    P = shape.n_lora(r)

    base_4bit = L * sum(quantized_bytes(fin * fout, blocksize=blocksize, double_quant=double_quant)
                        for _, fin, fout in linears)  # fmt: skip
    if embeddings_on_host and shape.tie_embeddings:
        raise ValueError("embeddings_on_host needs untied embeddings: a tied LM head needs the table on the device")
    embeddings = BYTES[embed_dtype] * (shape.vocab * shape.hidden if embeddings_on_host else shape.n_embedding)
    norms = BYTES[norm_dtype] * shape.n_norm

    if optimizer.endswith("32bit"):
        opt = 8 * P
    else:
        opt = 0
        for _, fin, fout in linears:
            for k in (r * fin, fout * r):  # lora_A [r, in], lora_B [out, r]
                opt += 2 * k + 8 * -(-k // OPTIMIZER_BLOCKSIZE_8BIT) if k >= MIN_8BIT_SIZE else 8 * k
        opt *= L

    if layer == "qlora-ref":
        per_in = 0
    elif lora_dropout > 0:
        per_in = 1 + lb
    elif lora_dtype != compute_dtype:
        per_in = lb
    else:
        per_in = 0
    lora_saved = 7 * lb * T * r + per_in * T * sum(fin for _, fin, _ in linears)
    softmax_state = 4 * T * a if attention == "sdpa" else (4 + c) * batch * a * seq_len**2
    block = 2 * (4 + c) * T * h + 3 * c * T * h + c * T * h + softmax_state + 4 * c * T * i + lora_saved
    in_flight = 2 * c * T * (h + i)
    checkpoints = 0 if offload_checkpoints else L * c * T * h
    activations = (checkpoints + block if checkpointing else L * block) + in_flight
    largest_adapter = max(r * max(fin, fout) for _, fin, fout in linears)

    components = {
        "base_4bit": base_4bit,
        "embeddings": embeddings,
        "norms": norms,
        "lora_params": lb * P,
        "lora_grads": lb * (largest_adapter if step_in_backward else P),
        "optimizer": opt,
        "activations": activations,
        "loss_head": (2 * c + 8) * T * V,
        "dequant_scratch": dequant_buffers * c * max(fin * fout for _, fin, fout in linears),
    }
    if overhead_bytes:
        components["overhead"] = overhead_bytes
    config = dict(
        model=shape.name, r=r, seq_len=seq_len, batch=batch, checkpointing=checkpointing, double_quant=double_quant,
        blocksize=blocksize, lora_dtype=lora_dtype, optimizer=optimizer, compute_dtype=compute_dtype,
        lora_dropout=lora_dropout, attention=attention, layer=layer, step_in_backward=step_in_backward,
        offload_checkpoints=offload_checkpoints, embeddings_on_host=embeddings_on_host,
    )  # fmt: skip
    return Ledger(components, pageable=opt if optimizer.startswith("paged") else 0, config=config)


def shape_from_dict(d: dict) -> ModelShape:
    """ModelShape from a Hugging Face LLaMA config dict (config.json / `config.to_dict()`)."""
    try:
        return ModelShape(
            name=d.get("_name_or_path") or d.get("model_type", "model"),
            hidden=d["hidden_size"], intermediate=d["intermediate_size"], layers=d["num_hidden_layers"],
            heads=d["num_attention_heads"], kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            vocab=d["vocab_size"], tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        )  # fmt: skip
    except KeyError as e:
        raise ValueError(
            f"config dict lacks {e.args[0]!r}; need hidden_size, intermediate_size, ... (LLaMA-style)"
        ) from e


__all__ = [
    "CUDA_OVERHEAD_BYTES", "GB", "Ledger", "ModelShape", "PRESETS", "bits_per_param", "estimate", "llama_7b",
    "llama_13b", "llama_33b", "llama_65b", "quantized_bytes", "shape_from_dict",
]  # fmt: skip
