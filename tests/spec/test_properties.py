"""Hypothesis properties of the 4-bit spec (STYLE habits 10-12): each docstring names the rules it checks.

Inputs come from `qlora_ref.testing` (bounded, adversarial); every failure carries a copy-pasteable reproducer
(`failure_note`).  Excluded cases use `assume()` with the reason beside it, never an early return.

Error terms used below (float32 unit roundoff u = 2^-24, tiny = 2^-126, a = a block's absmax):
  rcp(a)         within 1 ulp of the correctly rounded 1/a (BW-3): |r - 1/a| <= 3u / a
  y = fl(x r)    |y - x/a| <= 3u|x|/a + u|y| <= 4.01u        (|x| <= a)
  code           |y - c[code]| <= G/2 + delta_t, G the largest gap of the table, delta_t the largest distance of a
                 float32 threshold from the exact midpoint it stands for (measured NF4 ties, FP4's literals)
  decode         |fl(c a) - c a| <= u a, and a flushed product loses < tiny (BW-7, BW-8)
  output dtype   |T(v) - v| <= u_T |v| + s_T: u_T = 0, 2^-11, 2^-8 and s_T = 0, 2^-25 (float16 subnormal spacing / 2),
                 0 for float32, float16, bfloat16
so |x - x_hat| <= a (G/2 + delta_t + 2^-21) + tiny [x flushed] + tiny [product flushed] + u_T a + s_T, with 2^-21 = 8u
covering 4.01u + u.  With double quantization x_hat = T(fl(c a_hat)) adds |c| |a - a_hat| <= |a - a_hat|.
"""

from __future__ import annotations

import dataclasses
import re
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, event, given, note
from hypothesis import strategies as st

import qlora_ref
from qlora_ref.blockwise import scale_blocks
from qlora_ref.codebooks import (
    FP4_THRESHOLDS,
    NF4_UPPER_AT_TIE,
    codebook,
    dynamic_map,
    int4_thresholds,
    midpoint_thresholds,
    nf4_thresholds,
)
from qlora_ref.double_quant import torch_block_sum
from qlora_ref.dtypes import from_float32
from qlora_ref.testing import (
    carrier_to_float32,
    failure_note,
    quant_types,
    quantized_states,
    reproducer,
    weights,
)

U = 2.0**-24  # float32 unit roundoff
TINY = float(np.finfo(np.float32).tiny)  # 2^-126
RCP_LIMIT = 2.0**126  # above it 1/absmax is subnormal and rcp.approx.ftz gives 0 (BW-3, BW-8)
OUT_UNIT = {"float32": 0.0, "float16": 2.0**-11, "bfloat16": 2.0**-8}
OUT_SUBNORMAL = {"float32": 0.0, "float16": 2.0**-25, "bfloat16": 0.0}
ZERO_CODE = {"nf4": 7, "int4": 7, "fp4": 0}  # the code of +0.0 inside a block that is not all zero


def _exact_midpoints(table: np.ndarray) -> list[Fraction]:
    return [(Fraction(float(a)) + Fraction(float(b))) / 2 for a, b in zip(table[:-1], table[1:], strict=True)]


def _threshold_shift(quant_type: str) -> float:
    """delta_t: the largest |t_k - exact midpoint| of the type's float32 thresholds (CB-5)."""
    if quant_type == "fp4":
        magnitudes = np.sort(np.abs(codebook("fp4")[:8]))
        pairs = zip(FP4_THRESHOLDS, _exact_midpoints(magnitudes), strict=True)
    elif quant_type == "nf4":
        pairs = zip(nf4_thresholds(), _exact_midpoints(codebook("nf4")), strict=True)
    else:
        pairs = zip(int4_thresholds(), _exact_midpoints(codebook("int4")[:15]), strict=True)
    return float(max(abs(Fraction(float(t)) - m) for t, m in pairs))


def _largest_gap(quant_type: str) -> float:
    values = np.unique(np.abs(codebook(quant_type)) if quant_type == "fp4" else codebook(quant_type))
    return float(np.diff(values.astype(np.float64)).max())


def _flat32(x: np.ndarray, dtype: str) -> np.ndarray:
    return carrier_to_float32(x, dtype).ravel()


def _block_absmax(x32: np.ndarray, blocksize: int) -> np.ndarray:
    """max |x| per block in float64, subnormals flushed (BW-2, BW-8): an independent recomputation."""
    x = np.where(np.abs(x32) < TINY, 0.0, np.abs(x32.astype(np.float64)))
    nblocks = -(-x.size // blocksize)
    padded = np.zeros(nblocks * blocksize)
    padded[: x.size] = x
    return padded.reshape(nblocks, blocksize).max(axis=1)


def _per_element(values: np.ndarray, n: int, blocksize: int) -> np.ndarray:
    return np.repeat(values, blocksize)[:n]


def _decoded_f64(x_hat: np.ndarray, dtype: str) -> np.ndarray:
    return carrier_to_float32(x_hat, dtype).ravel().astype(np.float64)


def _double_quant_in_range(q: qlora_ref.Quantized4bit) -> bool:
    """False where double quantization leaves the range of finite input (reported to the lead, not spec rules):
    the offset overflows to inf once the float32 sum of the absmax does (DQ-1: e.g. three blocks of 2e38), and a_hat
    can exceed float16's 65504 (DQ-3: float16 blocks at 65504 decode to inf).  Plain states are always in range.
    """
    if not q.double_quant:
        return True
    with np.errstate(over="ignore", invalid="ignore"):
        a_hat = q.absmax_f32()
        top = carrier_to_float32(from_float32(np.abs(a_hat).max(keepdims=True), q.dtype), q.dtype)
    return bool(np.isfinite(q.offset) and np.all(np.isfinite(a_hat)) and np.all(np.isfinite(top)))


# --- round trip -------------------------------------------------------------------------------------------------------


@given(weights(), quant_types(), st.booleans())
def test_round_trip_error_bound(w, quant_type, double_quant):
    """|x - x_hat| <= a (G/2 + delta_t + 2^-21) + |a - a_hat| + (u + u_T) max(a, |a_hat|) + 2 tiny + s_T.

    Derivation in the module docstring.  Rules: BW-2 (absmax), BW-3 (reciprocal), BW-4/BW-5 (thresholds), BW-7 (one
    product, one rounding to the output dtype), BW-8 (flush to zero), DQ-3 (decoded absmax).  Also BW-7's single
    rounding: dequantizing to float16/bfloat16 equals rounding the float32 dequantization once.
    Excluded: a block absmax above 2^126, where the reciprocal flushes to zero (see test_huge_absmax_collapses), and
    double-quantized states out of range (`_double_quant_in_range`).
    """
    x, dtype, blocksize = w
    x32 = _flat32(x, dtype)
    a = _block_absmax(x32, blocksize)
    assume(a.max() <= RCP_LIMIT)
    with failure_note(x, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant, dtype=dtype):
        q = qlora_ref.quantize_4bit(
            x, dtype=dtype, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant
        )
        assume(_double_quant_in_range(q))
        a_hat = q.absmax_f32().astype(np.float64)
        if not double_quant:
            assert np.array_equal(a_hat, a), "stored absmax is max |x| of each block (BW-2)"
        x_hat = qlora_ref.dequantize_4bit(q)
        assert x_hat.shape == x.shape and x_hat.dtype == x.dtype
        err = np.abs(x32.astype(np.float64) - _decoded_f64(x_hat, dtype))
        n = x32.size
        rel = _largest_gap(quant_type) / 2 + _threshold_shift(quant_type) + 2.0**-21
        bound = (
            _per_element(
                a * rel + np.abs(a - a_hat) + (U + OUT_UNIT[dtype]) * np.maximum(a, np.abs(a_hat)), n, blocksize
            )
            + 2 * TINY
            + OUT_SUBNORMAL[dtype]
        )
        event(f"{dtype}, double_quant={double_quant}")
        bad = np.flatnonzero(~(err <= bound))
        assert bad.size == 0, (
            f"{bad.size} elements exceed the bound; first at {bad[0]}: x={x32[bad[0]]!r}, "
            f"x_hat={_decoded_f64(x_hat, dtype)[bad[0]]!r}, err={err[bad[0]]!r} > bound={bound[bad[0]]!r}"
        )
        as_f32 = qlora_ref.dequantize_4bit(q, dtype="float32")
        assert np.array_equal(from_float32(as_f32, dtype).view(np.uint8), np.asarray(x_hat).view(np.uint8)), (
            "dequantizing to the dtype must round the float32 product once (BW-7)"
        )


@given(weights(dtype=st.sampled_from(["float32", "bfloat16"]), kinds=("huge", "normal")), quant_types())
def test_huge_absmax_collapses(w, quant_type):
    """A block whose absmax exceeds 2^126 has rcp(absmax) = 0 (subnormal, flushed: BW-3, BW-8): every y is +-0, so
    every element takes the code of zero (NF4/Int4 7, FP4 0 since -0.0 is not < 0: BW-5) and decodes to +0.0.
    bitsandbytes' fast-math CUDA build does the same; the error there is the whole absmax.
    """
    x, dtype, blocksize = w
    x32 = _flat32(x, dtype)
    a = _block_absmax(x32, blocksize)
    assume(a.max() > RCP_LIMIT)
    with failure_note(x, quant_type=quant_type, blocksize=blocksize, double_quant=False, dtype=dtype):
        q = qlora_ref.quantize_4bit(x, dtype=dtype, quant_type=quant_type, blocksize=blocksize, double_quant=False)
        huge = _per_element(a > RCP_LIMIT, x32.size, blocksize)
        assert np.all(q.codes()[huge] == ZERO_CODE[quant_type])
        x_hat = _decoded_f64(qlora_ref.dequantize_4bit(q, dtype="float32"), "float32")
        assert np.all(x_hat[huge] == 0.0)


# --- re-quantizing a dequantized tensor -------------------------------------------------------------------------------


def _nonzero_products_normal(q: qlora_ref.Quantized4bit, dtype: str) -> bool:
    """True when every decoded value of a nonzero code is a normal number of ``dtype`` (no flush, no subnormal)."""
    table = codebook(q.quant_type)
    v = np.abs(table[q.codes()].astype(np.float64) * _per_element(q.absmax_f32(), q.n, q.blocksize))
    smallest = {"float32": TINY, "bfloat16": TINY, "float16": 2.0**-14}[dtype]
    return bool(np.all((v == 0) | (v >= 2 * smallest)))


def _expected_requantized_codes(codes: np.ndarray, quant_type: str) -> np.ndarray:
    """FP4 code 8 decodes to -0.0, and -0.0 is not < 0, so it re-quantizes to code 0 (BW-5, CB-6)."""
    if quant_type == "fp4":
        return np.where(codes == 8, np.uint8(0), codes)
    return codes


@given(weights(), quant_types(), st.sampled_from(["float32", "own"]))
def test_requantize_is_identity(w, quant_type, out):
    """quantize(dequantize(q)) has q's codes and absmax, bit for bit (BW-2 .. BW-7), without double quantization.

    Why exact: each non-zero block holds an element with |c| = 1 (its absmax element, y = a rcp(a) within 3u of
    +-1), which decodes to exactly +-a, so the re-quantized absmax is a again and the reciprocal is the same; every
    other element comes back as y2 = c (1 + theta), |theta| <= 5u (float32) or u_T + 5u, and every code sits at least
    1/16 of its own magnitude away from the thresholds (test_codes_far_from_thresholds), so the fast-math
    reciprocal's ulp cannot move it.  All-zero blocks decode to -0.0 and stay all zero.
    Holds for float32 output and, when every decoded nonzero value is normal in it, for float16/bfloat16 output.
    Excluded (assume): absmax > 2^126 (reciprocal flushes), nonzero codes whose product is flushed / subnormal
    (their value is lost).  Exception: FP4 code 8 (-0.0) comes back as code 0 (+0.0), the same value.
    Double quantization is not idempotent (a new offset and nested absmax): see test_requantize_double_quant.
    """
    x, dtype, blocksize = w
    x32 = _flat32(x, dtype)
    assume(_block_absmax(x32, blocksize).max() <= RCP_LIMIT)
    out_dtype = dtype if out == "own" else "float32"
    q = qlora_ref.quantize_4bit(x, dtype=dtype, quant_type=quant_type, blocksize=blocksize, double_quant=False)
    assume(_nonzero_products_normal(q, out_dtype))
    with failure_note(x, quant_type=quant_type, blocksize=blocksize, double_quant=False, dtype=dtype):
        x_hat = qlora_ref.dequantize_4bit(q, dtype=out_dtype)
        q2 = qlora_ref.quantize_4bit(
            x_hat, quant_type=quant_type, blocksize=blocksize, double_quant=False, dtype=out_dtype
        )
        assert np.array_equal(q2.absmax.view(np.uint32), q.absmax.view(np.uint32))
        expected = _expected_requantized_codes(q.codes(), quant_type)
        diff = np.flatnonzero(q2.codes() != expected)
        assert diff.size == 0, (
            f"{diff.size} codes changed; first at {diff[0]}: {q.codes()[diff[0]]} -> {q2.codes()[diff[0]]}"
        )


@given(weights(dtype="float32"), st.sampled_from(["nf4", "int4"]))
def test_requantize_double_quant(w, quant_type):
    """Re-quantizing a double-quantized tensor's float32 dequantization, without double quant, gives the same codes
    and absmax == the decoded a_hat (DQ-3, BW-2 .. BW-7), when every a_hat is positive and large enough that no
    nonzero product is flushed.  (An all-zero block decodes to -a_hat with NF4/Int4 code 0; a_hat <= 0 would flip
    its signs: excluded by assume.)
    """
    x, dtype, blocksize = w
    assume(_block_absmax(_flat32(x, dtype), blocksize).max() <= RCP_LIMIT)
    q = qlora_ref.quantize_4bit(x, quant_type=quant_type, blocksize=blocksize, double_quant=True)
    a_hat = q.absmax_f32()
    assume(np.all(a_hat > 0) and a_hat.max() <= RCP_LIMIT and _nonzero_products_normal(q, "float32"))
    with failure_note(x, quant_type=quant_type, blocksize=blocksize, double_quant=True):
        x_hat = qlora_ref.dequantize_4bit(q, dtype="float32")
        q2 = qlora_ref.quantize_4bit(x_hat, quant_type=quant_type, blocksize=blocksize, double_quant=False)
        assert np.array_equal(q2.absmax.view(np.uint32), a_hat.view(np.uint32))
        assert np.array_equal(q2.codes(), q.codes())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_codes_far_from_thresholds(quant_type):
    """Every nonzero code value c is at least |c|/16 from every threshold (CB-5), far beyond the relative 5u + 2^-8
    that the fast-math reciprocal and a bfloat16 output move a re-quantized value (test_requantize_is_identity).
    """
    table = np.abs(codebook(quant_type)) if quant_type == "fp4" else codebook(quant_type)
    t = {"nf4": nf4_thresholds(), "int4": int4_thresholds(), "fp4": FP4_THRESHOLDS}[quant_type]
    c = table[table != 0].astype(np.float64)
    distance = np.abs(c[:, None] - t[None, :].astype(np.float64)).min(axis=1)
    assert np.all(distance >= np.abs(c) / 16), (c, distance)


# --- nearest code and tie rule ----------------------------------------------------------------------------------------


def _scaled(x, dtype, blocksize) -> np.ndarray:
    """y = ftz(ftz(x) rcp(absmax)) exactly as the quantizer sees it (BW-3, BW-8)."""
    x32 = _flat32(x, dtype)
    absmax = qlora_ref.quantize_4bit(x, dtype=dtype, blocksize=blocksize, double_quant=False).absmax
    return scale_blocks(x32, absmax, blocksize)[: x32.size]


def _on_thresholds(quant_type: str):
    """`weights`, half of them float32 tensors rich in exact thresholds of ``quant_type``."""
    focused = weights(dtype="float32", quant_type=quant_type, kinds=("thresholds", "ties", "zeros", "normal"))
    return st.one_of(weights(quant_type=quant_type), focused)


@pytest.mark.parametrize("quant_type", ["nf4", "int4"])
@given(data=st.data())
def test_nearest_code_nf4_int4(quant_type, data):
    """The code is a nearest code to y (BW-4, CB-5): |y - c[code]| <= |y - c[k]| for all k, in exact arithmetic.

    Tie rule, where y equals a float32 midpoint fl((c[k] + c[k+1]) / 2): the lower code k, except NF4's measured
    upper ties at 0|1, 12|13, 14|15 (NF4_UPPER_AT_TIE).  Note that at a float32 midpoint that rounded *up* from the
    exact one (NF4 1|2 and 3|4, several Int4 pairs) the lower code is half an ulp farther than the upper: the tie
    rule, not nearness, decides there.  An all-zero block (y = NaN) takes code 0 (BW-6).  Int4 never emits code 15.
    """
    x, dtype, blocksize = data.draw(_on_thresholds(quant_type))
    x32 = _flat32(x, dtype)
    assume(_block_absmax(x32, blocksize).max() <= RCP_LIMIT)
    with failure_note(x, quant_type=quant_type, blocksize=blocksize, double_quant=False, dtype=dtype):
        codes = qlora_ref.quantize_4bit(
            x, dtype=dtype, quant_type=quant_type, blocksize=blocksize, double_quant=False
        ).codes()
        y = _scaled(x, dtype, blocksize)
        table = codebook(quant_type)
        nan = np.isnan(y)
        assert np.all(codes[nan] == 0), "all-zero blocks encode as code 0 (BW-6)"
        if quant_type == "int4":
            assert not np.any(codes == 15)
        yv, cv = y[~nan].astype(np.float64), codes[~nan]
        mids = midpoint_thresholds(table if quant_type == "nf4" else table[:15]).astype(np.float64)
        tie = np.searchsorted(mids, yv)  # candidate k with mids[k] == y
        at_tie = (tie < mids.size) & (mids[np.minimum(tie, mids.size - 1)] == yv)
        upper = np.isin(tie, NF4_UPPER_AT_TIE) if quant_type == "nf4" else np.zeros_like(at_tie)
        expected_tie = np.where(upper, tie + 1, tie)
        event(f"y on a float32 midpoint: {bool(at_tie.any())}")
        event(f"y on a measured upper tie: {bool((at_tie & upper).any())}")
        above = np.nextafter(mids.astype(np.float32), np.float32(2))
        event(f"y one ulp above a midpoint: {bool(np.isin(yv, above).any())}")
        bad_tie = np.flatnonzero(at_tie & (cv != expected_tie))
        assert bad_tie.size == 0, f"tie at y={yv[bad_tie[0]]!r}: code {cv[bad_tie[0]]}, want {expected_tie[bad_tie[0]]}"
        d = np.abs(yv[:, None] - table[None, :].astype(np.float64))  # exact: y and c are float32
        d_code = d[np.arange(yv.size), cv]
        bad = np.flatnonzero(~at_tie & (d_code > d.min(axis=1)))
        assert bad.size == 0, f"y={yv[bad[0]]!r} got code {cv[bad[0]]}, nearest is {int(np.argmin(d[bad[0]]))}"


@given(_on_thresholds("fp4"))
def test_nearest_code_fp4(w):
    """FP4 is sign-magnitude (BW-5): the sign bit is set iff y < 0 (so -0.0 and tiny negatives keep it: code 8 for
    tiny negative y), and the magnitude is a nearest level to |y| up to the shift of bitsandbytes' float32 literals
    from the exact midpoints (at most 3.3e-7, at 7/12): ||y| - m[code]| <= ||y| - m[k]| + 2 delta_t.  At an exact
    literal the lower magnitude wins (strict '>').
    """
    x, dtype, blocksize = w
    x32 = _flat32(x, dtype)
    assume(_block_absmax(x32, blocksize).max() <= RCP_LIMIT)
    with failure_note(x, quant_type="fp4", blocksize=blocksize, double_quant=False, dtype=dtype):
        codes = qlora_ref.quantize_4bit(
            x, dtype=dtype, quant_type="fp4", blocksize=blocksize, double_quant=False
        ).codes()
        y = _scaled(x, dtype, blocksize)
        ok = ~np.isnan(y)
        assert np.array_equal((codes[ok] & 8) != 0, y[ok] < 0), "sign bit iff y < 0 (BW-5)"
        magnitudes = np.abs(codebook("fp4")[:8]).astype(np.float64)
        ay = np.abs(y[ok].astype(np.float64))
        d = np.abs(ay[:, None] - magnitudes[None, :])
        d_code = d[np.arange(ay.size), codes[ok] & 7]
        slack = 2 * _threshold_shift("fp4")
        bad = np.flatnonzero(d_code > d.min(axis=1) + slack)
        assert bad.size == 0, f"|y|={ay[bad[0]]!r} got magnitude code {codes[ok][bad[0]] & 7}"
        at_literal = np.isin(ay, FP4_THRESHOLDS.astype(np.float64))
        lower = np.searchsorted(np.sort(magnitudes), ay[at_literal])  # index of the level just below the literal
        assert np.array_equal(magnitudes[codes[ok][at_literal] & 7], np.sort(magnitudes)[lower - 1])


# --- sign, zero, monotonicity -----------------------------------------------------------------------------------------


@given(weights(), quant_types(), st.booleans())
def test_sign_and_zero_preserved(w, quant_type, double_quant):
    """Zero stays zero and a nonzero x_hat has x's sign (BW-5 .. BW-8, DQ-3), with the output in the input's dtype.

    Where the decoded absmax a_hat of a block is positive.  A double-quantized all-zero block is the exception,
    stated exactly: its codes are 0 (BW-6) and code 0 decodes to table[0] * a_hat, i.e. T(-a_hat) for NF4/Int4 (not
    zero: a_hat carries the 8-bit error of absmax - offset) and +0.0 for FP4.
    """
    x, dtype, blocksize = w
    x32 = _flat32(x, dtype)
    assume(_block_absmax(x32, blocksize).max() <= RCP_LIMIT)
    with failure_note(x, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant, dtype=dtype):
        q = qlora_ref.quantize_4bit(
            x, dtype=dtype, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant
        )
        assume(_double_quant_in_range(q))
        x_hat = _decoded_f64(qlora_ref.dequantize_4bit(q), dtype)
        a = _per_element(_block_absmax(x32, blocksize), q.n, blocksize)
        a_hat = _per_element(q.absmax_f32(), q.n, blocksize)
        zero_block = a == 0
        positive = (a_hat > 0) & ~zero_block
        x64 = x32.astype(np.float64)
        assert np.all(x_hat[positive & (x64 == 0)] == 0), "zero stays zero"
        nz = positive & (x_hat != 0)
        assert np.array_equal(np.sign(x_hat[nz]), np.sign(x64[nz])), "sign of a nonzero x_hat is the sign of x"
        first = np.float32(codebook(quant_type)[0] if quant_type != "fp4" else 0.0)
        expected = _decoded_f64(from_float32(first * a_hat[zero_block].astype(np.float32), dtype), dtype)
        assert np.array_equal(x_hat[zero_block], expected), "all-zero blocks decode table[0] * a_hat (BW-6, DQ-3)"
        if not double_quant:
            assert np.all(x_hat[zero_block] == 0)


@given(weights(), quant_types())
def test_monotone_within_block(w, quant_type):
    """Within a block, x_i <= x_j implies x_hat_i <= x_hat_j, and for NF4/Int4 code_i <= code_j (BW-3, BW-4: y is a
    monotone function of x, the thresholds ascend and NF4/Int4 codes ascend with their values, CB-1, CB-3).
    """
    x, dtype, blocksize = w
    x32 = _flat32(x, dtype)
    with failure_note(x, quant_type=quant_type, blocksize=blocksize, double_quant=False, dtype=dtype):
        q = qlora_ref.quantize_4bit(x, dtype=dtype, quant_type=quant_type, blocksize=blocksize, double_quant=False)
        x_hat = _decoded_f64(qlora_ref.dequantize_4bit(q, dtype="float32"), "float32")
        codes = q.codes()
        block = np.arange(x32.size) // blocksize
        order = np.lexsort((x32, block))  # by block, then by value
        same = block[order][1:] == block[order][:-1]
        assert np.all(np.diff(x_hat[order])[same] >= 0)
        if quant_type != "fp4":
            assert np.all(np.diff(codes[order].astype(int))[same] >= 0)


# --- packing ----------------------------------------------------------------------------------------------------------


@given(st.lists(st.integers(0, 15), max_size=300), st.integers(0, 15))
def test_pack_unpack_round_trip(codes, filler):
    """unpack(pack(codes), n) == codes (PK-3); byte j = code[2j] << 4 | code[2j+1] (PK-1); odd tail filler (PK-2)."""
    codes = np.array(codes, np.uint8)
    packed = qlora_ref.pack_4bit(codes, filler=filler)
    assert packed.dtype == np.uint8 and packed.shape == ((codes.size + 1) // 2,)
    assert np.array_equal(qlora_ref.unpack_4bit(packed, codes.size), codes)
    assert np.array_equal(packed[: codes.size // 2] >> 4, codes[0 : 2 * (codes.size // 2) : 2])
    if codes.size % 2:
        assert packed[-1] & 0x0F == filler


@given(weights(), quant_types())
def test_packed_odd_tail_nibble(w, quant_type):
    """An odd element count fills the last low nibble with the padding's code (PK-2): the code of 0.0 in that block,
    i.e. ZERO_CODE, or 0 when the last block is all zero (BW-6).
    """
    x, dtype, blocksize = w
    x = x.reshape(-1)[: x.size - (1 - x.size % 2)]  # drop one element from an even length: the length is odd
    x32 = _flat32(x, dtype)
    q = qlora_ref.quantize_4bit(x, dtype=dtype, quant_type=quant_type, blocksize=blocksize, double_quant=False)
    last_a = _block_absmax(x32, blocksize)[-1]
    with failure_note(x, quant_type=quant_type, blocksize=blocksize, double_quant=False, dtype=dtype):
        expected = 0 if last_a == 0 else ZERO_CODE[quant_type]
        assert q.packed[-1] & 0x0F == expected


# --- double quantization ----------------------------------------------------------------------------------------------

_MAP = dynamic_map(signed=True).astype(np.float64)
# Half the largest gap beside each code of the signed dynamic map; at the ends, the distance to -1 / +1 (y's range).
_HALF_GAP = np.maximum(
    np.concatenate([[_MAP[0] + 1.0], np.diff(_MAP) / 2]), np.concatenate([np.diff(_MAP) / 2, [1.0 - _MAP[-1]]])
)

many_blocks = weights(blocksize=st.sampled_from([32, 64]), min_blocks=1, max_blocks=600, max_size=600 * 64)


@given(st.one_of(weights(), many_blocks), quant_types())
def test_double_quant_absmax_error(w, quant_type):
    """|a_hat - a| <= N (h[q] + 2^-22) + 2^-23 (|a - offset| + N + |a_hat|) + 2 tiny (DQ-1 .. DQ-3, BW-3).

    N = nested_absmax of the 256-block, q = absmax_q, h[q] half the dynamic-map gap beside q (at the ends the
    distance to -1 / +1).  Derivation: v = fl(a - offset) (error u|v|); y = fl(v rcp(N)) within 4.01u of v/N; the
    8-bit search picks a code within h[q] + 1 ulp of y (its float32 midpoints); fl(code N) and fl(. + offset) add
    u|code N| and u|a_hat|.  Also DQ-1: offset is the mean of a within the tree reduction's rounding,
    |offset - mean| <= d u / (1 - d u) mean, d = rounds + log2(W) + 5 roundings on the longest path.
    """
    x, dtype, blocksize = w
    a = _block_absmax(_flat32(x, dtype), blocksize)
    assume(a.max() <= RCP_LIMIT)
    with failure_note(x, quant_type=quant_type, blocksize=blocksize, double_quant=True, dtype=dtype):
        q = qlora_ref.quantize_4bit(x, dtype=dtype, quant_type=quant_type, blocksize=blocksize, double_quant=True)
        assume(np.isfinite(q.offset))  # the float32 sum of the absmax overflows: `_double_quant_in_range`
        assert q.nested_absmax.shape == (-(-a.size // 256),)
        a_hat = q.absmax_f32().astype(np.float64)
        offset = float(q.offset)
        nested = np.repeat(q.nested_absmax.astype(np.float64), 256)[: a.size]
        bound = nested * (_HALF_GAP[q.absmax_q] + 2.0**-22) + 2.0**-23 * (np.abs(a - offset) + nested + np.abs(a_hat))
        bound += 2 * TINY
        err = np.abs(a_hat - a)
        bad = np.flatnonzero(~(err <= bound))
        assert bad.size == 0, f"block {bad[0]}: a={a[bad[0]]!r} a_hat={a_hat[bad[0]]!r} bound={bound[bad[0]]!r}"
        n = a.size
        lanes = min(1 << (n.bit_length() - 1), 512)
        d = -(-n // (4 * lanes)) + int(np.log2(lanes)) + 5
        mean = float(np.mean(a))
        assert abs(offset - mean) <= d * U / (1 - d * U) * mean + TINY, (offset, mean)
        assert np.float32(offset) == np.float32(torch_block_sum(a.astype(np.float32)) * (np.float32(1.0) / n))


# --- errors at the boundary -------------------------------------------------------------------------------------------

_NONFINITE = {
    "float32": [np.float32(np.nan), np.float32(np.inf), np.float32(-np.inf)],
    "float16": [np.float16(np.nan), np.float16(np.inf), np.float16(-np.inf)],
    "bfloat16": [np.uint16(0x7FC0), np.uint16(0x7F80), np.uint16(0xFF80)],
}


@given(weights(max_blocks=3), st.data())
def test_non_finite_input_raises(w, data):
    """NaN/Inf anywhere raise NonFiniteError (a ValueError) naming how many and the first flat index (BW-9)."""
    x, dtype, blocksize = w
    x = x.copy()
    flat = x.reshape(-1)
    positions = data.draw(st.lists(st.integers(0, flat.size - 1), min_size=1, max_size=5, unique=True))
    for p in positions:
        flat[p] = data.draw(st.sampled_from(_NONFINITE[dtype]))
    quant_type = data.draw(quant_types())
    with failure_note(x, quant_type=quant_type, blocksize=blocksize, dtype=dtype):
        with pytest.raises(qlora_ref.NonFiniteError) as info:
            qlora_ref.quantize_4bit(x, quant_type=quant_type, blocksize=blocksize, dtype=dtype)
        assert isinstance(info.value, ValueError)
        message = str(info.value)
        assert f"has {len(positions)} non-finite" in message, message
        assert f"at flat index {min(positions)}" in message, message


_bad_blocksizes = st.one_of(
    st.integers(-100, 10_000).filter(lambda b: b not in qlora_ref.BLOCKSIZES),
    st.sampled_from([True, 64.0, "64", None, np.float32(64)]),
)


@given(_bad_blocksizes, quant_types())
def test_bad_blocksize_raises(blocksize, quant_type):
    """A block size outside BLOCKSIZES is a ValueError naming the allowed sizes and what was received (BW-1)."""
    x = np.ones(64, np.float32)
    with pytest.raises(ValueError, match=re.escape(f"got {blocksize!r}")) as info:
        qlora_ref.quantize_4bit(x, quant_type=quant_type, blocksize=blocksize)
    assert str(qlora_ref.BLOCKSIZES) in str(info.value)


@pytest.mark.parametrize("shape", [(0,), (0, 8), (4, 0)])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_empty_input_raises(shape, dtype):
    """An empty tensor is a ValueError that says it is empty and its shape."""
    x = np.zeros(shape, np.uint16 if dtype == "bfloat16" else dtype)
    with pytest.raises(ValueError, match=re.escape(f"empty (shape {shape})")):
        qlora_ref.quantize_4bit(x, dtype=dtype)


@pytest.mark.parametrize(
    "x, dtype, error, match",
    [
        (np.ones(8, np.float64), None, TypeError, "float64 is not supported"),
        (np.ones(8, np.int32), None, TypeError, "int32 is not supported"),
        (np.ones(8, np.complex64), None, TypeError, "complex64 is not supported"),
        (np.ones(8, bool), None, TypeError, "bool is not supported"),
        (np.ones(8, np.uint16), "float16", TypeError, "read as bfloat16 bits"),
        (np.ones(8, np.float32), "bfloat16", TypeError, "cast the input first"),
        (np.ones(8, np.float32), "float64", ValueError, "dtype must be one of"),
    ],
)
def test_wrong_dtype_raises(x, dtype, error, match):
    """Unsupported input dtypes are TypeErrors that name the dtype and say what to pass (BW-1)."""
    with pytest.raises(error, match=match):
        qlora_ref.quantize_4bit(x, dtype=dtype)


def test_bad_quant_type_raises():
    """An unknown quant_type is a ValueError listing the known ones."""
    with pytest.raises(ValueError, match=r"one of \('nf4', 'fp4', 'int4'\), got 'nf8'"):
        qlora_ref.quantize_4bit(np.ones(8, np.float32), quant_type="nf8")


def _needs(field: str) -> str:
    return rf"{field} does not match its data: a tensor of shape \(.*\) at blocksize \d+ needs \w+ \(\d+,\), got "


# name -> (field changes, what the ValueError must say: the field, what it needs and what it got)
_MISMATCHES = {
    "packed one byte short": (lambda q: {"packed": q.packed[:-1]}, _needs("packed") + r"ndarray uint8"),
    "packed one byte long": (lambda q: {"packed": np.concatenate([q.packed, q.packed[:1]])}, _needs("packed")),
    "packed as int8": (lambda q: {"packed": q.packed.view(np.int8)}, _needs("packed") + r"ndarray int8"),
    "shape of another size": (lambda q: {"shape": (q.n + 2,)}, _needs("packed")),
    "empty shape": (lambda q: {"shape": (0, 3)}, re.escape("shape (0, 3) holds no elements")),
    "blocksize 48": (lambda q: {"blocksize": 48}, r"blocksize must be one of .*, got 48"),
    "dtype float64": (lambda q: {"dtype": "float64"}, r"dtype must be one of .*, got 'float64'"),
    "quant_type nf8": (lambda q: {"quant_type": "nf8"}, r"quant_type must be one of .*, got 'nf8'"),
    "nested_blocksize 128": (lambda q: {"nested_blocksize": 128}, "nested_blocksize must be 256, got 128"),
}
_PLAIN_MISMATCHES = {
    "absmax too long": (lambda q: {"absmax": np.concatenate([q.absmax, q.absmax[:1]])}, _needs("absmax")),
    "absmax float64": (lambda q: {"absmax": q.absmax.astype(np.float64)}, _needs("absmax") + "ndarray float64"),
    "absmax missing": (lambda q: {"absmax": None}, r"absmax is missing for a \w+ state of shape"),
    "offset without absmax_q": (lambda q: {"offset": np.float32(0)}, "given without absmax_q"),
}
_DQ_MISMATCHES = {
    "absmax_q too short": (lambda q: {"absmax_q": q.absmax_q[:-1]}, _needs("absmax_q")),
    "nested_absmax too long": (
        lambda q: {"nested_absmax": np.concatenate([q.nested_absmax, q.nested_absmax])},
        _needs("nested_absmax"),
    ),
    "offset missing": (lambda q: {"offset": None}, "double-quantized state needs an offset"),
    "absmax as well": (lambda q: {"absmax": q.absmax_f32()}, "give either absmax .* not both"),
}


@given(quantized_states(source=("quantize",), max_blocks=3), st.data())
def test_mismatched_state_raises(q, data):
    """A Quantized4bit whose fields disagree (length, dtype, missing or extra constants) is a ValueError that names
    the field, what its data needs and what it got; dequantize_4bit of anything else is a TypeError.
    """
    table = {**_MISMATCHES, **(_DQ_MISMATCHES if q.double_quant else _PLAIN_MISMATCHES)}
    name = data.draw(st.sampled_from(sorted(table)))
    note(name)
    change, message = table[name]
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(q, **change(q))
    with pytest.raises(TypeError, match="expects a Quantized4bit, got dict"):
        qlora_ref.dequantize_4bit({"weight": q.packed})


# --- state dict -------------------------------------------------------------------------------------------------------


def _same_state(q1, q2) -> bool:
    def same(a, b):
        return (a is None and b is None) or (
            a is not None
            and b is not None
            and np.asarray(a).dtype == np.asarray(b).dtype
            and np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
        )

    fields = ("packed", "absmax", "absmax_q", "nested_absmax")
    meta = ("shape", "dtype", "quant_type", "blocksize", "nested_blocksize")
    offsets = (q1.offset is None and q2.offset is None) or (
        q1.offset is not None and np.float32(q1.offset).view(np.uint32) == np.float32(q2.offset).view(np.uint32)
    )
    return (
        all(same(getattr(q1, f), getattr(q2, f)) for f in fields)
        and all(getattr(q1, m) == getattr(q2, m) for m in meta)
        and offsets
    )


@given(quantized_states(quant_type=st.sampled_from(["nf4", "fp4"])), st.sampled_from(["weight", "model.l0.weight"]))
def test_state_dict_round_trip(q, prefix):
    """from_bnb_state_dict(to_bnb_state_dict(q)) == q, every array bit for bit and the offset through JSON exactly
    (FMT-1 .. FMT-5); the entries have bitsandbytes' dtypes and shapes (FMT-1).  Int4 cannot be exported.
    """
    d = q.to_bnb_state_dict(prefix)
    assert d[prefix].dtype == np.uint8 and d[prefix].shape == ((q.n + 1) // 2, 1)
    assert d[f"{prefix}.absmax"].dtype == (np.uint8 if q.double_quant else np.float32)
    assert d[f"{prefix}.quant_map"].shape == (16,)
    q2 = qlora_ref.Quantized4bit.from_bnb_state_dict(d, prefix)
    assert _same_state(q, q2)
    assert np.array_equal(qlora_ref.dequantize_4bit(q).view(np.uint8), qlora_ref.dequantize_4bit(q2).view(np.uint8))
    with pytest.raises(ValueError, match="bitsandbytes has no 'int4' type"):
        dataclasses.replace(q, quant_type="int4").to_bnb_state_dict()
    bad = dict(d)
    bad[f"{prefix}.quant_map"] = d[f"{prefix}.quant_map"][::-1].copy()
    with pytest.raises(ValueError, match="not the standard"):
        qlora_ref.Quantized4bit.from_bnb_state_dict(bad, prefix)


# --- implementation knob: chunking ------------------------------------------------------------------------------------


@given(weights(max_blocks=8), quant_types(), st.data())
def test_chunked_quantization_is_bit_identical(w, quant_type, data):
    """Quantizing whole or as block-aligned chunks gives the same packed bytes and absmax, bit for bit (BW-2 .. BW-6,
    PK-1): each block's codes depend on that block alone, and block-aligned chunks hold an even number of codes, so
    their packed bytes concatenate.  The codes are also independent of double quantization.

    Double quantization is not chunk-invariant: its offset is the mean of *all* first-level absmax (DQ-1) and its
    nested absmax spans 256 blocks (DQ-2), so per-chunk offsets and nested constants differ; only the 4-bit codes
    (checked) carry over.
    """
    x, dtype, blocksize = w
    flat = x.reshape(-1)
    nblocks = -(-flat.size // blocksize)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, nblocks - 1)), max_size=nblocks)) if nblocks > 1 else [])
    pieces = np.split(flat, [c * blocksize for c in cuts])
    with failure_note(x, quant_type=quant_type, blocksize=blocksize, double_quant=False, dtype=dtype):
        whole = qlora_ref.quantize_4bit(
            flat, quant_type=quant_type, blocksize=blocksize, double_quant=False, dtype=dtype
        )
        parts = [
            qlora_ref.quantize_4bit(p, quant_type=quant_type, blocksize=blocksize, double_quant=False, dtype=dtype)
            for p in pieces
        ]
        assert np.array_equal(np.concatenate([p.packed for p in parts]), whole.packed)
        assert np.array_equal(np.concatenate([p.absmax for p in parts]).view(np.uint32), whole.absmax.view(np.uint32))
        assume(np.isfinite(np.sum(whole.absmax, dtype=np.float32)))  # DQ-1: else double quantization refuses
        dq = qlora_ref.quantize_4bit(flat, quant_type=quant_type, blocksize=blocksize, double_quant=True, dtype=dtype)
        assert np.array_equal(dq.packed, whole.packed)


def test_reproducer_note_is_attached():
    """A failing block inside failure_note carries the reproducer as an exception note (STYLE habit 12)."""
    x = np.array([1.0, -2.0, 0.5], np.float32)
    with pytest.raises(AssertionError) as info:
        with failure_note(x, quant_type="nf4", blocksize=64):
            raise AssertionError("boom")
    assert reproducer(x, quant_type="nf4", blocksize=64) in info.value.__notes__[0]
