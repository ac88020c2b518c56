"""The configuration of every command but finetune (config.py holds finetune's, the field helpers and the one set
of validators): quantize, export, memory, generate and eval, one ``@dataclass`` each, whose fields become the flags
as in config.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from backends import BACKENDS
from qlora_ref import memory

from .config import opt, required


@dataclass
class QuantizeConfig:
    model: str = required("HF model dir, .gguf file, or 'smollm2'")
    out: str = required("output directory (written whole or not at all)")
    quant_type: str = opt("nf4", "4-bit data type (bitsandbytes stores nf4 and fp4)", choices=("nf4", "fp4"))
    blocksize: int = opt(64, "4-bit quantization block size")
    double_quant: bool = opt(True, "quantize the absmax constants again to 8 bits")
    dtype: str = opt(
        "bfloat16",
        "dtype of the non-quantized tensors and the compute dtype written in quantization_config",
        choices=("bfloat16", "float16", "float32"),
    )
    backend: str = opt("numpy", "quantization backend", choices=BACKENDS)
    overwrite: bool = opt(False, "replace an existing checkpoint at OUT (it is refused otherwise)")


DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # short names -> torch's


@dataclass
class ExportConfig:
    adapter: str = required("PEFT adapter dir written by finetune (e.g. runs/qlora/adapter)", flag=True)
    out: str = required("output directory (written whole or not at all)", flag=True)
    model: str = opt("", "the base: HF model dir, .gguf or 'smollm2'; '' = the adapter's base_model_name_or_path")
    merged: bool = opt(False, "one 16-bit model, W_hat + s B A rounded once (LORA-6); else the 4-bit base + adapter/")
    gguf: bool = opt(False, "the merged model as OUT/model.gguf (llama architecture, tokenizer inside)")
    dtype: str = opt(
        "bfloat16",
        "dtype of the merged weights, or of the 4-bit checkpoint's other tensors and compute dtype",
        choices=("bfloat16", "float16", "float32", *DTYPE_NAMES),
    )
    backend: str = opt("numpy", "dequantization backend", choices=BACKENDS)
    overwrite: bool = opt(False, "replace an existing export at OUT (it is refused otherwise)")


MEMORY_PRESETS_EXTRA = {
    # SmolLM2-135M-Instruct (its GGUF / HF config.json): tied embeddings, grouped-query attention.
    "smollm2-135m": dict(
        hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152, tie_embeddings=True
    ),
}
MEMORY_MODELS = tuple(sorted([*memory.PRESETS, *MEMORY_PRESETS_EXTRA]))


@dataclass
class MemoryConfig:
    model: str = opt("llama-7b", f"preset ({', '.join(MEMORY_MODELS)}) or an HF config.json / model dir")
    r: int = opt(64, "LoRA rank")
    seq_len: int = opt(512, "tokens per sequence")
    batch: int = opt(1, "sequences per micro-batch")
    gpu_gb: float | None = opt(None, "GPU memory in GB (10^9 bytes): prints whether it fits")
    optimizer: str = opt("paged_adamw_32bit", "optimizer whose states are counted", choices=memory.OPTIMIZERS)
    checkpointing: bool = opt(True, "gradient checkpointing (MEM-8)")
    double_quant: bool = opt(True, "double quantization of the absmax constants")
    blocksize: int = opt(64, "4-bit quantization block size")
    compute_dtype: str = opt("bfloat16", "dtype of activations and dequantized weights", choices=tuple(memory.BYTES))
    lora_dtype: str = opt(
        "bfloat16",
        "dtype of the LoRA weights: bfloat16 is the Guanaco recipe's (qlora.py --bf16); `qlora finetune` trains "
        "float32 adapters unless given --lora-dtype bfloat16",
        choices=tuple(memory.BYTES),
    )
    lora_dropout: float = opt(0.0, "LoRA dropout (a mask and a dropped copy per adapted input)")
    overhead_gb: float | None = opt(
        None, "CUDA context, loaded kernels, driver memory in GB; unset: the constant measured on an H100 (MEM-14)"
    )
    layer: str = opt("qlora-ref", "whose LoRA layer: 'qlora-ref' (ours) or 'peft' (bitsandbytes + PEFT)")
    step_in_backward: bool = opt(False, "optimizer steps inside backward (MEM-13)")
    offload_checkpoints: bool = opt(False, "checkpointed block inputs in host memory")
    embeddings_on_host: bool = opt(False, "input embedding table in host memory")
    use_dora: bool = opt(
        False, "DoRA layers: a magnitude per output feature, its norms and temporaries (MEM-15, MEM-16)"
    )
    nproc: int = opt(
        1, "GPUs (ranks), --batch sequences each: the ledger of one of them (DIST-7, specs/distributed.md)"
    )
    shard: bool = opt(False, "with --nproc: FSDP2 shards the 4-bit base, LoRA, grads, optimizer (on paper); else DDP")


PROMPT_TEMPLATES = ("auto", "guanaco", "alpaca", "chat", "none")  # answers.py: what each wraps a question in


@dataclass
class GenerateConfig:
    prompt: list[str] = opt([], "a prompt (repeat for a batch); or --prompts FILE.jsonl")
    prompts: str = opt("", "a .jsonl file of prompts (a field instruction, text, input, prompt or question)")
    out: str = opt("", "with --prompts: the answers' .jsonl, one line per prompt (written whole or not at all)")
    overwrite: bool = opt(False, "replace an existing --out file (it is refused otherwise)")
    max_prompts: int = opt(0, "with --prompts: answer only the first N (0 = all)")
    prompt_field: str = opt("auto", "with --prompts: the field holding the prompt (auto: the first of the list above)")
    model: str = opt("smollm2", "HF model dir, .gguf file, or 'smollm2'")
    adapter: str | None = opt(None, "PEFT adapter dir (e.g. runs/qlora/adapter); none = the base")
    max_new_tokens: int = opt(64, "tokens generated per prompt (greedy)")
    batch_size: int = opt(8, "with --prompts: prompts generated together")
    template: str = opt(
        "auto",
        "how a prompt is wrapped: auto = as the adapter's run trained (its config.json), else the chat template",
        choices=PROMPT_TEMPLATES,
    )
    raw: bool = opt(False, "do not wrap the prompt at all (= --template none)")
    backend: str = opt("numpy", "dequantization backend", choices=BACKENDS)
    cuda_graphs: str = opt(
        "auto",
        "--backend cupy: decode with a static KV cache, the one-token step replayed as a CUDA graph (auto: when it "
        "can be captured, else eager with one line saying why; off: transformers' generate, as on the CPU)",
        choices=("auto", "off"),
    )
    progress: bool = opt(True, "show a tqdm progress bar on stderr (tokens generated; with --prompts: prompts)")


@dataclass
class EvalConfig:
    model: str = opt("smollm2", "HF model dir, .gguf file, or 'smollm2'")
    adapter: str | None = opt(None, "PEFT adapter dir; none = the base")
    data: str | None = opt(None, ".txt (perplexity over all tokens) or .json/.jsonl (response loss)")
    task: bool = opt(False, "exact match on the generated task's held-out split")
    task_eval: int = opt(64, "generated task: number of held-out lists")
    seed: int = opt(0, "the task's seed (the finetune's --seed)")
    max_len: int = opt(512, "longest sequence scored (a .txt file is cut into chunks of this many tokens)")
    source_max_len: int = opt(256, ".json/.jsonl: prompt tokens kept (as finetune's)")
    target_max_len: int = opt(256, ".json/.jsonl: response tokens kept (as finetune's)")
    drop_long: bool = opt(False, ".json/.jsonl: skip a long example instead of cutting it")
    max_examples: int = opt(0, "score only the first N sequences (0 = all)")
    batch_size: int = opt(8, "sequences per forward pass")
    backend: str = opt("numpy", "dequantization backend", choices=BACKENDS)
    json: bool = opt(False, "also print the result as one JSON line")
    progress: bool = opt(True, "show a tqdm progress bar (sequences scored) on stderr")
    mmlu: str | None = opt(None, "MMLU folder (dev/ + test/ CSVs): letter accuracy, k-shot (backends/app/mmlu.py)")
    mmlu_split: str = opt("test", "MMLU questions scored (dev: leave-one-out shots)", choices=("dev", "val", "test"))
    shots: int = opt(5, "MMLU: dev examples in front of each question (5 = the paper's; 0 = zero-shot)")
    subjects: str = opt("", "MMLU: comma-separated subjects to score, e.g. anatomy,virology ('' = all)")
    mmlu_out: str = opt("mmlu.json", "MMLU: the result's JSON path; the per-subject PNG goes beside it")
