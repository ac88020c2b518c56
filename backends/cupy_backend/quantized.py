"""The quantized state on the GPU: `DeviceQuantized4bit` and the codebooks as device constants.

The codebooks come from qlora_ref.codebooks (one source of truth), uploaded once per device and cached:
``codebook(quant_type)`` holds the quantizer's thresholds (ascending, padded with +inf), FP4's interval-to-code
permutation and the decode table; ``signed_dynamic_map()`` is double quantization's 8-bit map (DQ-2).
"""

from __future__ import annotations

from dataclasses import dataclass

import cupy as cp
import numpy as np

import qlora_ref
from qlora_ref.codebooks import (
    FP4_CODES_ASCENDING,
    FP4_THRESHOLDS,
    dequant_table,
    dynamic_map,
    int4_thresholds,
    nf4_thresholds,
)
from qlora_ref.double_quant import NESTED_BLOCKSIZE

# --- codebooks as device constants, from qlora_ref (one source of truth) ------------------------------------------


@dataclass(frozen=True)
class Codebook:
    thresholds: cp.ndarray  # float32[16], ascending, padded with +inf
    perm: cp.ndarray  # uint8[16]: code of the k-th magnitude interval (FP4); identity otherwise
    table: cp.ndarray  # float32[16]: the decode table (dequant_table)


_CODEBOOKS: dict[tuple[str, int], Codebook] = {}
_DYNAMIC: dict[tuple[bool, int], cp.ndarray] = {}


def codebook(quant_type: str) -> Codebook:
    """The quantizer's and decoder's constants of ``quant_type`` on the current device (uploaded once, cached)."""
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
        _CODEBOOKS[key] = Codebook(cp.asarray(t), cp.asarray(perm), cp.asarray(dequant_table(quant_type)))
    return _CODEBOOKS[key]


def signed_dynamic_map() -> cp.ndarray:
    """float32[256]: double quantization's signed 8-bit dynamic map (DQ-2) on the current device (cached)."""
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
        from .ops import dequantize_blockwise_8bit

        return dequantize_blockwise_8bit(
            self.absmax_q, self.nested_absmax, signed_dynamic_map(), NESTED_BLOCKSIZE
        ) + cp.float32(self.offset)

    def codes(self) -> cp.ndarray:
        """The 4-bit codes, uint8[n] on the device (PK-3)."""
        from .ops import unpack_4bit

        return unpack_4bit(self.packed, self.n)

    def to_bnb_state_dict(self, prefix: str = "weight") -> dict[str, np.ndarray]:
        return self.to_host().to_bnb_state_dict(prefix)


# --- operations -----------------------------------------------------------------------------------------------------


def state_args(qd: DeviceQuantized4bit) -> tuple:
    """The 4-bit state as the dequantize and matvec kernels take it (kernels/common.cuh's absmax decode):
    (table, absmax, absmax_q, code2, nested_absmax, offset), with a pointer the kernel does not read in the slots of
    the other absmax mode (plain float32 absmax, or double quantization's codes + code2 + nested absmax + offset)."""
    cb = codebook(qd.quant_type)
    dq = qd.double_quant
    dummy_f32, dummy_u8 = cb.table, cb.perm
    return (
        cb.table,
        dummy_f32 if dq else qd.absmax,
        qd.absmax_q if dq else dummy_u8,
        signed_dynamic_map() if dq else dummy_f32,
        qd.nested_absmax if dq else dummy_f32,
        np.float32(qd.offset if dq else 0.0),
    )
