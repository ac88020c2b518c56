"""The torch library: QLoRA on PyTorch over the backends' ops.  No argv, no downloads (those are backends.app's).

    from backends.torchlib import load_model, save_peft_adapter, PagedAdamW
    model = load_model("path/to/llama-dir-or.gguf", backend="cupy", r=64, alpha=16)

layer.py      QLoRALinear + its autograd function (frozen 4-bit base, LoRA A/B)
scratch.py    the dequantization scratch: one buffer per device and dtype, shared by every layer
dtypes.py     the dtypes taken by name or object (as_torch_dtype), float64 -> dtype with one rounding
dora.py       DoRALinear: QLoRALinear plus PEFT's DoRA magnitude vector (specs/dora.md)
loftq.py      LoftQ initialisation of the 4-bit base and A/B (specs/loftq.md)
prepare.py    prepare_model: nn.Linear -> QLoRALinear, layer by layer on the backend's device
load.py       load_model / load_tokenizer (safetensors, GGUF, bitsandbytes 4-bit checkpoints), the model cache
synthetic.py  random LLaMA-shaped QLoRA models made on the device (memory runs)
optim.py      PagedAdamW: the torch optimizer over the backend's AdamW step (CUDA: states paged in managed memory)
optim_checks.py  backend_for (the backend of a device) and PagedAdamW's parameter / gradient / state-dict checks
clip.py       the spec's global-norm gradient clipping
graph.py      CapturedStep: forward + backward as one CUDA graph, replayed
masks.py      causal_only: unpadded, unpacked batches attend with SDPA's causal kernel (no mask, no host read)
export.py     PEFT adapter, bitsandbytes 4-bit checkpoint, exact merged 16-bit export
gguf_export.py  the merged model as one GGUF file
files.py      atomic file writes with the user's normal permissions (every writer above uses them)
functional.py, ops.py   the QLoRA linear's forward/backward as plain functions, and as torch custom operators
dropout.py    StepSeed: dropout masks from a seed in device memory (capturable)
decode.py     greedy decoding with a static KV cache, the step captured as a CUDA graph
fuse.py       the decoder's norms, SwiGLU, RoPE and LM loss as own kernels; or torch.compile of its blocks
ledger.py     this implementation's memory ledger on top of the spec's
distributed.py   DDP over the LoRA parameters, FSDP2 of them, checkpoints that load with any number of ranks
sharded_base.py  FSDP2 of the 4-bit base too, ShardedPagedAdamW
"""

from .clip import clip_grad_norm_
from .dora import DoRALinear
from .export import (
    adapter_prepare_kwargs,
    load_peft_adapter,
    merge_and_export,
    read_adapter_config,
    save_bnb_checkpoint,
    save_peft_adapter,
)
from .graph import CapturedStep, CaptureError, capture_blockers
from .layer import QLoRAFunction, QLoRALinear, dequantize_4bit_cpu
from .load import gguf_as_hf_dir, load_model, load_tokenizer, model_cache_dir
from .loftq import loftq_initialize_, loftq_state
from .masks import causal_only
from .optim import DeviceMemoryError, PagedAdamW, StepScalars, step_scalars
from .prepare import (
    QLoRAConfig,
    prepare_model,
    qlora_layers,
    trainable_parameters,
)
from .scratch import release_scratch

__all__ = [
    "CaptureError",
    "CapturedStep",
    "DeviceMemoryError",
    "DoRALinear",
    "PagedAdamW",
    "QLoRAConfig",
    "QLoRAFunction",
    "QLoRALinear",
    "StepScalars",
    "adapter_prepare_kwargs",
    "causal_only",
    "capture_blockers",
    "clip_grad_norm_",
    "dequantize_4bit_cpu",
    "gguf_as_hf_dir",
    "load_model",
    "load_peft_adapter",
    "load_tokenizer",
    "loftq_initialize_",
    "loftq_state",
    "merge_and_export",
    "model_cache_dir",
    "prepare_model",
    "qlora_layers",
    "read_adapter_config",
    "release_scratch",
    "save_bnb_checkpoint",
    "save_peft_adapter",
    "step_scalars",
    "trainable_parameters",
]
