"""The numpy backend: `qlora_ref` behind the backend interface, no logic of its own.

Beyond calling the spec it only converts at the boundary: torch CPU tensors become numpy arrays (bf16 tensors as
their uint16 bits, the spec's bf16 convention), and ``out=`` (a numpy array or torch CPU tensor) receives a copy.
"""

from __future__ import annotations

import numpy as np

import qlora_ref
from qlora_ref.checks import check_finite as _spec_check_finite
from qlora_ref.dtypes import DTYPES, to_float32


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "numpy")


def to_numpy(x, what: str = "input") -> tuple[np.ndarray, str | None]:
    """(numpy array, "bfloat16" or None): torch CPU tensors are viewed as numpy, bf16 as uint16 bits."""
    if _is_torch(x):
        import torch

        if x.device.type != "cpu":
            raise TypeError(
                f"{what} is a torch tensor on {x.device}; the numpy backend takes CPU tensors "
                "(use get_backend('cupy') for CUDA tensors, or .cpu())"
            )
        x = x.detach()
        if x.dtype == torch.bfloat16:
            return x.contiguous().view(torch.int16).numpy().view(np.uint16), "bfloat16"
        return x.numpy(), None
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return np.asarray(x), None
    raise TypeError(f"{what} must be a numpy array or a torch CPU tensor, got {type(x).__name__}")


class NumpyBackend:
    """CPU backend: every operation is the spec's."""

    name = "numpy"
    device = "cpu"

    def quantize_4bit(self, x, *, quant_type="nf4", blocksize=64, double_quant=True, dtype=None):
        arr, bf16 = to_numpy(x)
        if bf16 and dtype not in (None, "bfloat16"):
            raise TypeError(f"input is a bfloat16 tensor but dtype={dtype!r} was asked for; cast the input first")
        return qlora_ref.quantize_4bit(
            arr, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant, dtype=dtype or bf16
        )

    def dequantize_4bit(self, q, *, dtype=None, out=None):
        if out is None:
            return qlora_ref.dequantize_4bit(q, dtype)
        if _is_torch(out) and not out.is_contiguous():
            raise ValueError("out must be contiguous (the values are written as one flat buffer)")
        view, name = to_numpy(out, "out")
        if name is None:
            name = "bfloat16" if view.dtype in (np.uint16, np.int16) else view.dtype.name
        if name not in DTYPES:
            raise TypeError(f"out has dtype {view.dtype}; it must be one of {DTYPES} (bf16 as uint16 bits)")
        if dtype is not None and dtype != name:
            raise TypeError(f"dtype={dtype!r} but out has dtype {name}; pass one or make them agree")
        if view.size != q.n:
            raise ValueError(f"out has {view.size} elements but the quantized tensor has {q.n}")
        values = qlora_ref.dequantize_4bit(q, name)
        view.reshape(-1)[...] = values.reshape(-1).view(view.dtype)
        return out

    def quantize_blockwise_8bit(self, x, code, blocksize=256):
        arr, bf16 = to_numpy(x, "x")
        if bf16:
            arr = qlora_ref.bf16_to_f32(arr)
        return qlora_ref.quantize_blockwise_8bit(arr, to_numpy(code, "code")[0], blocksize)

    def dequantize_blockwise_8bit(self, codes, absmax, code, blocksize=256, n=None):
        return qlora_ref.dequantize_blockwise_8bit(
            to_numpy(codes, "codes")[0], to_numpy(absmax, "absmax")[0], to_numpy(code, "code")[0], blocksize, n
        )

    def pack_4bit(self, codes, filler=0):
        return qlora_ref.pack_4bit(to_numpy(codes, "codes")[0], filler)

    def unpack_4bit(self, packed, n):
        return qlora_ref.unpack_4bit(to_numpy(packed, "packed")[0], n)

    def check_finite(self, x, what="input"):
        arr, bf16 = to_numpy(x, what)
        _spec_check_finite(to_float32(arr, bf16)[0], what)
