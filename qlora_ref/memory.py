"""The paper's memory ledger: what QLoRA finetuning keeps on one GPU, term by term (specs/memory.md, MEM-1 .. MEM-12;
DoRA's terms MEM-15).

    bits_per_param(64, double_quant=False) = 4 + 32/64              = 4.5       (MEM-1)
    bits_per_param(64, double_quant=True)  = 4 + 8/64 + 32/(64*256) = 4.127     (MEM-1; saves 0.373 bits/param)

`estimate(shape, Recipe(seq_len=..., batch=...))` adds up, in bytes, for a LLaMA-style decoder (`ModelShape`) trained
the way the Guanaco scripts train it (bitsandbytes' Linear4bit + PEFT's LoRA layers):

    base_4bit          4-bit codes + quantization constants of every q,k,v,o,gate,up,down weight   (MEM-2)
    embeddings         embed_tokens + lm_head in 16 bits (one matrix when tied)                      (MEM-3)
    norms              RMSNorm weights (float32 in QLoRA's recipe)                                   (MEM-3)
    lora_params        r * (in + out) per adapted linear, in lora_dtype                              (MEM-4)
    lora_grads         the same count, in lora_dtype (a gradient has its parameter's dtype)          (MEM-5)
    optimizer          AdamW m and v: 8 bytes/param (32-bit) or 2 bytes + 2 absmax/256 (8-bit)       (MEM-6)
    activations        what autograd saves, all layers or checkpoints + one recomputed layer          (MEM-7, MEM-8)
    loss_head          logits and the cross-entropy's float32 log-probabilities and their gradient    (MEM-9)
    dequant_scratch    16-bit copies of the largest weight, dequantized for a matmul                  (MEM-10)

With ``use_dora`` (DoRA, specs/dora.md) each adapted linear adds its magnitude m (out,): in lora_params,
lora_grads and optimizer like A and B, and the row norms n (out,) its backward keeps, in activations (MEM-15).

Bytes are exact for the stored tensors (MEM-2 .. MEM-6) and a documented model for the transient ones (MEM-7 ..
MEM-10).  GB here is 10^9 bytes, the paper's unit; `fits(gb)` compares against gb * 10^9 (stricter than GiB).
Each term is one function of (shape, recipe); an implementation that keeps memory differently (our layer, its memory
levers, the measured CUDA overhead: backends/torchlib/ledger.py, MEM-13, MEM-14) re-composes these terms.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The model's dimensions live in shapes.py; the ledger's callers read them here too (memory.PRESETS, ...).
from .shapes import (  # noqa: F401
    PRESETS,
    ModelShape,
    _check_positive_int,
    llama_7b,
    llama_13b,
    llama_33b,
    llama_65b,
    shape_from_dict,
)

GB = 10**9
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
OPTIMIZERS = ("adamw_32bit", "paged_adamw_32bit", "adamw_8bit", "paged_adamw_8bit")
ATTENTIONS = ("sdpa", "eager")
MIN_8BIT_SIZE = 4096  # MEM-6: bitsandbytes keeps 32-bit state for tensors with fewer elements
OPTIMIZER_BLOCKSIZE_8BIT = 256
PEFT_DEQUANT_BUFFERS = 2  # MEM-10: forward and backward dequantizations may overlap in the caching allocator


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


# --- the recipe: how the model is trained -------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """The training switches every term depends on (MEM-12).  Defaults: the Guanaco scripts' recipe."""

    seq_len: int  # tokens per sequence
    batch: int  # sequences per step; T = batch * seq_len tokens
    r: int = 64  # LoRA rank, on all seven linears
    checkpointing: bool = True  # HF per-block gradient checkpointing (MEM-8)
    double_quant: bool = True  # 8-bit absmax + float32 nested absmax (MEM-1, MEM-2)
    blocksize: int = 64  # 4-bit quantization block
    lora_dtype: str = "bfloat16"  # adapters and their gradients (qlora.py --bf16)
    optimizer: str = "paged_adamw_32bit"  # one of OPTIMIZERS (MEM-6)
    compute_dtype: str = "bfloat16"  # activations, dequantized weights
    embed_dtype: str = "bfloat16"  # embed_tokens / lm_head (artidoro/qlora casts them back to bf16)
    norm_dtype: str = "float32"  # RMSNorm weights
    lora_dropout: float = 0.0  # PEFT's lora_dropout (MEM-7)
    attention: str = "sdpa"  # "sdpa" (logsumexp state) or "eager" (float32 probs)
    dequant_buffers: int | None = None  # dequantized weights alive at once; None: the layer's own count (MEM-10)
    use_dora: bool = False  # DoRA layers (specs/dora.md): a trainable magnitude per output feature (MEM-15)

    def __post_init__(self) -> None:
        _check_positive_int(seq_len=self.seq_len, batch=self.batch, r=self.r, blocksize=self.blocksize)
        for name in ("lora_dtype", "compute_dtype", "embed_dtype", "norm_dtype"):
            if getattr(self, name) not in BYTES:
                raise ValueError(f"{name} must be one of {tuple(BYTES)}, got {getattr(self, name)!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        n = self.dequant_buffers
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError(f"dequant_buffers must be a non-negative integer or None, got {n!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"use_dora must be True or False, got {self.use_dora!r}")

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def compute_bytes(self) -> int:
        """c = bytes(compute_dtype)"""
        return BYTES[self.compute_dtype]

    @property
    def lora_bytes(self) -> int:
        """l = bytes(lora_dtype)"""
        return BYTES[self.lora_dtype]

    @property
    def norm_dtype_bytes(self) -> int:
        """f = bytes of DoRA's norm n (``dora_norm_dtype_bytes``, MEM-15)."""
        return dora_norm_dtype_bytes(self.compute_dtype, self.lora_dtype)

    @property
    def paged(self) -> bool:
        return self.optimizer.startswith("paged")

    def config(self, shape: ModelShape) -> dict:
        """The resolved configuration a Ledger prints."""
        return dict(
            model=shape.name, r=self.r, seq_len=self.seq_len, batch=self.batch, checkpointing=self.checkpointing,
            double_quant=self.double_quant, blocksize=self.blocksize, lora_dtype=self.lora_dtype,
            optimizer=self.optimizer, compute_dtype=self.compute_dtype, lora_dropout=self.lora_dropout,
            attention=self.attention, use_dora=self.use_dora,
        )  # fmt: skip


# --- the terms: stored tensors (exact) ------------------------------------------------------------------------------
# h = hidden, i = intermediate, a = heads, V = vocab, L = layers, P = shape.n_lora(r), T = batch * seq_len,
# c = bytes(compute_dtype), l = bytes(lora_dtype).


def base_4bit_bytes(shape: ModelShape, recipe: Recipe) -> int:
    """L * sum over the 7 linears of quantized_bytes(in * out) (MEM-2)."""
    kw = dict(blocksize=recipe.blocksize, double_quant=recipe.double_quant)
    return shape.layers * sum(quantized_bytes(fin * fout, **kw) for _, fin, fout in shape.linears())


def embedding_bytes(shape: ModelShape, recipe: Recipe) -> int:
    """bytes(embed_dtype) * V * h * (1 if tied else 2) (MEM-3)."""
    return BYTES[recipe.embed_dtype] * shape.n_embedding


def norm_bytes(shape: ModelShape, recipe: Recipe) -> int:
    """bytes(norm_dtype) * (2L + 1) h (MEM-3)."""
    return BYTES[recipe.norm_dtype] * shape.n_norm


def dora_norm_dtype_bytes(compute_dtype: str, lora_dtype: str) -> int:
    """f = bytes of DoRA's norm n: the wider of compute_dtype and lora_dtype (torch.promote_types; two different
    16-bit types promote to float32), as DoRALinear's weight_norm computes it (MEM-15)."""
    return BYTES[compute_dtype] if compute_dtype == lora_dtype else 4


def dora_magnitude_count(shape: ModelShape) -> int:
    """D = L * sum of the 7 linears' out features = L (3h + 2 kv + 2i): one magnitude value per output feature of
    every adapted linear (MEM-15; PEFT's lora_magnitude_vector, (out,) each)."""
    return shape.layers * sum(fout for _, _, fout in shape.linears())


def trainable_count(shape: ModelShape, recipe: Recipe) -> int:
    """P, plus D with DoRA: every adapter value AdamW updates (MEM-4, MEM-15)."""
    return shape.n_lora(recipe.r) + (dora_magnitude_count(shape) if recipe.use_dora else 0)


def lora_param_bytes(shape: ModelShape, recipe: Recipe) -> int:
    """l * P, or l * (P + D) with DoRA (MEM-4, MEM-15); the gradients are as many, in the same dtype (MEM-5)."""
    return recipe.lora_bytes * trainable_count(shape, recipe)


def optimizer_bytes(shape: ModelShape, recipe: Recipe) -> int:
    """AdamW's m and v (MEM-6).

    32-bit: 8 P (float32 m and v, whatever the parameter dtype); 8 (P + D) with DoRA (MEM-15).
    8-bit:  per adapter tensor of k values, 2k + 8 ceil(k/256) (codes + two float32 absmax per 256) when k >= 4096,
            else 8k (bitsandbytes' min_8bit_size); with DoRA the magnitude m (out,) is one more tensor per linear.
    """
    if recipe.optimizer.endswith("32bit"):
        return 8 * trainable_count(shape, recipe)

    def state(k: int) -> int:
        return 2 * k + 8 * -(-k // OPTIMIZER_BLOCKSIZE_8BIT) if k >= MIN_8BIT_SIZE else 8 * k

    r = recipe.r
    one_block = sum(state(r * fin) + state(fout * r) for _, fin, fout in shape.linears())  # A [r, in], B [out, r]
    if recipe.use_dora:
        one_block += sum(state(fout) for _, _, fout in shape.linears())  # m [out]
    return shape.layers * one_block


# --- the terms: saved and transient tensors (a model of autograd) ---------------------------------------------------


def block_bytes(shape: ModelShape, recipe: Recipe) -> int:
    """What autograd saves in one decoder block for any LoRA layer (MEM-7):

    2 RMSNorms      2 * (4 + c) T h      float32 copy of the input + the normed output
    q, k, v         3 c T h              after RoPE, saved by attention
    attention out   c T h                saved by o_proj
    softmax state   sdpa: 4 T a  |  eager: (4 + c) batch a seq_len^2
    SwiGLU          4 c T i              gate, silu(gate), up, silu(gate)*up
    LoRA A outputs  7 l T r              saved by B
    """
    c, T, h, i, a = recipe.compute_bytes, recipe.tokens, shape.hidden, shape.intermediate, shape.heads
    if recipe.attention == "sdpa":
        softmax_state = 4 * T * a
    else:
        softmax_state = (4 + c) * recipe.batch * a * recipe.seq_len**2
    lora_outputs = 7 * recipe.lora_bytes * T * recipe.r
    return 2 * (4 + c) * T * h + 3 * c * T * h + c * T * h + softmax_state + 4 * c * T * i + lora_outputs


def lora_input_bytes(shape: ModelShape, recipe: Recipe) -> int:
    """PEFT's LoRA branch also saves a copy of each adapted linear's input, n values per token (MEM-7):

    (1 + l) T n   with dropout (a bool mask + the dropped copy)
    l T n         without dropout but lora_dtype != compute_dtype (the cast copy)
    0             otherwise
    """
    if recipe.lora_dropout > 0:
        per_value = 1 + recipe.lora_bytes
    elif recipe.lora_dtype != recipe.compute_dtype:
        per_value = recipe.lora_bytes
    else:
        per_value = 0
    return per_value * recipe.tokens * sum(fin for _, fin, _ in shape.linears())


def dora_norm_bytes(shape: ModelShape, recipe: Recipe) -> int:
    """What a DoRA layer's backward keeps beyond LoRA's x and u, per decoder block (MEM-15):

    f * sum of the 7 linears' out features     the row norms n = ||W_hat + s B A||_row (out,) each, f bytes
                                               (the wider of compute and LoRA dtype); 0 without DoRA

    z = xd W_hat^T + s u B^T (N, out) is recomputed in backward from x and u (DORA-5), not kept.
    """
    if not recipe.use_dora:
        return 0
    return recipe.norm_dtype_bytes * sum(fout for _, _, fout in shape.linears())


def checkpoint_bytes(shape: ModelShape, recipe: Recipe) -> int:
    """The L block inputs that per-block checkpointing keeps: L c T h (MEM-8)."""
    return shape.layers * recipe.compute_bytes * recipe.tokens * shape.hidden


def activation_bytes(shape: ModelShape, recipe: Recipe, *, block: int, checkpoints: int) -> int:
    """MEM-8, from one block's saved bytes and the checkpoints kept on the device:

    without checkpointing   L * block
    with checkpointing      checkpoints + block         (one block recomputed during its backward)
    either way              + 2 c T (h + i)             the residual-stream and MLP gradients in flight
    """
    in_flight = 2 * recipe.compute_bytes * recipe.tokens * (shape.hidden + shape.intermediate)
    saved = checkpoints + block if recipe.checkpointing else shape.layers * block
    return saved + in_flight


def loss_head_bytes(shape: ModelShape, recipe: Recipe) -> int:
    """(2c + 8) T V: logits (c), float32 log-probs (4), their gradient (4), the logits' gradient (c) (MEM-9)."""
    return (2 * recipe.compute_bytes + 8) * recipe.tokens * shape.vocab


def dequant_scratch_bytes(shape: ModelShape, recipe: Recipe, *, buffers: int = PEFT_DEQUANT_BUFFERS) -> int:
    """buffers * c * max(in * out): the largest weight dequantized for a matmul (MEM-10).

    recipe.dequant_buffers, when set, overrides `buffers` (the layer's own count: PEFT's 2 here).
    """
    if recipe.dequant_buffers is not None:
        buffers = recipe.dequant_buffers
    return buffers * recipe.compute_bytes * max(fin * fout for _, fin, fout in shape.linears())


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


def components(shape: ModelShape, recipe: Recipe) -> dict[str, int]:
    """The paper's terms, in bytes, in the ledger's order (MEM-2 .. MEM-10; DoRA's MEM-15 inside them)."""
    block = block_bytes(shape, recipe) + lora_input_bytes(shape, recipe) + dora_norm_bytes(shape, recipe)
    return {
        "base_4bit": base_4bit_bytes(shape, recipe),
        "embeddings": embedding_bytes(shape, recipe),
        "norms": norm_bytes(shape, recipe),
        "lora_params": lora_param_bytes(shape, recipe),
        "lora_grads": lora_param_bytes(shape, recipe),  # MEM-5: one gradient per parameter, in its dtype
        "optimizer": optimizer_bytes(shape, recipe),
        "activations": activation_bytes(shape, recipe, block=block, checkpoints=checkpoint_bytes(shape, recipe)),
        "loss_head": loss_head_bytes(shape, recipe),
        "dequant_scratch": dequant_scratch_bytes(shape, recipe),
    }


def estimate(shape: ModelShape, recipe: Recipe) -> Ledger:
    """The QLoRA training-memory ledger for one GPU (MEM-2 .. MEM-11); paged_* optimizers' bytes are `pageable`."""
    if not isinstance(shape, ModelShape):
        raise TypeError(f"shape must be a ModelShape (e.g. qlora_ref.memory.llama_65b), got {type(shape).__name__}")
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a qlora_ref.memory.Recipe(seq_len, batch, ...), got {type(recipe).__name__}")
    parts = components(shape, recipe)
    pageable = parts["optimizer"] if recipe.paged else 0
    return Ledger(parts, pageable=pageable, config=recipe.config(shape))


__all__ = [
    "GB", "Ledger", "ModelShape", "PRESETS", "Recipe", "activation_bytes", "base_4bit_bytes", "bits_per_param",
    "block_bytes", "checkpoint_bytes", "components", "dequant_scratch_bytes", "dora_magnitude_count",
    "dora_norm_bytes", "dora_norm_dtype_bytes", "embedding_bytes", "estimate", "llama_7b", "llama_13b", "llama_33b",
    "llama_65b", "lora_input_bytes", "lora_param_bytes", "loss_head_bytes", "norm_bytes", "optimizer_bytes",
    "quantized_bytes", "shape_from_dict", "trainable_count",
]  # fmt: skip
