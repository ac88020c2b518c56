"""The CuPy backend's boundary: what its operations accept, checked once, seen as kernel arguments.

Inputs are CuPy arrays or torch CUDA tensors, zero-copy (backends.bridge).  On the hot paths (the quantizer's input,
the dequantizer's ``out``) a torch tensor reaches the kernel as its device address, which is what its DLPack view
would hold, without the per-call DLPack exchange (measured: it cost more host time than the 4096x4096 kernels);
elsewhere tensors are viewed through DLPack (bf16 as uint16 bits, so no CuPy bfloat16 support is needed).

Operations that can reject their input (non-finite values, codes > 15) read a few status words back from the device
once, after all their kernels are queued (`read_status`): that is their single host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import cupy as cp
import numpy as np

import qlora_ref
from backends.bridge import dtype_name, is_torch, torch_to_cupy
from qlora_ref.checks import NonFiniteError
from qlora_ref.dtypes import DTYPES

_U64_MAX = np.uint64(2**64 - 1)


def as_device_array(x, what: str, dtype: str | None = None) -> tuple[cp.ndarray, str]:
    """A contiguous CuPy view (zero-copy where possible) of a CuPy array / torch CUDA tensor, and its dtype name.

    bfloat16 comes back as uint16 bits; uint16 input is read as bf16 bits (with ``dtype`` None or "bfloat16").
    """
    if is_torch(x):
        if not x.is_cuda:
            raise TypeError(
                f"{what} is a torch tensor on {x.device}; the cupy backend needs a CUDA tensor "
                "(use .cuda(), or get_backend('numpy') for CPU tensors)"
            )
        name, arr = dtype_name(x), torch_to_cupy(x)
    elif isinstance(x, cp.ndarray):
        arr, name = x, x.dtype.name
    elif isinstance(x, np.ndarray):
        raise TypeError(
            f"{what} is a numpy array; the cupy backend takes CuPy arrays or torch CUDA tensors "
            "(cupy.asarray(x) copies it to the GPU; get_backend('numpy') runs on the CPU)"
        )
    else:
        raise TypeError(f"{what} must be a CuPy array or a torch CUDA tensor, got {type(x).__name__}")
    if name == "bfloat16":
        arr, name = arr.view(cp.uint16), "uint16"
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if name in ("uint16", "int16"):
        if dtype not in (None, "bfloat16"):
            raise TypeError(f"{name} input is read as bfloat16 bits; it cannot be dtype={dtype!r}")
        return cp.ascontiguousarray(arr).view(cp.uint16), "bfloat16"
    if name in ("float32", "float16"):
        if dtype not in (None, name):
            raise TypeError(f"{what} dtype is {name} but dtype={dtype!r} was asked for; cast the input first")
        return cp.ascontiguousarray(arr), name
    raise TypeError(
        f"{what} dtype {name} is not supported: pass float32, float16 or bfloat16 (torch bf16 tensors, "
        "or uint16 bits with dtype='bfloat16')"
    )


@dataclass
class Input:
    """A kernel's view of a float input: the launch argument (CuPy array, or a torch tensor's device address),
    its element count, dtype name ("bfloat16" for bf16 bits), 16-byte alignment, and the element reader for errors."""

    arg: object
    n: int
    dtype: str
    aligned: bool
    source: object  # keeps a contiguous torch copy alive during the launch

    def value_at(self, i: int) -> np.float32:
        if isinstance(self.source, cp.ndarray):
            v = self.source.ravel()[i : i + 1].get()
            return qlora_ref.bf16_to_f32(v)[0] if self.dtype == "bfloat16" else np.float32(v[0])
        return np.float32(self.source.reshape(-1)[i].float().item())


def input_view(x, what: str, dtype: str | None = None) -> Input:
    """Zero-copy input view.  torch CUDA tensors go to the kernel as their device address (no per-call DLPack
    exchange: it costs more host time than a small kernel); CuPy arrays as themselves (see `as_device_array`)."""
    if is_torch(x) and x.is_cuda:
        name = dtype_name(x)
        if name not in DTYPES:
            raise TypeError(f"{what} dtype {name} is not supported: pass float32, float16 or bfloat16")
        if dtype is not None and dtype != name:
            raise TypeError(f"{what} dtype is {name} but dtype={dtype!r} was asked for; cast the input first")
        t = x.detach()
        if not t.is_contiguous():
            t = t.contiguous()
        ptr = t.data_ptr()
        return Input(np.uint64(ptr), t.numel(), name, ptr % 16 == 0, t)
    xd, name = as_device_array(x, what, dtype)
    xd = xd.ravel()
    return Input(xd, xd.size, name, xd.data.ptr % 16 == 0, xd)


def uint8_array(x, what: str) -> cp.ndarray:
    if is_torch(x):
        x = torch_to_cupy(x)
    if isinstance(x, np.ndarray):
        x = cp.asarray(x)
    if not isinstance(x, cp.ndarray):
        raise TypeError(f"{what} must be a CuPy array or a torch CUDA tensor, got {type(x).__name__}")
    if x.dtype != cp.uint8:
        raise TypeError(f"{what} must be uint8, got {x.dtype}")
    return cp.ascontiguousarray(x).ravel()


def f32_array(x, what: str) -> cp.ndarray:
    if isinstance(x, np.ndarray):
        x = cp.asarray(x)
    if is_torch(x):
        x = torch_to_cupy(x)
    if not isinstance(x, cp.ndarray):
        raise TypeError(f"{what} must be a CuPy array or a torch CUDA tensor, got {type(x).__name__}")
    if x.dtype.kind != "f":
        raise TypeError(f"{what} must be a floating-point array, got {x.dtype}")
    return cp.ascontiguousarray(x, dtype=cp.float32).ravel()


def aligned(*arrays: cp.ndarray) -> bool:
    return all(a.data.ptr % 16 == 0 for a in arrays)


def resolve_out(out, n: int, dtype: str | None, default: str):
    """(kernel argument for out, dtype name, device address) after checking that out can take n values of the dtype
    asked for; (None, dtype, None) without out.  A torch tensor is passed to the kernel as its raw device address
    (zero-copy, as its DLPack view would be, without the per-call DLPack exchange)."""
    if out is None:
        return None, (dtype or default), None
    if is_torch(out):
        if not out.is_cuda:
            raise TypeError(f"out is a torch tensor on {out.device}; the cupy backend writes CUDA tensors only")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous (the kernel writes it as one flat buffer)")
        name, size, ptr = dtype_name(out), out.numel(), out.data_ptr()
        arg = np.uint64(ptr)
    elif isinstance(out, cp.ndarray):
        if not out.flags.c_contiguous:
            raise ValueError("out must be C-contiguous (the kernel writes it as one flat buffer)")
        name, size, ptr = out.dtype.name, out.size, out.data.ptr
        arg = out
    else:
        raise TypeError(f"out must be a CuPy array or a torch CUDA tensor, got {type(out).__name__}")
    if name in ("uint16", "int16"):
        name = "bfloat16"
    if name not in DTYPES:
        raise TypeError(f"out has dtype {name}; it must be one of {DTYPES} (bf16 as torch.bfloat16 or uint16 bits)")
    if dtype is not None and dtype != name:
        raise TypeError(f"dtype={dtype!r} but out has dtype {name}; pass one or make them agree")
    if size != n:
        raise ValueError(f"out has {size} elements but the quantized tensor has {n}")
    return arg, name, ptr


# --- status words: the one read-back of an operation ------------------------------------------------------------


def new_status() -> cp.ndarray:
    """Status words, zeroed: [0] non-finite count, [1] ~(first non-finite index) (atomicMax of the complement),
    [2] unused, [3] f32 offset bits."""
    return cp.zeros(4, cp.uint64)


_PINNED: dict[int, np.ndarray] = {}


def read_status(status: cp.ndarray) -> np.ndarray:
    """Copy the status words to pinned host memory and wait for them: the operation's one synchronisation."""
    key = cp.cuda.Device().id
    if key not in _PINNED:
        import cupyx

        _PINNED[key] = cupyx.empty_pinned(4, np.uint64)
    return status.get(out=_PINNED[key]).copy()


def first_index(word: np.uint64) -> int:
    return int(_U64_MAX - np.uint64(word))


def nonfinite_error(x: Input, count: int, first: int, what: str) -> NonFiniteError:
    """The spec's message (qlora_ref.checks.check_finite), value read back from the device."""
    value = x.value_at(first)
    return NonFiniteError(
        f"{what} has {count} non-finite value(s) (NaN/Inf); the first is {value} at flat index {first}. "
        "Quantization needs finite weights: fix or mask them before quantizing."
    )
