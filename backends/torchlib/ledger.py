"""This implementation's memory ledger: the paper's (qlora_ref.memory) re-composed for how this code trains
(specs/memory.md MEM-13, MEM-14, MEM-16: implementation terms, not the spec's).

    estimate(shape, Recipe(seq_len=512, batch=1), Runtime(layer="qlora-ref", step_in_backward=True))

The spec's terms stay the spec's; what changes, term by term:

    layer="peft"         bitsandbytes + PEFT, the Guanaco scripts: the paper's ledger as it is
    layer="qlora-ref"    QLoRALinear (layer.py): the dropout mask is redrawn from a seed and casts are transient, so
                         activations lose lora_input_bytes; its layers share one scratch buffer: dequant_scratch
                         counts 1 buffer (MEM-10's PEFT count is 2)
    step_in_backward     PagedAdamW.hook_into_backward: adapter gradients are stepped and freed in groups of
                         step_group (16, the hooks' default) as autograd accumulates them: lora_grads = l * the
                         step_group largest adapter tensors (1: the largest alone)
    offload_checkpoints  re-entrant checkpointing under torch.autograd.graph.save_on_cpu: the L c T h block inputs
                         live in host memory (checkpoints = 0 on the device)
    embeddings_on_host   synthetic.HostEmbedding (untied models only): the input table stays in pinned host memory,
                         embeddings = bytes(embed_dtype) * V h (the LM head alone)
    overhead_bytes       the CUDA context, lazily loaded kernels and driver mappings: a measured constant (MEM-14)
    recipe.use_dora      DoRALinear (dora.py): the spec's DoRA terms (MEM-15) plus dora_scratch, the temporaries of
                         one DoRA layer's forward or backward at their peak (MEM-16); PEFT's DoRA layer keeps other
                         tensors and is not modelled (layer="peft" with use_dora is refused)
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora_ref import memory as spec
from qlora_ref.memory import BYTES, GB, Ledger, ModelShape, Recipe

from .dora import DEFAULT_BLOCK_ELEMENTS

LAYERS = ("peft", "qlora-ref")
# MEM-14: device memory a CUDA training process holds beyond its tensors, measured on an H100 80GB (torch 2.11 +
# CuPy 14.2, CUDA 13.0 driver, benchmarks/bench_memory.py): the context after the first kernel and cuBLAS handle
# 0.76 GB, plus 0.10 - 0.54 GB outside both allocators once training runs (lazily loaded kernels, driver mappings).
CUDA_OVERHEAD_BYTES = 1_000_000_000
OUR_DEQUANT_BUFFERS = 1  # MEM-13: QLoRALinear layers share one scratch buffer per (device, dtype)


@dataclass(frozen=True)
class Runtime:
    """How this implementation runs a recipe (MEM-13) and what the process adds (MEM-14)."""

    layer: str = "qlora-ref"  # whose LoRA layer: ours, or bitsandbytes + PEFT ("peft", the paper's)
    step_in_backward: bool = False  # optimizer steps inside backward (PagedAdamW.hook_into_backward)
    step_group: int = 16  # tensors per step inside backward (hook_into_backward's group)
    offload_checkpoints: bool = False  # checkpointed block inputs in host memory
    embeddings_on_host: bool = False  # input embedding table in host memory (untied models)
    overhead_bytes: int = CUDA_OVERHEAD_BYTES  # CUDA context and kernels; 0 for the tensors alone

    def __post_init__(self) -> None:
        if self.layer not in LAYERS:
            raise ValueError(f"layer must be one of {LAYERS}, got {self.layer!r}")
        v = self.overhead_bytes
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"overhead_bytes must be a non-negative integer, got {v!r}")
        g = self.step_group
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ValueError(f"step_group must be a positive integer, got {g!r}")

    def config(self) -> dict:
        group = {"step_group": self.step_group} if self.step_in_backward else {}
        return dict(
            layer=self.layer, step_in_backward=self.step_in_backward, **group,
            offload_checkpoints=self.offload_checkpoints, embeddings_on_host=self.embeddings_on_host,
        )  # fmt: skip


def activation_bytes(shape: ModelShape, recipe: Recipe, runtime: Runtime) -> int:
    """MEM-8 with our layer's block (no per-input copies) and the checkpoints where they live."""
    block = spec.block_bytes(shape, recipe) + spec.dora_norm_bytes(shape, recipe)
    if runtime.layer == "peft":
        block += spec.lora_input_bytes(shape, recipe)
    checkpoints = 0 if runtime.offload_checkpoints else spec.checkpoint_bytes(shape, recipe)
    return spec.activation_bytes(shape, recipe, block=block, checkpoints=checkpoints)


def lora_grad_bytes(shape: ModelShape, recipe: Recipe, runtime: Runtime) -> int:
    """MEM-5, or with steps inside backward a group at a time: l * the step_group largest adapter tensors (A: r x in,
    B: out x r; bounded by all of them)."""
    if not runtime.step_in_backward:
        return spec.lora_param_bytes(shape, recipe)
    sizes = [recipe.r * n for _, fin, fout in shape.linears() for n in (fin, fout)] * shape.layers
    return recipe.lora_bytes * sum(sorted(sizes, reverse=True)[: runtime.step_group])


def embedding_bytes(shape: ModelShape, recipe: Recipe, runtime: Runtime) -> int:
    """MEM-3, or with the input table on the host only the LM head: bytes(embed_dtype) * V h."""
    if not runtime.embeddings_on_host:
        return spec.embedding_bytes(shape, recipe)
    if shape.tie_embeddings:
        raise ValueError("embeddings_on_host needs untied embeddings: a tied LM head needs the table on the device")
    return BYTES[recipe.embed_dtype] * shape.vocab * shape.hidden


# --- MEM-16: DoRALinear's temporaries ---------------------------------------------------------------------------
# T = tokens, f = bytes of n (recipe.norm_dtype_bytes), c = bytes(compute), l = bytes(lora); D = 1 when the compute
# dtype is narrower than f (dY, W_hat rows and the first GEMM are cast to f: one more copy), L = 1 when the LoRA
# dtype is (gy is cast to it), P = 1 with dropout.  Counted from DoRAFunction (dora.py) line by line; every count is
# the tensors alive at once at that function's peak, tested against a measurement of the live tensors.


def dora_layer_scratch(tokens: int, fin: int, fout: int, *, compute_dtype: str, lora_dtype: str, dropout: float,
                       block_rows: int | None = None) -> dict[str, int]:  # fmt: skip
    """Peak bytes of one DoRALinear's temporaries, by phase (MEM-16); the incoming gradient dY is not counted (MEM-8's
    in-flight gradients), nor the (T, in) and (T, r) temporaries LoRA's layer has too.

    norm_blocks  weight_norm, rows = block_rows (default max(1, 2^20 // in)) at a time: the previous block's V
                 stays alive while the next is formed: (D + 3) f rows in (2 or more full blocks; (D + 2) f rows in
                 for a single block, rows + (D + 2) last for two)
    forward      (3 + P) f T out: the two GEMM terms and z, then with dropout z, g z, the base term and their sum
    backward     max((D + 3) f, (D + 2 + P) f + L l + D c) T out: dY cast to f (D), z's two terms and z; then dY,
                 z and gy kept to the end with gy cast to the LoRA dtype (L) and to the compute dtype (D), and with
                 dropout gy - dY
    """
    c, lb = BYTES[compute_dtype], BYTES[lora_dtype]
    f = spec.dora_norm_dtype_bytes(compute_dtype, lora_dtype)
    D, L, P = int(c != f), int(lb != f), int(dropout > 0)
    rows = block_rows or max(1, DEFAULT_BLOCK_ELEMENTS // fin)
    nblocks = -(-fout // rows)
    first = min(rows, fout)
    peak_rows = (D + 2) * first
    if nblocks >= 2:
        pair = rows if nblocks >= 3 else fout - rows  # the block formed while the previous V is still alive
        peak_rows = max(peak_rows, rows + (D + 2) * pair)
    return {
        "norm_blocks": f * peak_rows * fin,
        "forward": (3 + P) * f * tokens * fout,
        "backward": max((D + 3) * f, (D + 2 + P) * f + L * lb + D * c) * tokens * fout,
    }


def dora_scratch_bytes(shape: ModelShape, recipe: Recipe) -> int:
    """MEM-16: the largest of dora_layer_scratch over one block's seven linears (one layer runs at a time)."""
    if not recipe.use_dora:
        return 0
    kw = dict(compute_dtype=recipe.compute_dtype, lora_dtype=recipe.lora_dtype, dropout=recipe.lora_dropout)
    return max(max(dora_layer_scratch(recipe.tokens, fin, fout, **kw).values()) for _, fin, fout in shape.linears())


def estimate(shape: ModelShape, recipe: Recipe, runtime: Runtime | None = None) -> Ledger:
    """The ledger `qlora memory` prints: the paper's terms with this implementation's (MEM-13, MEM-14, MEM-16)."""
    runtime = Runtime() if runtime is None else runtime
    if not isinstance(runtime, Runtime):
        raise TypeError(f"runtime must be a backends.torchlib.ledger.Runtime, got {type(runtime).__name__}")
    paper = spec.estimate(shape, recipe)  # checks shape and recipe first
    if recipe.use_dora and runtime.layer == "peft":
        raise ValueError(
            "use_dora with layer='peft': PEFT's DoRA layer keeps other tensors than DoRALinear (its base and LoRA "
            "outputs, (T, out) each, for the magnitude's gradient) and is not modelled; use layer='qlora-ref'"
        )
    buffers = spec.PEFT_DEQUANT_BUFFERS if runtime.layer == "peft" else OUR_DEQUANT_BUFFERS
    parts = {
        **paper.components,
        "embeddings": embedding_bytes(shape, recipe, runtime),
        "lora_grads": lora_grad_bytes(shape, recipe, runtime),
        "activations": activation_bytes(shape, recipe, runtime),
        "dequant_scratch": spec.dequant_scratch_bytes(shape, recipe, buffers=buffers),
    }
    if recipe.use_dora:
        parts["dora_scratch"] = dora_scratch_bytes(shape, recipe)
    if runtime.overhead_bytes:
        parts["overhead"] = runtime.overhead_bytes
    return Ledger(parts, pageable=paper.pageable, config={**paper.config, **runtime.config()})


__all__ = ["CUDA_OVERHEAD_BYTES", "GB", "LAYERS", "Runtime", "dora_layer_scratch", "dora_scratch_bytes", "estimate"]


# --- the ledger per rank (DIST-7: on paper) ------------------------------------------------------------------------


def per_rank_estimate(shape, recipe, runtime=None, *, world: int, shard: bool = False):
    """The memory ledger of one rank of ``world`` (backends.torchlib.ledger.estimate re-composed; bytes).

    recipe.batch is the per-rank batch.  DDP (shard=False): every rank holds the single-GPU ledger plus
    ``ddp_buckets``, DDP's flat gradient buckets (the LoRA gradients once more; 0 with gradient_as_bucket_view).
    FSDP2 on paper (shard=True, not implemented for the 4-bit base): base_4bit, lora_params, lora_grads and optimizer
    divided by world (rounded up), plus ``fsdp_gather``: two decoder blocks' 4-bit weights and LoRA parameters
    unsharded at once (the block being computed and the one prefetched); embeddings, norms, activations, the loss
    head and the dequantization scratch stay per rank as they are.  Steps inside backward are refused under DDP
    (wrap_ddp), so runtime.step_in_backward must be False.
    """
    from qlora_ref import memory as spec
    from qlora_ref.memory import Ledger

    from .ledger import Runtime, estimate

    runtime = Runtime() if runtime is None else runtime
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive int, got {world!r}")
    if runtime.step_in_backward and world > 1:
        raise ValueError("step_in_backward steps before DDP averages the gradients (refused by wrap_ddp); set False")
    one = estimate(shape, recipe, runtime)
    parts = dict(one.components)
    pageable = one.pageable
    if world > 1 and not shard:
        parts["ddp_buckets"] = parts["lora_grads"]
    elif world > 1:

        def split(b: int) -> int:
            return -(-b // world)

        for k in ("base_4bit", "lora_params", "lora_grads", "optimizer"):
            parts[k] = split(parts[k])
        pageable = split(pageable)
        block_4bit = spec.base_4bit_bytes(shape, recipe) // shape.layers
        block_lora = spec.lora_param_bytes(shape, recipe) // shape.layers
        parts["fsdp_gather"] = 2 * (block_4bit + block_lora)
    config = {**one.config, "world": world, "shard": bool(shard)}
    return Ledger(parts, pageable=pageable, config=config)
