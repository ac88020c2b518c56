"""The numpy backend: `qlora_ref` behind the backend interface, on the CPU.

Every operation calls the spec, except dequantization into a caller's buffer (``out=`` and `bind_dequantize_4bit`),
which is the table-driven decoder in backends/numpy_lut.py: the same bits as the spec's (tested), several times faster;
a bound launch keeps its first result and copies it after (`DequantCache`: the frozen base's W_hat never changes).
At the boundary torch CPU tensors become numpy arrays (bf16 tensors as their uint16 bits, the spec's bf16 convention,
through backends.bridge).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable

import numpy as np

import qlora_ref
from qlora_ref.checks import NonFiniteError
from qlora_ref.checks import check_finite as _spec_check_finite
from qlora_ref.dtypes import DTYPES, to_float32

from . import numpy_adamw
from .bridge import dtype_name, is_torch, torch_to_numpy
from .numpy_lut import dequantize_4bit_into


class DequantCache:
    """The W_hat values bound launches keep on the CPU (NumpyBackend.bind_dequantize_4bit), within a byte budget for
    the whole process: min(4 GiB, a quarter of the machine's memory).  A kept copy is given back to the budget when
    its launch (its layer's binding) is gone."""

    def __init__(self, budget_bytes: int | None = None):
        self.budget_bytes = _default_cache_budget() if budget_bytes is None else int(budget_bytes)
        self.used_bytes = 0

    def keep(self, values: np.ndarray) -> np.ndarray | None:
        """A copy of ``values`` charged to the budget, or None when it does not fit."""
        if self.used_bytes + values.nbytes > self.budget_bytes:
            return None
        copy = values.copy()
        self.used_bytes += copy.nbytes
        weakref.finalize(copy, self._release, copy.nbytes)
        return copy

    def _release(self, nbytes: int) -> None:
        self.used_bytes -= nbytes


def _default_cache_budget() -> int:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 0
    return min(4 << 30, total // 4)


DEQUANT_CACHE = DequantCache()


class KeepMemo:
    """Dropout masks drawn in a forward, held until their backward redraws them (then given up), oldest dropped first
    beyond ``budget_bytes``: a mask is a pure function of (shape, p, seed), so a hit is the draw it replaces."""

    def __init__(self, budget_bytes: int = 512 << 20):
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self._masks: dict = {}

    def pop(self, key):
        keep = self._masks.pop(key, None)
        if keep is not None:
            self.used_bytes -= keep.numel()
        return keep

    def put(self, key, keep) -> None:
        if keep.numel() > self.budget_bytes:
            return
        self._masks[key] = keep
        self.used_bytes += keep.numel()
        while self.used_bytes > self.budget_bytes:  # dicts keep insertion order: the oldest first
            self.pop(next(iter(self._masks)))


KEEP_MEMO = KeepMemo()


def to_numpy(x, what: str = "input") -> tuple[np.ndarray, str | None]:
    """(numpy array, "bfloat16" or None): torch CPU tensors are viewed as numpy, bf16 as uint16 bits."""
    if is_torch(x):
        if x.device.type != "cpu":
            raise TypeError(
                f"{what} is a torch tensor on {x.device}; the numpy backend takes CPU tensors "
                "(use get_backend('cupy') for CUDA tensors, or .cpu())"
            )
        return torch_to_numpy(x), ("bfloat16" if dtype_name(x) == "bfloat16" else None)
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return np.asarray(x), None
    raise TypeError(f"{what} must be a numpy array or a torch CPU tensor, got {type(x).__name__}")


def _out_view(q, out, dtype: str | None) -> tuple[np.ndarray, str, object]:
    """(flat numpy view of out, its dtype name, the torch tensor or None) after checking out can take q's n values."""
    if not isinstance(q, qlora_ref.Quantized4bit):
        raise TypeError(f"dequantize_4bit expects a Quantized4bit, got {type(q).__name__}")
    tensor = out if is_torch(out) else None
    if tensor is not None and not out.is_contiguous():
        raise ValueError("out must be contiguous (the values are written as one flat buffer)")
    if tensor is None and isinstance(out, np.ndarray) and not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous (the values are written as one flat buffer)")
    view, name = to_numpy(out, "out")
    if name is None:
        name = "bfloat16" if view.dtype in (np.uint16, np.int16) else view.dtype.name
    if name not in DTYPES:
        raise TypeError(f"out has dtype {view.dtype}; it must be one of {DTYPES} (bf16 as uint16 bits)")
    if dtype is not None and dtype != name:
        raise TypeError(f"dtype={dtype!r} but out has dtype {name}; pass one or make them agree")
    if view.size != q.n:
        raise ValueError(f"out has {view.size} elements but the quantized tensor has {q.n}")
    flat = view.reshape(-1)
    if name == "bfloat16":
        flat = flat.view(np.uint16)
    return flat, name, tensor


class NumpyFiniteFlag:
    """The numpy backend's deferred non-finite count (see backends.cupy_backend.finite.FiniteFlag): a host counter."""

    def __init__(self) -> None:
        self.total = 0

    def clear(self) -> None:
        self.total = 0

    def count(self) -> int:
        return self.total

    def raise_if_nonfinite(self, what: str = "input") -> None:
        if self.total:
            raise NonFiniteError(
                f"{what} has {self.total} non-finite value(s) (NaN/Inf) since the flag was cleared; "
                "check the tensors one by one (check_finite without a flag) to find the first"
            )


class NumpyBackend:
    """CPU backend: every operation is the spec's (dequantization into a buffer: the same bits, table-driven)."""

    name = "numpy"
    device = "cpu"

    def to_host(self, x):
        """A numpy array (torch CPU tensors viewed, bf16 as uint16 bits); a Quantized4bit as it is."""
        if isinstance(x, qlora_ref.Quantized4bit):
            return x
        return to_numpy(x, "x")[0]

    to_device = to_host  # the numpy backend's device is the host

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
        view, name, tensor = _out_view(q, out, dtype)
        dequantize_4bit_into(q, view, name, tensor)
        return out

    def bind_dequantize_4bit(self, q, out) -> Callable[[], None]:
        """The launch that writes W_hat into ``out``.  On the CPU the first launch also keeps its values (the frozen
        base never changes, so every later W_hat is the same bits): later launches copy them instead of decoding
        again (the main job: 4 min 06 s -> 3 min 31 s, README), while the process's kept copies stay within
        ``DequantCache.budget_bytes``."""
        view, name, tensor = _out_view(q, out, None)
        kept: list[np.ndarray] = []

        def launch() -> None:
            if kept:
                np.copyto(view, kept[0])
                return
            dequantize_4bit_into(q, view, name, tensor)
            copy = DEQUANT_CACHE.keep(view)
            if copy is not None:
                kept.append(copy)

        return launch

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

    def dropout_keep(self, shape, p, seed):
        """keep = u >= f32(p), u = PCG64(seed)'s float32 uniforms of ``shape`` (LORA-3).  A pure function of its
        arguments: the backward's redraw of a forward's mask is served from `KEEP_MEMO` when it is still there."""
        import torch

        key = (tuple(int(d) for d in shape), float(p), int(seed))
        keep = KEEP_MEMO.pop(key)
        if keep is None:
            u = np.random.default_rng(seed).random(key[0], dtype=np.float32)  # 2x faster than torch's bernoulli_
            keep = torch.from_numpy(u >= np.float32(p))
            KEEP_MEMO.put(key, keep)
        return keep

    def dropout_keep_counter(self, shape, p, seed, salt):
        import torch

        from qlora_ref.lora import dropout_keep_counter

        return torch.from_numpy(dropout_keep_counter(tuple(shape), p, int(seed), salt))

    def dropout_apply_counter(self, x, p, seed, salt, dtype):
        from qlora_ref.lora import keep_scale

        noise = self.dropout_keep_counter(x.shape, p, seed, salt).to(dtype).mul_(keep_scale(p))
        return x.to(dtype) * noise

    def dropout_add_counter_(self, acc, d, p, seed, salt):
        from qlora_ref.lora import keep_scale

        noise = self.dropout_keep_counter(d.shape, p, seed, salt).to(d.dtype).mul_(keep_scale(p))
        return acc.add_(d * noise)

    def finite_flag(self) -> NumpyFiniteFlag:
        return NumpyFiniteFlag()

    def check_finite(self, x, what="input", *, flag=None):
        arr, bf16 = to_numpy(x, what)
        x32 = to_float32(arr, bf16)[0]
        if flag is not None:
            flag.total += int(x32.size - np.count_nonzero(np.isfinite(x32)))
            return
        _spec_check_finite(x32, what)

    def adamw_states(self, sizes, **options):
        return numpy_adamw.adamw_states(sizes, **options)

    def adamw_step(self, params, grads, states, index, scalars, *, decay="after", check_finite=True, skip=None):
        numpy_adamw.adamw_step(params, grads, states, index, scalars, decay=decay, check_finite=check_finite,
                               skip=skip)  # fmt: skip

    def clip_grad_norm_(self, grads, max_norm, *, error_if_nonfinite=True):
        return numpy_adamw.clip_grad_norm_(grads, max_norm, error_if_nonfinite=error_if_nonfinite)

    def matvec_4bit(self, x, q, *, dtype=None, out_dtype=None, out=None, check_finite=True, order="spec"):
        """qlora_ref.matvec.matvec_4bit (MV-1 .. MV-5), optionally written into ``out`` (numpy array or CPU tensor);
        the spec's order whatever ``order`` says (it is one of the orders "any" allows)."""
        from qlora_ref.dtypes import resolve_dtype
        from qlora_ref.matvec import ORDERS, matvec_4bit

        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")

        arr, bf16 = to_numpy(x, "x")
        if bf16 and dtype not in (None, "bfloat16"):
            raise TypeError(f"x is a bfloat16 tensor but dtype={dtype!r} was asked for; cast x first")
        if out is None:
            return matvec_4bit(arr, q, dtype=dtype or bf16, out_dtype="bfloat16" if out_dtype is None else out_dtype)
        contiguous = out.is_contiguous() if is_torch(out) else getattr(getattr(out, "flags", None), "c_contiguous", 1)
        if not contiguous:
            raise ValueError("out must be contiguous (y is written as one flat [T, out] buffer)")
        view, out_bf16 = to_numpy(out, "out")
        name = "bfloat16" if out_bf16 or view.dtype in (np.uint16, np.int16) else view.dtype.name
        want = name if out_dtype is None else resolve_dtype(out_dtype, "out_dtype")
        if name != want:
            raise TypeError(
                f"out has dtype {name} but the result is {want}; pass out_dtype={name!r} or an out of {want}"
            )
        y = matvec_4bit(arr, q, dtype=dtype or bf16, out_dtype=want)
        if view.size != y.size:
            raise ValueError(
                f"out has {view.size} elements but y is {list(y.shape)} ({y.size}); pass a buffer of y's shape"
            )
        view.reshape(-1)[...] = y.reshape(-1).view(view.dtype)
        return out

    def bind_matvec_4bit(self, q, tokens, *, x_dtype="bfloat16", out_dtype="bfloat16", order="spec"):
        """``launch(x, y)``: this backend's matvec_4bit(x, q, out=y) (the spec, CPU tensors); the arguments are
        checked now, the tensors at each call by the spec (the CPU path is the reference, not the fast one)."""
        from qlora_ref.matvec import launch_dtypes

        _, out_dtype = launch_dtypes(tokens, x_dtype, out_dtype, order)

        def launch(x, y) -> None:
            self.matvec_4bit(x, q, out=y, out_dtype=out_dtype, check_finite=False, order=order)

        return launch
