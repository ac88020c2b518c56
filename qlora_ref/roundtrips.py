"""Round trips and the state-dict boundary as properties users can run (specs/formats.md FMT-5 .. FMT-7, RT-1 ..
RT-4), with their strategies.  Re-exported by qlora_ref.testing; the input strategies and reproducers live there.
"""

from __future__ import annotations

import importlib.util

import numpy as np
from hypothesis import strategies as st

from . import testing as inputs  # the input strategies; imported as a module (it re-exports this one)
from .blockwise import encode_4bit
from .codebooks import (
    dequant_table,
)
from .dtypes import DTYPES, from_float32, output_dtype
from .fastmath import rcp_approx
from .formats import BNB_QUANT_TYPES
from .packing import pack_4bit
from .quantized import Quantized4bit, dequantize_4bit, quantize_4bit

# --- round trips and the state-dict boundary (specs/formats.md FMT-5 .. FMT-7) ----------------------------------------
#
# Properties users can run against the spec or their own quantizer:
#
#   check_requantize(q)             RT-1 / RT-2: quantize(dequantize(q)) is `requantized(q)`, byte for byte
#   check_state_dict_round_trip(d)  RT-3: state dict -> Quantized4bit -> state dict is the identity
#   check_refused(d, prefix, name)  RT-4: every corruption in CORRUPTIONS is one clear error
#   check_dtype_like(q, like, name) FMT-6: every dtype-like spelling gives the same bytes
#
# with the strategies `bnb_state_dicts`, `corruptions` and `dtype_likes`.


def _round_to(x32: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded once to dtype and widened back to float32 exactly."""
    return inputs.carrier_to_float32(from_float32(x32, dtype), dtype)


def _per_element(a: np.ndarray, q: Quantized4bit) -> np.ndarray:
    return np.repeat(np.asarray(a, np.float32), q.blocksize)[: q.n]


def requantizes_exactly(q: Quantized4bit) -> bool:
    """RT-1's precondition on a state from `quantize_4bit`: where it holds, `requantized(q)` is exact.

    Let a = q.absmax_f32() (DQ-3's a_hat under double quantization) and a_T = round_T(a) (T = q.dtype), the absmax
    the re-quantizer finds.  It needs
      (a) a >= 0: a negative a_hat (double quantization can land a zero block's absmax just below 0) mirrors the
          block, and NF4 is not symmetric;
      (b) rcp(a_T) > 0: above 2^126 the reciprocal flushes to zero (BW-3/BW-8), the block quantizes to code 7 (the
          zero), decodes to +0.0, and re-quantizes as an all-zero block (absmax 0, codes 0, decoding to -0.0);
      (c) every nonzero product table[code] * a normal in float32 and in T (float16: >= 2^-14): a flushed product
          (BW-8) decodes to 0 and re-quantizes as the zero code; a float16-subnormal one is rounded to a coarse grid
          (with absmax 5u, u = 2^-24: code 1 decodes to -0.696 * 5u, rounded to -3u, which is code 2) and
          can cross a threshold.
    """
    a = np.asarray(q.absmax_f32(), np.float32)
    if np.any(a < 0):
        return False
    a_t = _round_to(a, q.dtype)
    if np.any(rcp_approx(a_t[a_t > 0]) == 0):
        return False
    with np.errstate(over="ignore", under="ignore"):
        products = np.abs(dequant_table(q.quant_type)[q.codes()] * _per_element(a, q))
    smallest = np.float32(2.0**-14 if q.dtype == "float16" else 2.0**-126)
    return bool(np.all((products == 0) | (products >= smallest)))


def requantized(q: Quantized4bit) -> Quantized4bit:
    """The plain state ``quantize_4bit(dequantize_4bit(q), double_quant=False, ...)`` is, for q from quantize_4bit
    with `requantizes_exactly(q)` (RT-1, RT-2).

        codes'  = q's codes, FP4's code 8 (-0) read back as code 0 (+0: BW-5 sets the sign only for y < 0), and
                  code 0 in a block that decodes to zeros only (BW-6)
        absmax' = round_T(a) for a block holding a +-1 code (every nonzero block of a quantized state: its absmax
                  element), 0 for a block of zeros

    So a plain NF4 / Int4 state is a fixed point, requantized(q) == q, and so is plain FP4 once its -0 codes are +0.
    Decoded, only the sign of a zero can differ from dequantize(q): FP4's -0.0 comes back +0.0, and a block that
    decoded to +0.0 only (code 7 throughout: the reciprocal of its first absmax flushed, BW-3, though a_hat may be
    smaller) comes back as an all-zero block, -0.0 (BW-6).
    A double-quantized state is not: re-quantizing with double quantization takes DQ-1's offset as the mean of a_hat,
    and a_hat = a + e carries the 8-bit errors e, whose mean is not 0; only the codes and a_T carry over (RT-2).
    """
    codes = q.codes()
    if q.quant_type == "fp4":
        codes = np.where(codes == 8, np.uint8(0), codes)
    nblocks, bs = q.nblocks, q.blocksize
    magnitude = np.zeros(nblocks * bs, np.float32)
    magnitude[: q.n] = np.abs(dequant_table(q.quant_type)[codes])
    top = magnitude.reshape(nblocks, bs).max(axis=1)  # 1 (a +-1 code) or 0 (zeros only)
    absmax = np.where(top == 1, _round_to(np.asarray(q.absmax_f32(), np.float32), q.dtype), np.float32(0))
    absmax = absmax.astype(np.float32)
    codes = np.where(_per_element(absmax, q) == 0, np.uint8(0), codes).astype(np.uint8)
    filler = 0 if absmax[-1] == 0 else int(encode_4bit(np.zeros(1, np.float32), q.quant_type)[0])  # PK-2
    return Quantized4bit(
        packed=pack_4bit(codes, filler),
        shape=q.shape,
        dtype=q.dtype,
        quant_type=q.quant_type,
        blocksize=q.blocksize,
        absmax=absmax,
    )


def same_state(q1: Quantized4bit, q2: Quantized4bit) -> bool:
    """Every array bit for bit, the offset's bits and the metadata equal."""

    def same(a, b):
        if a is None or b is None:
            return a is None and b is None
        a, b = np.asarray(a), np.asarray(b)
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()

    meta = ("shape", "dtype", "quant_type", "blocksize", "nested_blocksize")
    arrays = ("packed", "absmax", "absmax_q", "nested_absmax", "offset")
    return all(getattr(q1, m) == getattr(q2, m) for m in meta) and all(
        same(getattr(q1, f), getattr(q2, f)) for f in arrays
    )


def _describe(q: Quantized4bit) -> str:
    return f"{q.quant_type} {q.dtype} shape {q.shape} blocksize {q.blocksize} double_quant={q.double_quant}"


def check_requantize(q: Quantized4bit, *, quantize=quantize_4bit, dequantize=dequantize_4bit) -> Quantized4bit:
    """RT-1 / RT-2 for q from quantize_4bit (assume `requantizes_exactly(q)` first); returns the re-quantized state.

    RT-1  quantize(dequantize(q), double_quant=False) == requantized(q), every byte (so a plain NF4 / Int4 state is a
          fixed point: dequantize o quantize is idempotent on its values, byte for byte).
    RT-2  decoded again it gives dequantize(q)'s values where a_T = a (plain states, and float32 double-quantized
          ones), byte for byte except the sign of a zero (see `requantized`); double-quantized again it keeps the
          packed codes.
    ``quantize`` / ``dequantize``: any pair with the spec's signatures (a backend's, for instance).
    """
    x_hat = dequantize(q)
    kwargs = dict(quant_type=q.quant_type, blocksize=q.blocksize, dtype=q.dtype)
    with inputs.failure_note(x_hat, double_quant=False, **kwargs):
        got = quantize(x_hat, double_quant=False, **kwargs)
        want = requantized(q)
        assert same_state(got, want), f"RT-1: quantize(dequantize(q)) is not requantized(q) for {_describe(q)}"
        if not q.double_quant:
            fixed = got if q.quant_type == "fp4" else q  # FP4: a fixed point once its -0 codes are +0
            assert same_state(quantize(dequantize(fixed), double_quant=False, **kwargs), fixed), (
                f"RT-1: plain {_describe(q)} is not a fixed point"
            )
        if not q.double_quant or q.dtype == "float32":
            again = np.asarray(dequantize(got))
            before = np.asarray(x_hat)
            values_again, values = inputs.carrier_to_float32(again, q.dtype), inputs.carrier_to_float32(before, q.dtype)
            nonzero = (values != 0).reshape(-1)  # a zero's sign may change (see requantized): bytes where nonzero
            assert np.array_equal(values_again, values), f"RT-2: values moved on re-quantizing {_describe(q)}"
            assert again.reshape(-1)[nonzero].tobytes() == before.reshape(-1)[nonzero].tobytes()
        if q.double_quant:
            assert np.array_equal(quantize(x_hat, double_quant=True, **kwargs).packed, want.packed)
    return got


def check_state_dict_round_trip(d: dict, prefix: str = "weight") -> Quantized4bit:
    """RT-3: to_bnb_state_dict(from_bnb_state_dict(d)) == d (same keys, dtypes, shapes and bytes) for a state dict as
    bitsandbytes writes it (uint8 packed codes); returns the Quantized4bit read."""
    q = Quantized4bit.from_bnb_state_dict(d, prefix)
    back = q.to_bnb_state_dict(prefix)
    assert sorted(back) == sorted(d), f"RT-3: keys {sorted(back)} != {sorted(d)}"
    for key, value in d.items():
        value = np.asarray(value)
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, f"RT-3: {key} dtype/shape"
        assert back[key].tobytes() == value.tobytes(), f"RT-3: {key} bytes differ"
    assert same_state(Quantized4bit.from_bnb_state_dict(back, prefix), q)
    return q


@st.composite
def bnb_state_dicts(draw, *, double_quant=None, quant_type=None, dtype=None, max_blocks: int = 5):
    """(state dict, prefix): bitsandbytes 4-bit entries (FMT-1 .. FMT-3) of a quantized or random valid state."""
    qt = quant_type if quant_type is not None else st.sampled_from(BNB_QUANT_TYPES)
    q = draw(inputs.quantized_states(quant_type=qt, double_quant=double_quant, dtype=dtype, max_blocks=max_blocks))
    prefix = draw(st.sampled_from(["weight", "model.layers.0.mlp.down_proj.weight"]))
    return q.to_bnb_state_dict(prefix), prefix


def dtype_likes(name: str | None = None) -> st.SearchStrategy[tuple[object, str]]:
    """(dtype-like, its name): every spelling `qlora_ref.dtypes.resolve_dtype` accepts for "float32" / "float16" /
    "bfloat16" (name None: all three).  torch and ml_dtypes spellings appear where those packages are installed."""
    names = DTYPES if name is None else (name,)
    spellings = {
        "float32": ["float32", "fp32", "f4", "<f4", "torch.float32", "FLOAT32", np.float32, np.dtype(np.float32)],
        "float16": ["float16", "fp16", "half", "f2", "torch.float16", np.float16, np.dtype("float16")],
        "bfloat16": ["bfloat16", "bf16", "torch.bfloat16", " BFloat16 "],
    }
    if importlib.util.find_spec("ml_dtypes") is not None:
        import ml_dtypes

        spellings["bfloat16"] += [ml_dtypes.bfloat16, np.dtype(ml_dtypes.bfloat16)]
    if importlib.util.find_spec("torch") is not None:
        import torch

        spellings["float32"].append(torch.float32)
        spellings["float16"] += [torch.float16, torch.half]
        spellings["bfloat16"].append(torch.bfloat16)
    return st.sampled_from([(like, n) for n in names for like in spellings[n]])


def check_dtype_like(q: Quantized4bit, like, name: str) -> np.ndarray:
    """FMT-6: dequantize_4bit(q, like) has the bytes of dequantize_4bit(q, name) in `output_dtype(like)` (bfloat16 as
    uint16 bits, or as ml_dtypes.bfloat16 when that is what was asked); in q's own dtype, quantizing them back with
    dtype=like equals dtype=name."""
    with np.errstate(over="ignore"):  # a float32 state decoded to float16 may overflow to inf, in both spellings
        out = dequantize_4bit(q, like)
        want = dequantize_4bit(q, name)
    assert out.dtype == output_dtype(like) and out.shape == want.shape, f"{like!r}: got {out.dtype}"
    assert out.tobytes() == want.tobytes(), f"{like!r}: bytes differ from dtype={name!r}"
    if name == q.dtype:  # q's own dtype decodes finite: re-quantize it with either spelling
        kwargs = dict(quant_type=q.quant_type, blocksize=q.blocksize, double_quant=q.double_quant)
        with np.errstate(over="ignore", invalid="ignore"):
            by_name = quantize_4bit(want, dtype=name, **kwargs)
            assert same_state(quantize_4bit(want, dtype=like, **kwargs), by_name), f"quantize_4bit(dtype={like!r})"
    return out
