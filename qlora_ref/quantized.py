"""The quantized weight: `Quantized4bit`, `quantize_4bit` and `dequantize_4bit` (specs/blockwise.md, double_quant.md).

q = quantize_4bit(w)              # NF4, blocksize 64, double quantization (QLoRA's storage format)
w_hat = dequantize_4bit(q)        # back in w's dtype, one rounding per element
d = q.to_bnb_state_dict()         # bitsandbytes / Hugging Face keys, byte for byte (specs/formats.md)

Every dtype argument takes any dtype-like (FMT-6: "bfloat16", np.float16, np.dtype("f4"), torch.bfloat16,
ml_dtypes.bfloat16); bfloat16 results travel as uint16 bits, or as ml_dtypes arrays when ml_dtypes.bfloat16 is
asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import formats
from .blockwise import decode_4bit, quantize_codes_4bit
from .checks import check_blocksize, check_constants, check_finite, check_nonempty
from .codebooks import QUANT_TYPES, codebook
from .double_quant import NESTED_BLOCKSIZE, double_dequantize, double_quantize
from .dtypes import from_float32, resolve_dtype, to_float32
from .packing import pack_4bit, unpack_4bit


@dataclass(frozen=True, eq=False)
class Quantized4bit:
    """A 4-bit blockwise-quantized tensor, with or without double-quantized absmax.

    packed         uint8[(n + 1) // 2]      two codes a byte, first element in the high nibble (PK-1)
    absmax         float32[nblocks]         per-block scale, or None when double-quantized
    absmax_q       uint8[nblocks]           8-bit codes of absmax - offset (double quant only)
    nested_absmax  float32[ceil(nblocks / 256)]
    offset         float32 scalar           mean of the first-level absmax
    shape, dtype   the original tensor's shape and dtype ("float32" | "float16" | "bfloat16"; any dtype-like is
                   stored as its name, FMT-6)

    The constants must be finite and non-negative (absmax, nested_absmax, offset): a NaN would decode every weight of
    its block to NaN, a negative scale flips their signs.
    """

    packed: np.ndarray
    shape: tuple
    dtype: str
    quant_type: str = "nf4"
    blocksize: int = 64
    absmax: np.ndarray | None = None
    absmax_q: np.ndarray | None = None
    nested_absmax: np.ndarray | None = None
    offset: np.float32 | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype))
        check_blocksize(self.blocksize)
        if self.n == 0:
            raise ValueError(f"shape {self.shape} holds no elements")
        if self.nested_blocksize != NESTED_BLOCKSIZE:
            raise ValueError(f"nested_blocksize must be {NESTED_BLOCKSIZE}, got {self.nested_blocksize}")
        _expect(self.packed, np.uint8, ((self.n + 1) // 2,), "packed", self)
        if self.double_quant:
            if self.absmax is not None:
                raise ValueError("give either absmax (plain) or absmax_q/nested_absmax/offset (double quant), not both")
            _expect(self.absmax_q, np.uint8, (self.nblocks,), "absmax_q", self)
            _expect(self.nested_absmax, np.float32, (-(-self.nblocks // NESTED_BLOCKSIZE),), "nested_absmax", self)
            if self.offset is None:
                raise ValueError("double-quantized state needs an offset (the mean of the first-level absmax)")
            object.__setattr__(self, "offset", np.float32(self.offset))
            check_constants(self.nested_absmax, "nested_absmax")
            check_constants(self.offset, "offset")
        else:
            if self.nested_absmax is not None or self.offset is not None:
                raise ValueError("nested_absmax/offset given without absmax_q: incomplete double-quant state")
            _expect(self.absmax, np.float32, (self.nblocks,), "absmax", self)
            check_constants(self.absmax, "absmax")

    @property
    def n(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nblocks(self) -> int:
        return -(-self.n // self.blocksize)

    @property
    def double_quant(self) -> bool:
        return self.absmax_q is not None

    @property
    def code(self) -> np.ndarray:
        """The 16-entry table (bitsandbytes' ``quant_map``)."""
        return codebook(self.quant_type)

    def absmax_f32(self) -> np.ndarray:
        """The float32 absmax the decoder multiplies by: stored, or decoded from double quantization (DQ-3)."""
        if self.double_quant:
            return double_dequantize(self.absmax_q, self.nested_absmax, self.offset)
        return self.absmax

    def codes(self) -> np.ndarray:
        """The n 4-bit codes, one per element, uint8."""
        return unpack_4bit(self.packed, self.n)

    def nbytes(self) -> int:
        """Bytes of storage: packed codes plus quantization constants."""
        parts = [self.packed, self.absmax, self.absmax_q, self.nested_absmax]
        return sum(p.nbytes for p in parts if p is not None) + (4 if self.double_quant else 0)

    def to_bnb_state_dict(self, prefix: str = "weight") -> dict[str, np.ndarray]:
        """bitsandbytes ``Linear4bit`` state-dict entries under ``prefix`` (FMT-1 .. FMT-4)."""
        return formats.to_bnb_state_dict(self, prefix)

    @classmethod
    def from_bnb_state_dict(cls, d: dict, prefix: str = "weight") -> Quantized4bit:
        """Read bitsandbytes / Hugging Face 4-bit state-dict entries (FMT-5)."""
        return formats.from_bnb_state_dict(cls, d, prefix)


def _expect(arr, dtype, shape, name, q) -> None:
    if arr is None:
        raise ValueError(f"{name} is missing for a {q.quant_type} state of shape {q.shape}")
    if not isinstance(arr, np.ndarray) or arr.dtype != dtype or arr.shape != shape:
        got = f"{type(arr).__name__} {getattr(arr, 'dtype', '?')} {getattr(arr, 'shape', '?')}"
        raise ValueError(
            f"{name} does not match its data: a tensor of shape {q.shape} at blocksize {q.blocksize} needs "
            f"{np.dtype(dtype).name} {shape}, got {got}"
        )


def quantize_4bit(
    x: np.ndarray,
    *,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    dtype=None,
    sm_count: int | None = None,
) -> Quantized4bit:
    """Blockwise 4-bit quantization of x (any shape), bitsandbytes 0.50.2 CUDA semantics, byte for byte.

    sm_count: the double-quant offset in torch's CUDA order for a GPU with that many multiprocessors (DQ-5), which is
    what bitsandbytes computes there past 130,560 blocks; None (the default): the one-CTA order (DQ-1).

    x: float32 / float16 (NumPy or torch CPU), bfloat16 as a torch bf16 tensor or an ml_dtypes array, or bf16 as
    uint16 bits with ``dtype="bfloat16"`` (BW-1; a uint16 array without dtype= is refused, never read as bits
    silently).  dtype: None (x's own) or any dtype-like naming it (FMT-6).  Rules: absmax and reciprocal
    (BW-2, BW-3), strict-greater thresholds (BW-4, BW-5), all-zero blocks (BW-6), non-finite input rejected (BW-9),
    packing (PK-1, PK-2), double quantization (DQ-1, DQ-2).
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    blocksize = check_blocksize(blocksize)
    x32, dtype = to_float32(x, dtype, strict=True)
    check_nonempty(x32)
    check_finite(x32)
    n = x32.size
    codes, absmax = quantize_codes_4bit(x32.ravel(), quant_type, blocksize)  # codes over whole blocks
    packed = pack_4bit(codes[: n + (n % 2)])  # an odd tail takes the padding's code of 0.0 (PK-2)
    common = dict(packed=packed, shape=x32.shape, dtype=dtype, quant_type=quant_type, blocksize=blocksize)
    if not double_quant:
        return Quantized4bit(absmax=absmax, **common)
    absmax_q, nested_absmax, offset = double_quantize(absmax, sm_count=sm_count)
    return Quantized4bit(absmax_q=absmax_q, nested_absmax=nested_absmax, offset=offset, **common)


def dequantize_4bit(q: Quantized4bit, dtype=None) -> np.ndarray:
    """x_hat = T(table[code] * absmax[i // blocksize]), one rounding to T = dtype or q.dtype (BW-7).

    dtype: None (q.dtype) or any dtype-like (FMT-6): "float16", np.float32, np.dtype("f4"), torch.bfloat16, ...
    Returns an array of q.shape in T: float32 / float16, and bfloat16 as uint16 bits (NumPy has no bf16; see
    `qlora_ref.bf16_to_f32`), or as an ml_dtypes.bfloat16 array when ml_dtypes.bfloat16 itself is asked for.
    """
    if not isinstance(q, Quantized4bit):
        raise TypeError(f"dequantize_4bit expects a Quantized4bit, got {type(q).__name__}")
    x32 = decode_4bit(q.codes(), q.absmax_f32(), q.quant_type, q.blocksize)
    return from_float32(x32, q.dtype if dtype is None else dtype).reshape(q.shape)  # np.dtype is falsy: no `or`
