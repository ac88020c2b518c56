"""qlora_ref: QLoRA (Dettmers et al., 2023) as an executable NumPy/SciPy spec.

Every function states its math and the spec rule it implements (specs/*.md); the CuPy backend and the torch training
layer are tested against these functions.  Imports nothing but numpy (and scipy to derive the NF4 table).
"""

from . import adamw, dora, loftq, lora, matvec, memory
from .adamw import AdamW8bitState, adamw_step, adamw_step_8bit, clip_grad_norm
from .blockwise import dequantize_blockwise_8bit, quantize_blockwise_8bit
from .checks import BLOCKSIZES, NonFiniteError
from .codebooks import codebook, dynamic_map, fp4_table, int4_table, nf4_table, nf4_thresholds
from .dora import dora_backward, dora_forward, dora_init, dora_merge, dora_weight_norm
from .double_quant import double_dequantize, double_quantize
from .dtypes import bf16_to_f32, f32_to_bf16
from .loftq import loftq_init, reconstruction_error
from .lora import lora_backward, lora_forward, lora_init, lora_merge, lora_scaling
from .matvec import matvec_4bit, matvec_bound, matvec_f64
from .memory import ModelShape, bits_per_param, estimate
from .packing import pack_4bit, unpack_4bit
from .quantized import Quantized4bit, dequantize_4bit, quantize_4bit

__all__ = [
    "AdamW8bitState",
    "BLOCKSIZES",
    "ModelShape",
    "NonFiniteError",
    "Quantized4bit",
    "adamw",
    "adamw_step",
    "adamw_step_8bit",
    "bf16_to_f32",
    "bits_per_param",
    "clip_grad_norm",
    "codebook",
    "dequantize_4bit",
    "dequantize_blockwise_8bit",
    "dora",
    "dora_backward",
    "dora_forward",
    "dora_init",
    "dora_merge",
    "dora_weight_norm",
    "double_dequantize",
    "double_quantize",
    "dynamic_map",
    "estimate",
    "f32_to_bf16",
    "fp4_table",
    "int4_table",
    "loftq",
    "loftq_init",
    "lora",
    "lora_backward",
    "lora_forward",
    "lora_init",
    "lora_merge",
    "lora_scaling",
    "matvec",
    "matvec_4bit",
    "matvec_bound",
    "matvec_f64",
    "memory",
    "nf4_table",
    "nf4_thresholds",
    "pack_4bit",
    "quantize_4bit",
    "quantize_blockwise_8bit",
    "reconstruction_error",
    "unpack_4bit",
]
