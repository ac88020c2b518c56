"""The torch dtypes the library takes, by name or by object, and float64 -> dtype with one rounding (LORA-6).

as_torch_dtype("bfloat16") == as_torch_dtype(torch.bfloat16) == torch.bfloat16
DTYPE_NAMES[torch.bfloat16] == "bfloat16"                       (the backends' dtype argument)
"""

from __future__ import annotations

import torch

TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
DEQUANT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the backends' dequantize writes


def as_torch_dtype(dtype) -> torch.dtype:
    """'bfloat16' | torch.bfloat16 -> torch.bfloat16 (float32, float16, bfloat16; float64 for CPU gradient checks)."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPE_NAMES:
        return dtype
    if isinstance(dtype, str) and dtype in TORCH_DTYPES:
        return TORCH_DTYPES[dtype]
    raise ValueError(f"dtype must be one of {sorted(TORCH_DTYPES)} (str or torch.dtype), got {dtype!r}")


def round_f64(x64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 -> dtype with ONE rounding to nearest even (LORA-6).

    float32: a direct cast.  float16/bfloat16: torch casts through float32 (two roundings), so round to odd into
    float32 first (truncate, set the last bit if inexact), then to nearest even: one correct rounding because float32
    keeps >= p + 2 bits of the 16-bit format (Boldo & Melquiond 2008), as qlora_ref.lora.lora_merge does.
    """
    if dtype == torch.float64:
        return x64
    y = x64.to(torch.float32)
    if dtype == torch.float32:
        return y
    y = torch.where(y.double().abs() > x64.abs(), torch.nextafter(y, torch.zeros_like(y)), y)  # toward zero
    inexact = (y.double() != x64).to(torch.int32)
    return (y.view(torch.int32) | inexact).view(torch.float32).to(dtype)
