"""The numpy backend's fast dequantization: qlora_ref's formula, table-driven (BW-7, BW-8, DQ-3).

    x_hat[i] = ftz(table[code_i] * absmax[i // blocksize])     float32, one product, flushed if subnormal
    T(x_hat) = one rounding of that float32 to the output dtype (bf16 / fp16)

The codes are read two packed bytes at a time: a 65,536-entry table maps the pair, read as one little-endian uint16,
to its four table values (16 bytes: one gather writes four float32 lanes); then one float32 multiply per element by
the block's absmax.  The table values are copied exactly, so every result is bit-identical to
``qlora_ref.dequantize_4bit`` (tests/backends/test_numpy_lut.py, tests/torchlib/test_layer.py).
"""

from __future__ import annotations

import sys
import threading

import numpy as np

from qlora_ref.codebooks import dequant_table
from qlora_ref.dtypes import f32_to_bf16
from qlora_ref.fastmath import ftz

_LUT_CACHE: dict[bytes, np.ndarray] = {}


def _pair_lut(code: np.ndarray) -> np.ndarray:
    """LUT[p] = the 4 table values of the two packed bytes read as one little-endian uint16 p, as complex128[65536].

    p = byte0 | byte1 << 8, elements in order: code[byte0 >> 4], code[byte0 & 15], code[byte1 >> 4], code[byte1 & 15]
    (PK-1: first element in the high nibble).  16 bytes a row = four float32 lanes, so one gather writes 4 values.
    """
    key = code.astype(np.float32).tobytes()
    lut = _LUT_CACHE.get(key)
    if lut is None:
        p = np.arange(65536, dtype=np.uint32)
        byte0, byte1 = p & 0xFF, p >> 8
        vals = np.stack([code[byte0 >> 4], code[byte0 & 15], code[byte1 >> 4], code[byte1 & 15]], axis=1)  # (65536, 4)
        lut = np.ascontiguousarray(vals, np.float32).view(np.complex128).ravel()  # (65536,) x 16 bytes
        _LUT_CACHE[key] = lut
    return lut


def dequantize_4bit_cpu(q, out32: np.ndarray) -> np.ndarray:
    """Write ftz(table[code_i] * absmax[i // blocksize]) (float32, BW-7, BW-8) into out32[:n]; returns out32[:n].

    q: a Quantized4bit with numpy arrays.  out32: float32, 1-D, contiguous, at least q.n long (elements past n are
    left as they are).  Same arithmetic as ``qlora_ref.dequantize_4bit(q, "float32")``: the table values are copied
    exactly, then one float32 product.
    """
    n, bs = q.n, q.blocksize
    if out32.dtype != np.float32 or out32.ndim != 1 or out32.size < n or not out32.flags.c_contiguous:
        raise ValueError(f"out32 must be contiguous 1-D float32 with >= {n} elements, got {out32.dtype} {out32.shape}")
    out = out32[:n]  # (n,)
    packed = np.asarray(q.packed)  # (ceil(n / 2),) uint8
    code = dequant_table(q.quant_type)  # (16,) float32; FP4's code 8 decodes to -0.0 (CB-6)
    npairs = n // 4 if sys.byteorder == "little" else 0  # byte pairs whose four values all lie inside n
    if npairs:
        pairs = packed[: 2 * npairs].view(np.uint16)  # (npairs,)
        np.take(_pair_lut(code), pairs, out=out[: 4 * npairs].view(np.complex128), mode="clip")
    if n > 4 * npairs:  # the last n % 4 values (or all of them on a big-endian host): byte by byte
        tail = packed[2 * npairs :]
        values = np.empty(2 * tail.size, np.float32)
        values[0::2], values[1::2] = code[tail >> 4], code[tail & 15]
        out[4 * npairs :] = values[: n - 4 * npairs]
    absmax = np.asarray(q.absmax_f32(), np.float32)  # (nblocks,), DQ-3 decoded if double-quantized
    full = n // bs
    if full:
        blocks = out[: full * bs].reshape(full, bs)  # (full, blocksize)
        np.multiply(blocks, absmax[:full, None], out=blocks)
    if n > full * bs:  # the partial last block
        np.multiply(out[full * bs :], absmax[full], out=out[full * bs :])
    # BW-8: a subnormal product flushes to a zero of its sign.  Only possible where |absmax| * min|code != 0| falls
    # below the smallest normal float32, so the (rare) flush pass runs only then.
    smallest = float(np.abs(code[code != 0]).min())
    nonzero = np.abs(absmax[absmax != 0]).astype(np.float64)
    if nonzero.size and float(nonzero.min()) * smallest < float(np.finfo(np.float32).tiny):
        out[...] = ftz(out)
    return out


# --- into a caller's buffer: float32 directly, 16-bit outputs through one float32 scratch ----------------------------

_LOCAL = threading.local()  # one float32 scratch per thread, grown on demand


def _scratch(n: int) -> np.ndarray:
    buf = getattr(_LOCAL, "buf", None)
    if buf is None or buf.size < n:
        _LOCAL.buf = None  # let the old one go first
        buf = _LOCAL.buf = np.empty(n, np.float32)
    return buf[:n]


def release_scratch() -> None:
    """Drop this thread's float32 scratch (re-created at the next 16-bit dequantization)."""
    _LOCAL.buf = None


def dequantize_4bit_into(q, view: np.ndarray, dtype: str, tensor=None) -> None:
    """Write T(x_hat) (one rounding of the float32 product, BW-7) into ``view``, a flat contiguous numpy array of q.n
    elements of ``dtype`` (bf16 as uint16 bits).  ``tensor``: the torch CPU tensor ``view`` looks at, if any; its
    16-bit rounding is then torch's copy (round to nearest even, the same bits as qlora_ref.dtypes.from_float32)."""
    if dtype == "float32":
        dequantize_4bit_cpu(q, view)
        return
    w32 = dequantize_4bit_cpu(q, _scratch(q.n))  # (n,) float32
    if tensor is not None:
        import torch

        tensor.view(-1).copy_(torch.from_numpy(w32))
    elif dtype == "float16":
        with np.errstate(over="ignore"):  # beyond float16's range: inf, as in the spec
            view[...] = w32  # numpy's float32 -> float16 cast: round to nearest even
    else:
        view[...] = f32_to_bf16(w32)
