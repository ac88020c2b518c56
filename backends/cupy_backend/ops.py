"""The CuPy backend's operations: boundary validation, one launch-config function per kernel, the launches.

Every operation computes what its ``qlora_ref`` counterpart computes, bit for bit
(tests/backends/test_backend_parity.py); the math and rule IDs are in the kernel files' headers (kernels/*.cu) and in
qlora_ref.

Inputs are CuPy arrays or torch CUDA tensors, zero-copy.  The kernels run on torch's current stream when a torch
tensor is involved, otherwise on CuPy's.  On the hot paths (the quantizer's input, the dequantizer's ``out``) a torch
tensor reaches the kernel as its device address, which is what its DLPack view would hold, without the per-call DLPack
exchange (measured: it cost more host time than the 4096x4096 kernels); elsewhere tensors are viewed through DLPack
(bf16 as int16 bits, so no CuPy bfloat16 support is needed).  Results are CuPy arrays; bfloat16 results are uint16 bit
patterns, as in the spec; pass ``out=`` (a torch tensor or CuPy array) to write into a buffer of your own.

Operations that can reject their input (non-finite values, codes > 15) read a few status words back from the device
once, after all their kernels are queued: that is their single host synchronisation.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import cupy as cp
import numpy as np

import qlora_ref
from qlora_ref.checks import NonFiniteError, check_blocksize, check_nonempty
from qlora_ref.codebooks import (
    FP4_CODES_ASCENDING,
    FP4_THRESHOLDS,
    QUANT_TYPES,
    dequant_table,
    dynamic_map,
    int4_thresholds,
    nf4_thresholds,
)
from qlora_ref.double_quant import NESTED_BLOCKSIZE
from qlora_ref.dtypes import DTYPES

from . import build

THREADS = 256
_U64_MAX = np.uint64(2**64 - 1)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# --- launch configurations: (grid, block) per kernel ------------------------------------------------------------


def quantize_4bit_v1_config(nblocks: int) -> tuple[tuple[int], tuple[int]]:
    """One thread per quant block."""
    return (ceil_div(nblocks, 128),), (128,)


def quantize_4bit_v2_config(n: int, blocksize: int, itemsize: int) -> tuple[tuple[int], tuple[int]]:
    """256 threads per CTA, E values per thread: two 16-byte loads, or blocksize / 256 at 4096 (quantize_4bit.cu)."""
    values_per_thread = blocksize // 256 if blocksize > 2048 else 2 * (16 // itemsize)
    return (ceil_div(n, THREADS * values_per_thread),), (THREADS,)


def dequantize_4bit_v1_config(n: int) -> tuple[tuple[int], tuple[int]]:
    """One thread per output value."""
    return (ceil_div(n, THREADS),), (THREADS,)


def dequantize_4bit_v2_config(n: int, units: int, itemsize: int) -> tuple[tuple[int], tuple[int]]:
    """A thread per `units` units of 16 output bytes (16 / itemsize values each), one more unit slot for the tail."""
    return (ceil_div(n // (16 // itemsize) + 1, THREADS * units),), (THREADS,)


def quantize_blockwise_8bit_v1_config(nblocks: int) -> tuple[tuple[int], tuple[int]]:
    """One thread per block."""
    return (ceil_div(nblocks, 128),), (128,)


def quantize_blockwise_8bit_v2_config(nblocks: int) -> tuple[tuple[int], tuple[int]]:
    """One warp per block, 8 blocks per 256-thread CTA."""
    return (ceil_div(nblocks, 8),), (THREADS,)


def dequantize_blockwise_8bit_v1_config(n: int) -> tuple[tuple[int], tuple[int]]:
    return (ceil_div(n, THREADS),), (THREADS,)


def dequantize_blockwise_8bit_v2_config(n: int) -> tuple[tuple[int], tuple[int]]:
    """16 codes per thread."""
    return (ceil_div(n, THREADS * 16),), (THREADS,)


def absmax_sum_plan(n: int) -> tuple[int, int]:
    """(W lanes, vec) of the spec's offset summation tree for n absmax values (DQ-1, kernels/blockwise_8bit.cu).

    n <= 128: the scalar map, W = last_pow2(n); n > 128: the float4 map, W = min(last_pow2(n // 4), 512)
    (qlora_ref.double_quant.torch_block_sum; test_backend_parity checks the bits at both sides of 128).
    """
    if n > 128:
        return min(1 << ((n // 4).bit_length() - 1), 512), 1
    return min(1 << (n.bit_length() - 1), 512), 0


def absmax_sum_chains_config(lanes: int) -> tuple[tuple[int], tuple[int]]:
    """One thread per chain: 4W chains, 64 threads per CTA."""
    return (ceil_div(4 * lanes, 64),), (64,)


def absmax_sum_fold_config() -> tuple[tuple[int], tuple[int]]:
    """One CTA of 512 threads (W <= 512)."""
    return (1,), (512,)


def pack_4bit_v1_config(nbytes: int) -> tuple[tuple[int], tuple[int]]:
    return (ceil_div(nbytes, THREADS),), (THREADS,)


def pack_4bit_v2_config(nbytes: int) -> tuple[tuple[int], tuple[int]]:
    """16 packed bytes per thread."""
    return (ceil_div(nbytes, THREADS * 16),), (THREADS,)


unpack_4bit_v1_config = pack_4bit_v1_config
unpack_4bit_v2_config = pack_4bit_v2_config


def check_finite_v1_config(n: int) -> tuple[tuple[int], tuple[int]]:
    return (ceil_div(n, THREADS),), (THREADS,)


def check_finite_v2_config(n: int, itemsize: int) -> tuple[tuple[int], tuple[int]]:
    """FINITE_CHUNKS 16-byte vectors per thread, plus one slot for the scalar tail."""
    nvec = n // (16 // itemsize)
    return (ceil_div(nvec + 1, THREADS * build.FINITE_CHUNKS),), (THREADS,)


# --- inputs: CuPy arrays and torch CUDA tensors -------------------------------------------------------------------


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "__dlpack__") and hasattr(x, "is_cuda")


_STREAMS: dict[int, object] = {}


def _torch_stream_ptr(torch, device_index: int) -> int:
    """The raw cudaStream_t of torch's current stream on a device (the cheap private accessor when it exists)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return int(raw(device_index))
    return torch.cuda.current_stream(device_index).cuda_stream


def _cupy_stream(ptr: int):
    """A cached CuPy view of an external CUDA stream (the same stream: no synchronisation between torch and us)."""
    if ptr not in _STREAMS:
        with warnings.catch_warnings():  # CuPy 14 prefers Stream.from_external(obj), which needs more than a pointer
            warnings.simplefilter("ignore", DeprecationWarning)
            _STREAMS[ptr] = cp.cuda.ExternalStream(ptr)
    return _STREAMS[ptr]


@contextlib.contextmanager
def on_stream(*arrays):
    """Run on torch's current stream when a torch CUDA tensor is involved (on its device), else on CuPy's."""
    tensor = next((a for a in arrays if a is not None and _is_torch(a)), None)
    if tensor is None or not tensor.is_cuda:  # no torch, or a CPU tensor that the boundary check reports next
        yield
        return
    import torch

    index = tensor.device.index
    if cp.cuda.runtime.getDevice() != index:
        with cp.cuda.Device(index), _cupy_stream(_torch_stream_ptr(torch, index)):
            yield
    else:
        with _cupy_stream(_torch_stream_ptr(torch, index)):
            yield


def as_device_array(x, what: str, dtype: str | None = None) -> tuple[cp.ndarray, str]:
    """A contiguous CuPy view (zero-copy where possible) of a CuPy array / torch CUDA tensor, and its dtype name.

    bfloat16 comes back as uint16 bits; uint16 input is read as bf16 bits (with ``dtype`` None or "bfloat16").
    """
    if _is_torch(x):
        import torch

        if not x.is_cuda:
            raise TypeError(
                f"{what} is a torch tensor on {x.device}; the cupy backend needs a CUDA tensor "
                "(use .cuda(), or get_backend('numpy') for CPU tensors)"
            )
        name = str(x.dtype).removeprefix("torch.")
        if x.dtype == torch.bfloat16:
            arr = cp.from_dlpack(x.detach().contiguous().view(torch.int16)).view(cp.uint16)
        else:
            arr = cp.from_dlpack(x.detach().contiguous())
    elif isinstance(x, cp.ndarray):
        arr = x
        name = arr.dtype.name
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
class _Input:
    """A kernel's view of a quantizer input: the launch argument (CuPy array, or a torch tensor's device address),
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


_TORCH_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def input_view(x, what: str, dtype: str | None = None) -> _Input:
    """Zero-copy input view.  torch CUDA tensors go to the kernel as their device address (no per-call DLPack
    exchange: it costs more host time than a small kernel); CuPy arrays as themselves (see `as_device_array`)."""
    if _is_torch(x) and x.is_cuda:
        name = str(x.dtype).removeprefix("torch.")
        if name not in _TORCH_DTYPES:
            raise TypeError(f"{what} dtype {name} is not supported: pass float32, float16 or bfloat16")
        if dtype is not None and dtype != name:
            raise TypeError(f"{what} dtype is {name} but dtype={dtype!r} was asked for; cast the input first")
        t = x.detach()
        if not t.is_contiguous():
            t = t.contiguous()
        ptr = t.data_ptr()
        return _Input(np.uint64(ptr), t.numel(), name, ptr % 16 == 0, t)
    xd, name = as_device_array(x, what, dtype)
    xd = xd.ravel()
    return _Input(xd, xd.size, name, xd.data.ptr % 16 == 0, xd)


def _uint8_array(x, what: str) -> cp.ndarray:
    if _is_torch(x):
        x = cp.from_dlpack(x.detach().contiguous())
    if isinstance(x, np.ndarray):
        x = cp.asarray(x)
    if not isinstance(x, cp.ndarray):
        raise TypeError(f"{what} must be a CuPy array or a torch CUDA tensor, got {type(x).__name__}")
    if x.dtype != cp.uint8:
        raise TypeError(f"{what} must be uint8, got {x.dtype}")
    return cp.ascontiguousarray(x).ravel()


def _f32_array(x, what: str) -> cp.ndarray:
    if isinstance(x, np.ndarray):
        x = cp.asarray(x)
    if _is_torch(x):
        x = cp.from_dlpack(x.detach().contiguous())
    if not isinstance(x, cp.ndarray):
        raise TypeError(f"{what} must be a CuPy array or a torch CUDA tensor, got {type(x).__name__}")
    if x.dtype.kind != "f":
        raise TypeError(f"{what} must be a floating-point array, got {x.dtype}")
    return cp.ascontiguousarray(x, dtype=cp.float32).ravel()


def _aligned(*arrays: cp.ndarray) -> bool:
    return all(a.data.ptr % 16 == 0 for a in arrays)


def _status() -> cp.ndarray:
    """Status words, zeroed: [0] non-finite count, [1] ~(first non-finite index) (atomicMax of the complement),
    [2] unused, [3] f32 offset bits."""
    return cp.zeros(4, cp.uint64)


_PINNED: dict[int, np.ndarray] = {}


def _read_status(status: cp.ndarray) -> np.ndarray:
    """Copy the status words to pinned host memory and wait for them: the operation's one synchronisation."""
    key = cp.cuda.Device().id
    if key not in _PINNED:
        import cupyx

        _PINNED[key] = cupyx.empty_pinned(4, np.uint64)
    return status.get(out=_PINNED[key]).copy()


def _first_index(word: np.uint64) -> int:
    return int(_U64_MAX - np.uint64(word))


def _nonfinite_error(x: _Input, count: int, first: int, what: str) -> NonFiniteError:
    """The spec's message (qlora_ref.checks.check_finite), value read back from the device."""
    value = x.value_at(first)
    return NonFiniteError(
        f"{what} has {count} non-finite value(s) (NaN/Inf); the first is {value} at flat index {first}. "
        "Quantization needs finite weights: fix or mask them before quantizing."
    )


# --- codebooks as device constants, from qlora_ref (one source of truth) ------------------------------------------


@dataclass(frozen=True)
class _Codebook:
    thresholds: cp.ndarray  # float32[16], ascending, padded with +inf
    perm: cp.ndarray  # uint8[16]: code of the k-th magnitude interval (FP4); identity otherwise
    table: cp.ndarray  # float32[16]: the decode table (dequant_table)


_CODEBOOKS: dict[tuple[str, int], _Codebook] = {}
_DYNAMIC: dict[tuple[bool, int], cp.ndarray] = {}


def codebook(quant_type: str) -> _Codebook:
    key = (quant_type, cp.cuda.Device().id)
    if key not in _CODEBOOKS:
        t = np.full(16, np.inf, np.float32)
        perm = np.arange(16, dtype=np.uint8)
        if quant_type == "nf4":
            t[:15] = nf4_thresholds()
        elif quant_type == "int4":
            t[:14] = int4_thresholds()
        else:
            t[: FP4_THRESHOLDS.size] = FP4_THRESHOLDS
            perm[: FP4_CODES_ASCENDING.size] = FP4_CODES_ASCENDING
        assert np.all(np.diff(t[np.isfinite(t)]) > 0), "thresholds must ascend"
        _CODEBOOKS[key] = _Codebook(cp.asarray(t), cp.asarray(perm), cp.asarray(dequant_table(quant_type)))
    return _CODEBOOKS[key]


def signed_dynamic_map() -> cp.ndarray:
    key = (True, cp.cuda.Device().id)
    if key not in _DYNAMIC:
        _DYNAMIC[key] = cp.asarray(dynamic_map(signed=True))
    return _DYNAMIC[key]


# --- the quantized state on the device ------------------------------------------------------------------------------


class DeviceQuantized4bit(qlora_ref.Quantized4bit):
    """`qlora_ref.Quantized4bit` whose arrays are CuPy arrays on the GPU (``offset`` stays a host np.float32).

    Same fields and checks as the spec's class; ``to_host()`` gives the spec's object (byte for byte the same data),
    and everything that needs host arrays (state dicts, ``codes()``) goes through it.
    """

    def __post_init__(self) -> None:
        fields = self._fields()
        for k in ("packed", "absmax", "absmax_q", "nested_absmax"):  # the arrays must be on the device
            if fields[k] is not None and not isinstance(fields[k], cp.ndarray):
                raise TypeError(f"DeviceQuantized4bit.{k} must be a CuPy array, got {type(fields[k]).__name__}")
        # Validate shapes / dtypes / combinations with the spec's own rules, on zero-byte stand-ins of the arrays.
        stand_in = {
            k: (
                np.lib.stride_tricks.as_strided(np.zeros(1, v.dtype), v.shape, (0,) * v.ndim)
                if isinstance(v, cp.ndarray)
                else v
            )
            for k, v in fields.items()
        }
        qlora_ref.Quantized4bit(**stand_in)
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.offset is not None:
            object.__setattr__(self, "offset", np.float32(self.offset))

    def _fields(self) -> dict:
        names = (
            "packed",
            "shape",
            "dtype",
            "quant_type",
            "blocksize",
            "absmax",
            "absmax_q",
            "nested_absmax",
            "offset",
            "nested_blocksize",
        )
        return {k: getattr(self, k) for k in names}

    def to_host(self) -> qlora_ref.Quantized4bit:
        """The spec's object with numpy copies of the arrays."""
        return qlora_ref.Quantized4bit(
            **{k: (v.get() if isinstance(v, cp.ndarray) else v) for k, v in self._fields().items()}
        )

    @classmethod
    def _trusted(cls, **fields) -> DeviceQuantized4bit:
        """Build from fields this module just computed (shapes and dtypes right by construction): no re-validation,
        which costs more host time than the kernels of a small quantize."""
        q = object.__new__(cls)
        defaults = {
            "absmax": None,
            "absmax_q": None,
            "nested_absmax": None,
            "offset": None,
            "nested_blocksize": NESTED_BLOCKSIZE,
        }
        for k, v in {**defaults, **fields}.items():
            object.__setattr__(q, k, v)
        return q

    @classmethod
    def from_host(cls, q: qlora_ref.Quantized4bit) -> DeviceQuantized4bit:
        """Copy a spec object's arrays to the current device."""
        if isinstance(q, DeviceQuantized4bit):
            return q
        fields = {
            "packed": q.packed,
            "shape": q.shape,
            "dtype": q.dtype,
            "quant_type": q.quant_type,
            "blocksize": q.blocksize,
            "absmax": q.absmax,
            "absmax_q": q.absmax_q,
            "nested_absmax": q.nested_absmax,
            "offset": q.offset,
            "nested_blocksize": q.nested_blocksize,
        }
        return cls(**{k: (cp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in fields.items()})

    def absmax_f32(self) -> cp.ndarray:
        """Decoded float32 absmax on the device (DQ-3), same bits as the spec's."""
        if not self.double_quant:
            return self.absmax
        return dequantize_blockwise_8bit(
            self.absmax_q, self.nested_absmax, signed_dynamic_map(), NESTED_BLOCKSIZE
        ) + cp.float32(self.offset)

    def codes(self) -> cp.ndarray:
        return unpack_4bit(self.packed, self.n)

    def to_bnb_state_dict(self, prefix: str = "weight") -> dict[str, np.ndarray]:
        return self.to_host().to_bnb_state_dict(prefix)


# --- operations -----------------------------------------------------------------------------------------------------


def quantize_4bit(
    x,
    *,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    dtype: str | None = None,
    kernel: str = "v2",
) -> DeviceQuantized4bit:
    """qlora_ref.quantize_4bit on the GPU: same arguments, same bytes (kernels/quantize_4bit.cu)."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    blocksize = check_blocksize(blocksize)
    if kernel not in ("v1", "v2"):
        raise ValueError(f"kernel must be 'v1' or 'v2', got {kernel!r}")
    shape = tuple(int(d) for d in x.shape)
    with on_stream(x):
        xv = input_view(x, "input", dtype)
        dtype, n = xv.dtype, xv.n
        if n == 0:
            check_nonempty(np.empty(shape, np.float32))
        nblocks = ceil_div(n, blocksize)
        cb = codebook(quant_type)
        packed = cp.empty((n + 1) // 2, cp.uint8)
        absmax = cp.empty(nblocks, cp.float32)
        status = _status()
        ctype, qt = build.CTYPES[dtype], build.QT[quant_type]
        if kernel == "v1":
            grid, block = quantize_4bit_v1_config(nblocks)
            k = build.kernel("quantize_4bit.cu", f"quantize_4bit_v1<{ctype}, {qt}>")
            k(grid, block, (xv.arg, np.int64(n), np.int32(blocksize), cb.thresholds, cb.perm, packed, absmax, status))
        else:
            grid, block = quantize_4bit_v2_config(n, blocksize, 4 if dtype == "float32" else 2)
            k = build.kernel("quantize_4bit.cu", f"quantize_4bit_v2<{ctype}, {qt}, {blocksize}>")
            vec_ok = np.int32(xv.aligned)
            k(grid, block, (xv.arg, np.int64(n), vec_ok, cb.thresholds, cb.perm, packed, absmax, status))
        if double_quant:
            absmax_q = cp.empty(nblocks, cp.uint8)
            nested = cp.empty(ceil_div(nblocks, NESTED_BLOCKSIZE), cp.float32)
            offset_dev = status.view(cp.float32)[6:7]  # low half of status[3]
            _absmax_offset_launch(absmax, nblocks, status)
            _quantize_8bit_launch(
                absmax, nblocks, NESTED_BLOCKSIZE, signed_dynamic_map(), offset_dev, absmax_q, nested, kernel
            )
        st = _read_status(status)  # the one synchronisation
        if st[0]:
            raise _nonfinite_error(xv, int(st[0]), _first_index(st[1]), "input")
        common = dict(packed=packed, shape=shape, dtype=dtype, quant_type=quant_type, blocksize=blocksize)
        if not double_quant:
            return DeviceQuantized4bit._trusted(absmax=absmax, **common)
        offset = st[3:4].view(np.float32)[0]  # little-endian: the low 32 bits of status[3]
        if not np.isfinite(offset):  # the spec's refusal (qlora_ref.double_quant.double_quantize), same message
            raise ValueError(
                "double quantization needs the float32 sum of the block absmax values, which overflows for this "
                f"input (max absmax {np.float32(absmax.max().get()):.3g}); quantize it with double_quant=False"
            )
        return DeviceQuantized4bit._trusted(
            absmax_q=absmax_q, nested_absmax=nested, offset=np.float32(offset), **common
        )


def _absmax_offset_launch(absmax: cp.ndarray, n: int, status: cp.ndarray) -> None:
    """status[3] = bits of the float32 offset of absmax[:n] (DQ-1), in the tree `absmax_sum_plan` names."""
    lanes, vec = absmax_sum_plan(n)
    acc = cp.empty(4 * lanes, cp.float32)
    build.kernel("blockwise_8bit.cu", f"absmax_sum_chains<{build.SUM_LOADS_AHEAD}>")(
        *absmax_sum_chains_config(lanes), (absmax, np.int64(n), np.int32(lanes), np.int32(vec), acc)
    )
    build.kernel("blockwise_8bit.cu", "absmax_sum_fold")(
        *absmax_sum_fold_config(), (acc, np.int64(n), np.int32(lanes), status)
    )


def _quantize_8bit_launch(x, n, blocksize, code, offset_dev, codes, absmax, kernel):
    sub = "true" if offset_dev is not None else "false"
    nblocks = ceil_div(n, blocksize)
    offset_arg = offset_dev if offset_dev is not None else code  # unused pointer when not centring
    if kernel == "v1":
        grid, block = quantize_blockwise_8bit_v1_config(nblocks)
        k = build.kernel("blockwise_8bit.cu", f"quantize_blockwise_8bit_v1<{sub}>")
    else:
        grid, block = quantize_blockwise_8bit_v2_config(nblocks)
        k = build.kernel("blockwise_8bit.cu", f"quantize_blockwise_8bit_v2<{sub}>")
    k(grid, block, (x, np.int64(n), np.int32(blocksize), code, offset_arg, codes, absmax))


def _resolve_out(out, n: int, dtype: str | None, default: str):
    """(kernel argument for out, dtype name, device address) after checking that out can take n values of the dtype
    asked for; (None, dtype, None) without out.  A torch tensor is passed to the kernel as its raw device address
    (zero-copy, as its DLPack view would be, without the per-call DLPack exchange)."""
    if out is None:
        return None, (dtype or default), None
    if _is_torch(out):
        if not out.is_cuda:
            raise TypeError(f"out is a torch tensor on {out.device}; the cupy backend writes CUDA tensors only")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous (the kernel writes it as one flat buffer)")
        name, size, ptr = str(out.dtype).removeprefix("torch."), out.numel(), out.data_ptr()
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


def dequantize_4bit(
    q, *, dtype: str | None = None, out=None, kernel: str = "v2", chunks: int = build.DEQUANT_CHUNKS_DEFAULT
):
    """qlora_ref.dequantize_4bit on the GPU in one launch (kernels/dequantize_4bit.cu).

    dtype: None -> out's dtype if out is given, else q.dtype.  Returns out (as given), else a CuPy array of q.shape
    (bfloat16 as uint16 bits, as in the spec).
    """
    if not isinstance(q, qlora_ref.Quantized4bit):
        raise TypeError(f"dequantize_4bit expects a Quantized4bit, got {type(q).__name__}")
    if kernel not in ("v1", "v2") or chunks not in build.DEQUANT_CHUNKS:
        raise ValueError(
            f"kernel must be 'v1' or 'v2' and chunks one of {build.DEQUANT_CHUNKS}; got {kernel!r}, {chunks!r}"
        )
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    with on_stream(out):
        qd = DeviceQuantized4bit.from_host(q)
        n = qd.n
        out_arg, dtype, out_ptr = _resolve_out(out, n, dtype, qd.dtype)
        result = None
        if out_arg is None:
            result = cp.empty(n, cp.uint16 if dtype == "bfloat16" else dtype)
            out_arg, out_ptr = result, result.data.ptr
        cb = codebook(qd.quant_type)
        dq = qd.double_quant
        dummy_f32, dummy_u8 = cb.table, cb.perm  # pointers the kernel does not read in this mode
        args = (
            qd.packed,
            np.int64(n),
            np.int32(qd.blocksize.bit_length() - 1),
            cb.table,
            dummy_f32 if dq else qd.absmax,
            qd.absmax_q if dq else dummy_u8,
            signed_dynamic_map() if dq else dummy_f32,
            qd.nested_absmax if dq else dummy_f32,
            np.float32(qd.offset if dq else 0.0),
            out_arg,
        )
        ctype, dqs = build.CTYPES[dtype], "true" if dq else "false"
        if kernel == "v2" and qd.packed.data.ptr % 16 == 0 and out_ptr % 16 == 0:
            grid, block = dequantize_4bit_v2_config(n, chunks, 4 if dtype == "float32" else 2)
            k = build.kernel("dequantize_4bit.cu", f"dequantize_4bit_v2<{ctype}, {dqs}, {chunks}>")
        else:
            grid, block = dequantize_4bit_v1_config(n)
            k = build.kernel("dequantize_4bit.cu", f"dequantize_4bit_v1<{ctype}, {dqs}>")
        k(grid, block, args)
    return out if out is not None else result.reshape(qd.shape)


def quantize_blockwise_8bit(x, code, blocksize: int = 256, *, kernel: str = "v2") -> tuple[cp.ndarray, cp.ndarray]:
    """qlora_ref.quantize_blockwise_8bit on the GPU: (codes uint8[n], absmax float32[nblocks])."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive integer, got {blocksize!r}")
    with on_stream(x):
        xd = _f32_array(x, "x")
        coded = _f32_array(code, "code")
        if coded.size != 256:
            raise ValueError(f"code must have 256 entries (a sorted dynamic map), got {coded.size}")
        n = xd.size
        check_nonempty(xd, "x")
        check_finite(xd)  # the spec refuses NaN/Inf here too (qlora_ref.blockwise.quantize_blockwise_8bit)
        codes = cp.empty(n, cp.uint8)
        absmax = cp.empty(ceil_div(n, int(blocksize)), cp.float32)
        _quantize_8bit_launch(xd, n, int(blocksize), coded, None, codes, absmax, kernel)
    return codes, absmax


def dequantize_blockwise_8bit(
    codes, absmax, code, blocksize: int = 256, n: int | None = None, *, kernel: str = "v2"
) -> cp.ndarray:
    """qlora_ref.dequantize_blockwise_8bit on the GPU: code[q] * absmax[i // blocksize], float32[n]."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive integer, got {blocksize!r}")
    with on_stream(codes, absmax):
        cd = _uint8_array(codes, "codes")
        am = _f32_array(absmax, "absmax")
        coded = _f32_array(code, "code")
        n = cd.size if n is None else int(n)
        if not 0 <= n <= cd.size or am.size < ceil_div(n, int(blocksize)):
            raise ValueError(
                f"n={n} needs {n} codes and {ceil_div(n, int(blocksize))} absmax values; got {cd.size} and {am.size}"
            )
        out = cp.empty(n, cp.float32)
        if n == 0:
            return out
        args = (cd, np.int64(n), np.int32(blocksize), coded, am, out)
        if kernel == "v2" and blocksize % 16 == 0 and _aligned(cd, out):
            build.kernel("blockwise_8bit.cu", "dequantize_blockwise_8bit_v2")(
                *dequantize_blockwise_8bit_v2_config(n), args
            )
        else:
            build.kernel("blockwise_8bit.cu", "dequantize_blockwise_8bit_v1")(
                *dequantize_blockwise_8bit_v1_config(n), args
            )
    return out


def pack_4bit(codes, filler: int = 0, *, kernel: str = "v2") -> cp.ndarray:
    """qlora_ref.pack_4bit on the GPU: [a, b, c] -> [ab, c<filler>] (PK-1, PK-2)."""
    if isinstance(filler, bool) or not isinstance(filler, (int, np.integer)) or not 0 <= filler <= 15:
        raise ValueError(f"filler must be a 4-bit code (0..15), got {filler!r}")
    with on_stream(codes):
        cd = _uint8_array(codes, "codes")
        n = cd.size
        nbytes = (n + 1) // 2
        packed = cp.empty(nbytes, cp.uint8)
        if n == 0:
            return packed
        status = cp.zeros(1, cp.uint32)
        args = (cd, np.int64(n), np.int32(filler), packed, status)
        if kernel == "v2" and _aligned(cd, packed):
            build.kernel("packing.cu", "pack_4bit_v2")(*pack_4bit_v2_config(nbytes), args)
        else:
            build.kernel("packing.cu", "pack_4bit_v1")(*pack_4bit_v1_config(nbytes), args)
        top = int(status.get()[0])
        if top > 15:
            raise ValueError(f"codes must be 4-bit (0..15); found {top}")
    return packed


def unpack_4bit(packed, n: int, *, kernel: str = "v2") -> cp.ndarray:
    """qlora_ref.unpack_4bit on the GPU: the first n codes (PK-3)."""
    with on_stream(packed):
        pd = _uint8_array(packed, "packed")
        if pd.size != (n + 1) // 2:
            raise ValueError(f"{n} codes need {(n + 1) // 2} packed bytes, got {pd.size}")
        codes = cp.empty(n, cp.uint8)
        if n == 0:
            return codes
        args = (pd, np.int64(n), codes)
        if kernel == "v2" and _aligned(pd, codes):
            build.kernel("packing.cu", "unpack_4bit_v2")(*unpack_4bit_v2_config(pd.size), args)
        else:
            build.kernel("packing.cu", "unpack_4bit_v1")(*unpack_4bit_v1_config(pd.size), args)
    return codes


def check_finite(x, what: str = "input", *, kernel: str = "v2") -> None:
    """qlora_ref.checks.check_finite on the GPU: raises NonFiniteError (same message) on NaN/Inf."""
    with on_stream(x):
        xv = input_view(x, what)
        n = xv.n
        if n == 0:
            return
        status = _status()
        ctype = build.CTYPES[xv.dtype]
        if kernel == "v2" and xv.aligned:
            grid, block = check_finite_v2_config(n, 4 if xv.dtype == "float32" else 2)
            k = build.kernel("check_finite.cu", f"check_finite_v2<{ctype}, {build.FINITE_CHUNKS}>")
            k(grid, block, (xv.arg, np.int64(n), np.int32(1), status))
        else:
            k = build.kernel("check_finite.cu", f"check_finite_v1<{ctype}>")
            k(*check_finite_v1_config(n), (xv.arg, np.int64(n), status))
        st = _read_status(status)
        if st[0]:
            raise _nonfinite_error(xv, int(st[0]), _first_index(st[1]), what)
