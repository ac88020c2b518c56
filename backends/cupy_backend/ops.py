"""The CuPy backend's operations: each one is its ``qlora_ref`` counterpart on the GPU, bit for bit.

(tests/backends/test_backend_parity.py.)  The math and rule IDs are in the kernel files' headers (kernels/*.cu) and in
qlora_ref; the launch configurations in launch.py; what the operations accept, and their status read-back, in
inputs.py; the device state (`DeviceQuantized4bit`, codebooks) in quantized.py; the torch/CuPy boundary in
backends/bridge.py.

The kernels run on torch's current stream when a torch tensor is involved, otherwise on CuPy's.  Results are CuPy
arrays; bfloat16 results are uint16 bit patterns, as in the spec; pass ``out=`` (a torch tensor or CuPy array) to
write into a buffer of your own.

Two dequantize entry points:
    dequantize_4bit(q, out=buf)            checks everything, every call (the safe, general one)
    launch = bind_dequantize_4bit(q, buf)  checks and resolves once; launch() only queues the kernel (the lean one)
"""

from __future__ import annotations

from collections.abc import Callable

import cupy as cp
import numpy as np

import qlora_ref
from backends.bridge import is_torch, on_torch_stream, torch_stream_getter
from qlora_ref.checks import check_blocksize, check_nonempty
from qlora_ref.codebooks import QUANT_TYPES
from qlora_ref.double_quant import NESTED_BLOCKSIZE
from qlora_ref.dtypes import DTYPES

from . import build, launch
from . import offset as torch_mean
from .finite import FiniteFlag, check_finite
from .inputs import (
    aligned,
    f32_array,
    first_index,
    input_view,
    new_status,
    nonfinite_error,
    read_status,
    resolve_out,
    uint8_array,
)
from .launch import ceil_div
from .quantized import DeviceQuantized4bit, codebook, signed_dynamic_map, state_args

on_stream = on_torch_stream  # run on torch's current stream when a torch CUDA tensor is among the arguments

__all__ = [
    "DeviceQuantized4bit",
    "FiniteFlag",
    "bind_dequantize_4bit",
    "check_finite",
    "codebook",
    "dequantize_4bit",
    "dequantize_blockwise_8bit",
    "pack_4bit",
    "quantize_4bit",
    "quantize_blockwise_8bit",
    "signed_dynamic_map",
    "to_device",
    "to_host",
    "unpack_4bit",
]


# --- quantize_4bit ---------------------------------------------------------------------------------------------------


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
        status = new_status()
        ctype, qt = build.CTYPES[dtype], build.QT[quant_type]
        if kernel == "v1":
            grid, block = launch.quantize_4bit_v1_config(nblocks)
            k = build.kernel("quantize_4bit.cu", f"quantize_4bit_v1<{ctype}, {qt}>")
            k(grid, block, (xv.arg, np.int64(n), np.int32(blocksize), cb.thresholds, cb.perm, packed, absmax, status))
        else:
            grid, block = launch.quantize_4bit_v2_config(n, blocksize, 4 if dtype == "float32" else 2)
            k = build.kernel("quantize_4bit.cu", f"quantize_4bit_v2<{ctype}, {qt}, {blocksize}>")
            vec_ok = np.int32(xv.aligned)
            k(grid, block, (xv.arg, np.int64(n), vec_ok, cb.thresholds, cb.perm, packed, absmax, status))
        if double_quant:
            absmax_q = cp.empty(nblocks, cp.uint8)
            nested = cp.empty(ceil_div(nblocks, NESTED_BLOCKSIZE), cp.float32)
            offset_dev = status.view(cp.float32)[6:7]  # low half of status[3]
            torch_mean.absmax_mean(absmax, **torch_mean.current_device(), out=offset_dev)  # torch's order (DQ-5)
            _quantize_8bit_launch(
                absmax, nblocks, NESTED_BLOCKSIZE, signed_dynamic_map(), offset_dev, absmax_q, nested, kernel
            )
        st = read_status(status)  # the one synchronisation
        if st[0]:
            raise nonfinite_error(xv, int(st[0]), first_index(st[1]), "input")
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


def _quantize_8bit_launch(x, n, blocksize, code, offset_dev, codes, absmax, kernel):
    sub = "true" if offset_dev is not None else "false"
    nblocks = ceil_div(n, blocksize)
    offset_arg = offset_dev if offset_dev is not None else code  # unused pointer when not centring
    if kernel == "v1":
        grid, block = launch.quantize_blockwise_8bit_v1_config(nblocks)
        k = build.kernel("blockwise_8bit.cu", f"quantize_blockwise_8bit_v1<{sub}>")
    else:
        grid, block = launch.quantize_blockwise_8bit_v2_config(nblocks)
        k = build.kernel("blockwise_8bit.cu", f"quantize_blockwise_8bit_v2<{sub}>")
    k(grid, block, (x, np.int64(n), np.int32(blocksize), code, offset_arg, codes, absmax))


# --- dequantize_4bit -------------------------------------------------------------------------------------------------


def _check_dequantize_args(q, dtype, kernel, chunks) -> None:
    if not isinstance(q, qlora_ref.Quantized4bit):
        raise TypeError(f"dequantize_4bit expects a Quantized4bit, got {type(q).__name__}")
    if kernel not in ("v1", "v2") or chunks not in build.DEQUANT_CHUNKS:
        raise ValueError(
            f"kernel must be 'v1' or 'v2' and chunks one of {build.DEQUANT_CHUNKS}; got {kernel!r}, {chunks!r}"
        )
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")


def _dequantize_launch(qd: DeviceQuantized4bit, out_arg, out_ptr: int, dtype: str, kernel: str, chunks: int):
    """(RawKernel, grid, block, args) of one dequantize_4bit launch writing ``out_arg`` (kernels/dequantize_4bit.cu):
    v2 where the packed bytes and out are 16-byte aligned, else v1."""
    n = qd.n
    dq = qd.double_quant
    args = (qd.packed, np.int64(n), np.int32(qd.blocksize.bit_length() - 1), *state_args(qd), out_arg)
    ctype, dqs = build.CTYPES[dtype], "true" if dq else "false"
    if kernel == "v2" and qd.packed.data.ptr % 16 == 0 and out_ptr % 16 == 0:
        grid, block = launch.dequantize_4bit_v2_config(n, chunks, 4 if dtype == "float32" else 2)
        k = build.kernel("dequantize_4bit.cu", f"dequantize_4bit_v2<{ctype}, {dqs}, {chunks}>")
    else:
        grid, block = launch.dequantize_4bit_v1_config(n)
        k = build.kernel("dequantize_4bit.cu", f"dequantize_4bit_v1<{ctype}, {dqs}>")
    return k, grid, block, args


def dequantize_4bit(
    q, *, dtype: str | None = None, out=None, kernel: str = "v2", chunks: int = build.DEQUANT_CHUNKS_DEFAULT
):
    """qlora_ref.dequantize_4bit on the GPU in one launch (kernels/dequantize_4bit.cu).

    dtype: None -> out's dtype if out is given, else q.dtype.  ``out``: a torch CUDA tensor (bf16 / fp16 / fp32) or a
    CuPy array (bf16 as uint16) of q.n elements, contiguous; the values are written there and ``out`` is returned.
    Without out: a new CuPy array of q.shape (bfloat16 as uint16 bits, as in the spec).
    """
    _check_dequantize_args(q, dtype, kernel, chunks)
    with on_stream(out):
        qd = DeviceQuantized4bit.from_host(q)
        out_arg, dtype, out_ptr = resolve_out(out, qd.n, dtype, qd.dtype)
        result = None
        if out_arg is None:
            result = cp.empty(qd.n, cp.uint16 if dtype == "bfloat16" else dtype)
            out_arg, out_ptr = result, result.data.ptr
        k, grid, block, args = _dequantize_launch(qd, out_arg, out_ptr, dtype, kernel, chunks)
        k(grid, block, args)
    return out if out is not None else result.reshape(qd.shape)


def bind_dequantize_4bit(
    q, out, *, kernel: str = "v2", chunks: int = build.DEQUANT_CHUNKS_DEFAULT
) -> Callable[[], None]:
    """A launch of ``dequantize_4bit(q, out=out)`` with everything resolved now; calling it only queues the kernel.

    Checked and resolved once: q (copied to the device if it is a host object), out (torch CUDA tensor or CuPy array
    of q.n elements, contiguous; its dtype is the output dtype), the compiled kernel function, the launch
    configuration and the argument tuple (device addresses of q's arrays, the device codebook and out).  Each call:
    torch's current stream on out's device (for a torch ``out``; CuPy's current stream for a CuPy ``out``), then the
    launch.  No allocation, no host synchronisation, so the call can be captured in a CUDA graph.

    The launch holds references to q's device arrays and to out: it stays bound to those buffers.  Call it with the
    device it was bound on current (torch's and CuPy's current device are the same CUDA runtime setting).
    """
    _check_dequantize_args(q, None, kernel, chunks)
    device_index = out.device.index if is_torch(out) and out.is_cuda else None
    with on_stream(out):
        qd = DeviceQuantized4bit.from_host(q)
        out_arg, dtype, out_ptr = resolve_out(out, qd.n, None, qd.dtype)
        k, grid, block, args = _dequantize_launch(qd, out_arg, out_ptr, dtype, kernel, chunks)
        fn = k.kernel  # the cupy.cuda.Function for this device (compiled and loaded now)
    raw_args = tuple(np.uint64(a.data.ptr) if isinstance(a, cp.ndarray) else a for a in args)
    keep = (qd, args, out)  # the buffers raw_args point into stay alive as long as the launch

    if device_index is None:

        def launch_on_cupy_stream() -> None:
            fn(grid, block, raw_args)

        launch_on_cupy_stream.keep = keep
        return launch_on_cupy_stream

    stream = torch_stream_getter(device_index)

    def launch_on_torch_stream() -> None:
        fn(grid, block, raw_args, 0, stream())

    launch_on_torch_stream.keep = keep
    return launch_on_torch_stream


# --- 8-bit blockwise -------------------------------------------------------------------------------------------------


def quantize_blockwise_8bit(x, code, blocksize: int = 256, *, kernel: str = "v2") -> tuple[cp.ndarray, cp.ndarray]:
    """qlora_ref.quantize_blockwise_8bit on the GPU: (codes uint8[n], absmax float32[nblocks])."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive integer, got {blocksize!r}")
    with on_stream(x):
        xd = f32_array(x, "x")
        coded = f32_array(code, "code")
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
        cd = uint8_array(codes, "codes")
        am = f32_array(absmax, "absmax")
        coded = f32_array(code, "code")
        n = cd.size if n is None else int(n)
        if not 0 <= n <= cd.size or am.size < ceil_div(n, int(blocksize)):
            raise ValueError(
                f"n={n} needs {n} codes and {ceil_div(n, int(blocksize))} absmax values; got {cd.size} and {am.size}"
            )
        out = cp.empty(n, cp.float32)
        if n == 0:
            return out
        args = (cd, np.int64(n), np.int32(blocksize), coded, am, out)
        if kernel == "v2" and blocksize % 16 == 0 and aligned(cd, out):
            build.kernel("blockwise_8bit.cu", "dequantize_blockwise_8bit_v2")(
                *launch.dequantize_blockwise_8bit_v2_config(n), args
            )
        else:
            build.kernel("blockwise_8bit.cu", "dequantize_blockwise_8bit_v1")(
                *launch.dequantize_blockwise_8bit_v1_config(n), args
            )
    return out


# --- packing ---------------------------------------------------------------------------------------------------------


def pack_4bit(codes, filler: int = 0, *, kernel: str = "v2") -> cp.ndarray:
    """qlora_ref.pack_4bit on the GPU: [a, b, c] -> [ab, c<filler>] (PK-1, PK-2)."""
    if isinstance(filler, bool) or not isinstance(filler, (int, np.integer)) or not 0 <= filler <= 15:
        raise ValueError(f"filler must be a 4-bit code (0..15), got {filler!r}")
    with on_stream(codes):
        cd = uint8_array(codes, "codes")
        n = cd.size
        nbytes = (n + 1) // 2
        packed = cp.empty(nbytes, cp.uint8)
        if n == 0:
            return packed
        status = cp.zeros(1, cp.uint32)
        args = (cd, np.int64(n), np.int32(filler), packed, status)
        if kernel == "v2" and aligned(cd, packed):
            build.kernel("packing.cu", "pack_4bit_v2")(*launch.pack_4bit_v2_config(nbytes), args)
        else:
            build.kernel("packing.cu", "pack_4bit_v1")(*launch.pack_4bit_v1_config(nbytes), args)
        top = int(status.get()[0])
        if top > 15:
            raise ValueError(f"codes must be 4-bit (0..15); found {top}")
    return packed


def unpack_4bit(packed, n: int, *, kernel: str = "v2") -> cp.ndarray:
    """qlora_ref.unpack_4bit on the GPU: the first n codes (PK-3)."""
    with on_stream(packed):
        pd = uint8_array(packed, "packed")
        if pd.size != (n + 1) // 2:
            raise ValueError(f"{n} codes need {(n + 1) // 2} packed bytes, got {pd.size}")
        codes = cp.empty(n, cp.uint8)
        if n == 0:
            return codes
        args = (pd, np.int64(n), codes)
        if kernel == "v2" and aligned(pd, codes):
            build.kernel("packing.cu", "unpack_4bit_v2")(*launch.unpack_4bit_v2_config(pd.size), args)
        else:
            build.kernel("packing.cu", "unpack_4bit_v1")(*launch.unpack_4bit_v1_config(pd.size), args)
    return codes


# --- host <-> device -------------------------------------------------------------------------------------------------


def to_host(x):
    """numpy copies: a DeviceQuantized4bit becomes the spec's Quantized4bit; arrays / tensors as backends.bridge."""
    from backends.bridge import to_host as array_to_host

    if isinstance(x, DeviceQuantized4bit):
        return x.to_host()
    if isinstance(x, qlora_ref.Quantized4bit):
        return x
    return array_to_host(x)


def to_device(x):
    """On the current GPU: a Quantized4bit becomes a DeviceQuantized4bit; arrays / tensors a CuPy array (torch CUDA
    tensors viewed, no copy; bf16 as uint16 bits)."""
    from backends.bridge import to_device as array_to_device

    if isinstance(x, qlora_ref.Quantized4bit):
        return DeviceQuantized4bit.from_host(x)
    return array_to_device(x)
