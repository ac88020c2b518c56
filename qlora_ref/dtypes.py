"""Float formats at the spec's boundary (specs/blockwise.md BW-1, specs/formats.md FMT-6).

NumPy has no bfloat16, so the spec carries bf16 as its raw bits in ``np.uint16`` (the top 16 bits of the float32 with
the same sign and exponent).  Arrays of an extension dtype named "bfloat16" (ml_dtypes) are read as those bits, and
torch CPU tensors are read without importing torch (a bf16 tensor widened exactly, bf16 being a subset of float32).

    bf16_to_f32(b) = float32 with bits (b << 16)                      exact
    f32_to_bf16(x) = round_to_nearest_even(x) to 8 significand bits  one rounding

Every ``dtype=`` argument of the spec goes through `resolve_dtype` (FMT-6): "float32" | "float16" | "bfloat16" and
their spellings ("fp32", "bf16", "f4", "torch.bfloat16", ...), NumPy types and dtypes (np.float32, np.dtype("f2")),
ml_dtypes.bfloat16, and torch dtypes (torch.float32, torch.half, torch.bfloat16; recognised by their type's module
and name).  Results come back in `output_dtype(dtype)`: float32 / float16 arrays, and bfloat16 as uint16 bits unless
an extension bfloat16 NumPy dtype (ml_dtypes.bfloat16) was asked for explicitly, which returns arrays of that dtype.
"""

from __future__ import annotations

import numpy as np

DTYPES = ("float32", "float16", "bfloat16")

# Short spellings users write that np.dtype does not parse (it parses "f4", "<f2", "half", "single" itself).
_ALIASES = {"fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16", "bf16": "bfloat16"}


def _is_torch(obj) -> bool:
    """A torch object (tensor or dtype), recognised by its type's module: torch is never imported here."""
    return type(obj).__module__.split(".")[0] == "torch"


def _extension_bf16(dtype) -> np.dtype | None:
    """The NumPy dtype of an extension bfloat16 (ml_dtypes.bfloat16 or its np.dtype), else None."""
    if isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic)):
        dt = np.dtype(dtype)
        return dt if dt.name == "bfloat16" else None
    return None


def resolve_dtype(dtype, what: str = "dtype") -> str:
    """The spec's name ("float32" | "float16" | "bfloat16") of a dtype-like (FMT-6).

    Strings (the names, "fp32"/"fp16"/"bf16", "torch.float32", anything np.dtype parses), NumPy scalar types and
    np.dtype objects, ml_dtypes.bfloat16, torch dtypes.  A dtype-like of another type is a TypeError, a dtype the
    spec does not carry (float64, int8, ...) a ValueError.
    """
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        name = _ALIASES.get(name, name)
        if name not in DTYPES:
            try:
                name = np.dtype(name).name
            except TypeError:
                raise ValueError(f"{what} must be one of {DTYPES} (or a spelling of one), got {dtype!r}") from None
    elif _is_torch(dtype) and type(dtype).__name__ == "dtype":
        name = str(dtype).removeprefix("torch.")  # torch.half prints as torch.float16
    elif isinstance(dtype, np.dtype) or isinstance(dtype, type):
        try:
            name = np.dtype(dtype).name
        except TypeError:
            raise TypeError(f"{what}={dtype!r} is not a dtype; use one of {DTYPES}") from None
    else:
        raise TypeError(
            f"{what} must be a dtype name, NumPy/ml_dtypes dtype or torch dtype, got {type(dtype).__name__} {dtype!r}"
        )
    if name not in DTYPES:
        named = "" if isinstance(dtype, str) and name == dtype else f" ({name})"
        raise ValueError(f"{what} must be one of {DTYPES} (or a spelling of one), got {dtype!r}{named}")
    return name


def output_dtype(dtype) -> np.dtype:
    """The NumPy dtype results of ``dtype`` come back in: float32, float16, bf16 as uint16 bits or ml_dtypes bf16."""
    name = resolve_dtype(dtype)
    if name == "bfloat16":
        return _extension_bf16(dtype) or np.dtype(np.uint16)
    return np.dtype(name)


def as_numpy(x, what: str = "input") -> tuple[np.ndarray, str]:
    """(array, dtype name) of a NumPy array, anything np.asarray reads, or a torch CPU tensor.

    bfloat16 (a torch bf16 tensor or an ml_dtypes array) comes back as uint16 bits with the name "bfloat16"; every
    other array keeps its dtype and its NumPy name ("uint16" stays "uint16": bits need dtype="bfloat16" to be bf16).
    """
    if _is_torch(x) and hasattr(x, "detach"):
        if x.device.type != "cpu":
            raise TypeError(f"{what} is a torch tensor on {x.device}; the spec reads CPU tensors: pass tensor.cpu()")
        x = x.detach()
        if str(x.dtype) == "torch.bfloat16":
            return f32_to_bf16(x.float().numpy()), "bfloat16"  # bf16 -> float32 -> bf16 is exact
        return x.numpy(), x.numpy().dtype.name
    x = np.asarray(x)
    if x.dtype.name == "bfloat16":
        return x.view(np.uint16), "bfloat16"
    return x, x.dtype.name


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly."""
    bits = np.asarray(bits)
    if bits.dtype.name == "bfloat16":
        bits = bits.view(np.uint16)
    if bits.dtype not in (np.uint16, np.int16):
        raise TypeError(f"bf16_to_f32 expects bfloat16 bits as uint16, got dtype {bits.dtype}")
    return (bits.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even (as torch and CUDA __float2bfloat16_rn)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(u.view(np.float32))
    if nan.any():  # keep NaN a NaN (the carry could turn a NaN payload into Inf)
        rounded[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
    return rounded


def to_float32(x, dtype=None, *, strict: bool = False) -> tuple[np.ndarray, str]:
    """Read the caller's array as float32 exactly, and name its dtype (BW-1).

    float32 and float16 arrays are recognised by their dtype, bf16 as a torch bf16 tensor, an ml_dtypes bfloat16
    array, or uint16 bits with ``dtype="bfloat16"`` (any dtype-like, `resolve_dtype`).  ``strict``: uint16 without
    dtype= is refused (integers are never read as bf16 bits silently); otherwise it is read as bf16 bits.  Anything
    else is a TypeError that says what to pass.
    """
    x, name = as_numpy(x)
    dtype = None if dtype is None else resolve_dtype(dtype)
    if name == "bfloat16" or (name == "uint16" and dtype == "bfloat16"):
        if dtype not in (None, "bfloat16"):
            raise TypeError(f"input is bfloat16 but dtype={dtype!r} was asked for; cast the input first")
        return bf16_to_f32(x), "bfloat16"
    if name == "uint16":
        if strict and dtype is None:
            raise TypeError(
                "input is uint16: if it holds bfloat16 bits pass dtype='bfloat16' (integers are not quantized)"
            )
        if dtype is not None:
            raise TypeError(f"uint16 input is read as bfloat16 bits; it cannot be dtype={dtype!r}")
        return bf16_to_f32(x), "bfloat16"
    if name in ("float32", "float16"):
        if dtype not in (None, name):
            raise TypeError(f"input dtype is {name} but dtype={dtype!r} was asked for; cast the input first")
        return x.astype(np.float32, copy=False), name
    raise TypeError(
        f"input dtype {x.dtype} is not supported: pass float32 or float16, a torch bfloat16 tensor, or bfloat16 as "
        "uint16 bits with dtype='bfloat16' (e.g. np_array.view(np.uint16))"
    )


def from_float32(x: np.ndarray, dtype) -> np.ndarray:
    """Round float32 values once to ``dtype`` (round to nearest even), returned in `output_dtype(dtype)`."""
    out = output_dtype(dtype)
    if out.name == "float32":
        return np.asarray(x, np.float32)
    if out.name == "float16":
        return np.asarray(x, np.float32).astype(np.float16)
    return f32_to_bf16(x).view(out)  # bf16: uint16 bits, or the extension bfloat16 dtype asked for
