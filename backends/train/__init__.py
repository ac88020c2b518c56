"""QLoRA training in torch on top of the spec and the backends: the layer, model preparation, formats, the loop.

    from backends.train import load_model, smollm2_gguf_path, save_peft_adapter
    model = load_model(smollm2_gguf_path(), backend="numpy", r=64, alpha=16)

layer.py   QLoRALinear + its autograd function (frozen 4-bit base, LoRA A/B, shared dequantization scratch)
model.py   prepare_model / load_model / load_tokenizer / smollm2_gguf_path / minilm_path
export.py  PEFT adapter, bitsandbytes 4-bit checkpoint, exact merged 16-bit export
"""

from .export import (
    adapter_prepare_kwargs,
    load_peft_adapter,
    merge_and_export,
    read_adapter_config,
    save_bnb_checkpoint,
    save_peft_adapter,
)
from .layer import QLoRAFunction, QLoRALinear, dequantize_4bit_cpu, release_scratch
from .model import (
    QLoRAConfig,
    find_smollm2_gguf,
    gguf_as_hf_dir,
    load_model,
    load_tokenizer,
    minilm_path,
    prepare_model,
    qlora_layers,
    smollm2_gguf_path,
    trainable_parameters,
)

__all__ = [
    "QLoRAConfig",
    "QLoRAFunction",
    "QLoRALinear",
    "adapter_prepare_kwargs",
    "dequantize_4bit_cpu",
    "find_smollm2_gguf",
    "gguf_as_hf_dir",
    "load_model",
    "load_peft_adapter",
    "load_tokenizer",
    "minilm_path",
    "merge_and_export",
    "prepare_model",
    "qlora_layers",
    "read_adapter_config",
    "release_scratch",
    "save_bnb_checkpoint",
    "save_peft_adapter",
    "smollm2_gguf_path",
    "trainable_parameters",
]
