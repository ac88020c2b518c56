"""The 4-bit matvec of decoding (specs/matvec.md, MV-1 .. MV-9): the derived bound, its tightness, the order.

Tolerances: MV-8's bound, derived in specs/matvec.md (standard model, u = 2^-24, gamma_k = k u / (1 - k u) on the
abs-graph, plus the output's half-ulp).  A failing example prints its case dict; `build(case)` rebuilds its arrays.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qlora_ref
from qlora_ref import BLOCKSIZES, NonFiniteError, bf16_to_f32, f32_to_bf16
from qlora_ref.matvec import (
    U32,
    LoraTerm,
    _accumulate,
    depth,
    gamma,
    halfulp,
    matvec_4bit,
    matvec_bound,
    matvec_f64,
    segments,
)

SETTINGS = settings(max_examples=30, deadline=None)


@st.composite
def cases(draw, lora: bool = False):
    """A case as a dict of small parameters (the failing example is its own reproducer, via `build`)."""
    case = dict(
        out_f=draw(st.integers(1, 9)),
        in_f=draw(st.integers(1, 80)),
        T=draw(st.integers(1, 16)),
        blocksize=draw(st.sampled_from(BLOCKSIZES)),
        quant_type=draw(st.sampled_from(["nf4", "fp4"])),
        double_quant=draw(st.booleans()),
        x_dtype=draw(st.sampled_from(["float32", "bfloat16"])),
        out_dtype=draw(st.sampled_from(["bfloat16", "float32"])),
        w_scale=draw(st.sampled_from([1e-3, 1.0, 50.0])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )
    if lora:
        case.update(
            r=draw(st.integers(1, 8)), alpha=draw(st.sampled_from([1.0, 16.0, 3.0])), merged=draw(st.booleans())
        )
        case["merged_dtype"] = draw(st.sampled_from(["bfloat16", "float16", "float32"]))
    return case


def build(case: dict):
    """(x, q, lora) of a case: x float32 or bf16 bits [T, in], q [out, in], a LoraTerm or None."""
    rng = np.random.default_rng(case["seed"])
    W = (rng.standard_normal((case["out_f"], case["in_f"])) * case["w_scale"]).astype(np.float32)
    W[:, rng.random(case["in_f"]) < 0.1] = 0.0  # some all-zero columns: zero blocks when blocks are short
    q = qlora_ref.quantize_4bit(
        W, quant_type=case["quant_type"], blocksize=case["blocksize"], double_quant=case["double_quant"]
    )
    x = rng.standard_normal((case["T"], case["in_f"])).astype(np.float32)
    if case["x_dtype"] == "bfloat16":
        x = f32_to_bf16(x)
    lora = None
    if "r" in case:
        A = (rng.standard_normal((case["r"], case["in_f"])) * 0.1).astype(np.float32)
        B = (rng.standard_normal((case["out_f"], case["r"])) * 0.1).astype(np.float32)
        lora = LoraTerm(A, B, alpha=case["alpha"], merged=case["merged"], merged_dtype=case["merged_dtype"])
    return x, q, lora


def as_f32(y, out_dtype):
    return bf16_to_f32(y).astype(np.float64) if out_dtype == "bfloat16" else y.astype(np.float64)


def run(case):
    x, q, lora = build(case)
    xd = "bfloat16" if case["x_dtype"] == "bfloat16" else None
    y = matvec_4bit(x, q, dtype=xd, out_dtype=case["out_dtype"], lora=lora)
    y64, _ = matvec_f64(x, q, dtype=xd, lora=lora)
    bound = matvec_bound(x, q, y, dtype=xd, out_dtype=case["out_dtype"], lora=lora)
    return x, q, lora, y, y64, bound


# --- MV-8: within the bound ---------------------------------------------------------------------------------------


@SETTINGS
@given(cases())
def test_within_bound_of_float64_product(case):
    """MV-1 .. MV-5, MV-8: every shape, token count 1..16, block size, codebook, double quant, x and y dtype."""
    _, q, _, y, y64, bound = run(case)
    assert y.shape == (case["T"], case["out_f"])
    assert y.dtype == (np.uint16 if case["out_dtype"] == "bfloat16" else np.float32)
    err = np.abs(as_f32(y, case["out_dtype"]) - y64)
    assert (err <= bound).all(), f"worst err/bound {(err / bound).max()}"


@SETTINGS
@given(cases(lora=True))
def test_lora_within_bound(case):
    """MV-6 (unmerged: two thin float32 products added before the one rounding), MV-7 (merged weight), MV-8."""
    _, _, _, y, y64, bound = run(case)
    err = np.abs(as_f32(y, case["out_dtype"]) - y64)
    assert (err <= bound).all(), f"worst err/bound {(err / bound).max()}"


@SETTINGS
@given(cases())
def test_equals_plain_product_within_bound(case):
    """MV-8: y vs x @ dequantize_4bit(q).T in BLAS float32 (any order: within gamma_in S of exact) + MV-8's bound."""
    x, q, _, y, _, bound = run(case)
    x32 = bf16_to_f32(x) if case["x_dtype"] == "bfloat16" else x
    w32 = qlora_ref.dequantize_4bit(q, "float32")
    plain = (x32 @ w32.T).astype(np.float64)
    S = np.abs(x32.astype(np.float64)) @ np.abs(w32.astype(np.float64)).T
    extra = gamma(case["in_f"]) * S + case["in_f"] * 2.0**-149
    err = np.abs(as_f32(y, case["out_dtype"]) - plain)
    assert (err <= bound + extra).all(), f"worst {(err / (bound + extra)).max()}"


def test_any_order_bound_holds_for_other_orders():
    """MV-8 any_order: float32 sums in reversed order, pairwise, and one FMA chain (float64 product) stay within."""
    rng = np.random.default_rng(3)
    W = rng.standard_normal((6, 300)).astype(np.float32)
    q = qlora_ref.quantize_4bit(W, blocksize=64)
    x = rng.standard_normal((4, 300)).astype(np.float32)
    w = qlora_ref.dequantize_4bit(q, "float32")
    prods = x[:, None, :] * w[None]  # (T, out, in)
    y64, _ = matvec_f64(x, q)
    rev = np.zeros((4, 6), np.float32)
    fma = np.zeros((4, 6), np.float32)
    for j in reversed(range(300)):
        rev = rev + prods[..., j]
    for j in range(300):  # fma(x, w, acc): the exact product plus acc, rounded once
        fma = (fma.astype(np.float64) + x[:, None, j].astype(np.float64) * w[None, :, j]).astype(np.float32)
    pair = prods.copy()
    while pair.shape[-1] > 1:
        if pair.shape[-1] % 2:
            pair = np.concatenate([pair, np.zeros_like(pair[..., :1])], axis=-1)
        pair = pair[..., 0::2] + pair[..., 1::2]
    for y in (rev, fma, pair[..., 0]):
        assert (np.abs(y - y64) <= matvec_bound(x, q, y, out_dtype="float32", any_order=True)).all()


# --- MV-8: the bound is not vacuous -------------------------------------------------------------------------------


def ones_q(in_f: int, blocksize: int) -> qlora_ref.Quantized4bit:
    """One row of weights all exactly 1.0: NF4 code 15 (1.0) times absmax 1.0."""
    return qlora_ref.quantize_4bit(np.ones((1, in_f), np.float32), blocksize=blocksize, double_quant=False)


def test_gamma_term_is_reached():
    """MV-8: x = [1, p, p, ...], p just above half an ulp of 1, w = 1: every add rounds up by ~2^-24, so the float32
    error is (in - 1)(2^-24 - 2^-34) and the bound gamma_in (S ~ 1) is reached to within (in - 1)/in."""
    in_f = 64
    q = ones_q(in_f, 64)
    assert depth(1, in_f, 64)[0] == in_f
    x = np.full((1, in_f), 2.0**-24 * (1 + 2.0**-10), np.float32)
    x[0, 0] = 1.0
    y = matvec_4bit(x, q, out_dtype="float32")
    y64, _ = matvec_f64(x, q)
    err = abs(float(y[0, 0]) - float(y64[0, 0]))
    assert err == pytest.approx((in_f - 1) * (2.0**-24 - 2.0**-34), rel=1e-12)
    ratio = err / float(matvec_bound(x, q, y, out_dtype="float32")[0, 0])
    assert 0.95 < ratio <= 1.0


def test_bf16_half_ulp_is_reached():
    """MV-8 in bf16: over 16 x 64 random outputs the worst error is a large fraction of its bound."""
    rng = np.random.default_rng(0)
    q = qlora_ref.quantize_4bit(rng.standard_normal((64, 256)).astype(np.float32))
    x = f32_to_bf16(rng.standard_normal((16, 256)).astype(np.float32))
    y = matvec_4bit(x, q, dtype="bfloat16")
    y64, _ = matvec_f64(x, q, dtype="bfloat16")
    ratio = np.abs(bf16_to_f32(y) - y64) / matvec_bound(x, q, y, dtype="bfloat16")
    assert 0.8 < ratio.max() <= 1.0


def test_wrong_decodes_break_the_bound():
    """MV-2, MV-5, MV-8: the neighbouring block's absmax, Ŵ rounded to bf16 before the product, or the double-quant
    absmax used as its 8-bit code scaled by the nested absmax without the offset, each leave the bound."""
    rng = np.random.default_rng(1)
    W = rng.standard_normal((8, 128)).astype(np.float32)
    q = qlora_ref.quantize_4bit(W, blocksize=32)
    x = rng.standard_normal((2, 128)).astype(np.float32)
    y64, _ = matvec_f64(x, q)
    w = qlora_ref.dequantize_4bit(q, "float32")
    absmax = q.absmax_f32()
    scale = np.repeat(absmax, 32).reshape(w.shape)
    wrong_absmax = w / scale * np.repeat(np.roll(absmax, 1), 32).reshape(w.shape)  # (out, in)
    wrong_bf16 = bf16_to_f32(f32_to_bf16(w))
    no_offset = w / scale * np.repeat(absmax - q.offset, 32).reshape(w.shape)
    for wrong in (wrong_absmax, wrong_bf16, no_offset):
        y = _accumulate(x, wrong.astype(np.float32), 32)
        assert (np.abs(y - y64) > matvec_bound(x, q, y, out_dtype="float32")).any()
    right = _accumulate(x, w, 32)
    assert (np.abs(right - y64) <= matvec_bound(x, q, right, out_dtype="float32")).all()


def test_rounding_the_unmerged_lora_to_bf16_breaks_the_bound():
    """MV-6: u rounded to bf16 between the thin products (not the spec's order) leaves the float32 bound."""
    rng = np.random.default_rng(2)
    q = qlora_ref.quantize_4bit(rng.standard_normal((16, 64)).astype(np.float32))
    x = rng.standard_normal((4, 64)).astype(np.float32)
    A = rng.standard_normal((8, 64)).astype(np.float32)
    B = rng.standard_normal((16, 8)).astype(np.float32)
    lora = LoraTerm(A, B, alpha=16.0)
    y64, _ = matvec_f64(x, q, lora=lora)
    base = _accumulate(x, qlora_ref.dequantize_4bit(q, "float32"), 64)
    u16 = bf16_to_f32(f32_to_bf16(x @ A.T))
    wrong = base + np.float32(lora.scaling) * (u16 @ B.T)
    assert (np.abs(wrong - y64) > matvec_bound(x, q, wrong, out_dtype="float32", lora=lora)).any()
    y = matvec_4bit(x, q, out_dtype="float32", lora=lora)
    assert (np.abs(y - y64) <= matvec_bound(x, q, y, out_dtype="float32", lora=lora)).all()


# --- MV-4, MV-5: the order, by hand --------------------------------------------------------------------------------


def test_hand_checked_tiny_case():
    """MV-2, MV-4: NF4 codes [15, 0, 7, 15] / [7, 7, 15, 0] (1.0, -1.0, 0.0) at absmax 0.5, x = [1, 2, 3, 4]."""
    packed = np.array([0xF0, 0x7F, 0x77, 0xF0], np.uint8)  # [15, 0, 7, 15, 7, 7, 15, 0], high nibble first (PK-1)
    q = qlora_ref.Quantized4bit(packed=packed, shape=(2, 4), dtype="float32", absmax=np.array([0.5], np.float32))
    np.testing.assert_array_equal(qlora_ref.dequantize_4bit(q), [[0.5, -0.5, 0.0, 0.5], [0.0, 0.0, 0.5, -0.5]])
    x = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    np.testing.assert_array_equal(matvec_4bit(x, q, out_dtype="float32"), [1.5, -0.5])  # 0.5-1+0+2, 1.5-2
    np.testing.assert_array_equal(bf16_to_f32(matvec_4bit(x, q)), [1.5, -0.5])


def test_order_within_and_across_segments():
    """MV-4: with w = 1, x = [1, t, t] (t = 2^-24) in one segment is ((1 + t) + t) = 1 (each add a tie to even);
    with the two t in the next block the segment sums are 1 and 2t, and y = 1 + 2^-23 exactly."""
    t = np.float32(2.0**-24)
    x = np.array([[1.0, t, t]], np.float32)
    assert matvec_4bit(x, ones_q(3, 32), out_dtype="float32")[0, 0] == np.float32(1.0)
    x = np.zeros((1, 64), np.float32)
    x[0, 0], x[0, 32], x[0, 33] = 1.0, t, t
    assert matvec_4bit(x, ones_q(64, 32), out_dtype="float32")[0, 0] == np.float32(1.0 + 2.0**-23)


def test_segments_of_unaligned_rows():
    """MV-4: in = 5, blocksize = 32 over 8 rows: row o's elements are cut where o*5 + j crosses a multiple of 32."""
    seg, pos = segments(8, 5, 32)
    flat = np.arange(40).reshape(8, 5)
    np.testing.assert_array_equal(seg, flat // 32 - flat[:, :1] // 32)
    np.testing.assert_array_equal(pos, flat % 32)
    assert seg[6].tolist() == [0, 0, 1, 1, 1]  # flat 30, 31 | 32, 33, 34
    assert depth(8, 5, 32).tolist() == [5, 5, 5, 5, 5, 5, 4, 5]  # row 6: L = 3, C = 2


def test_output_rounds_once():
    """MV-5: the bf16 output is the RNE of the float32 result, not of a per-segment bf16 rounding."""
    rng = np.random.default_rng(4)
    q = qlora_ref.quantize_4bit(rng.standard_normal((5, 200)).astype(np.float32), blocksize=32)
    x = rng.standard_normal((3, 200)).astype(np.float32)
    np.testing.assert_array_equal(matvec_4bit(x, q), f32_to_bf16(matvec_4bit(x, q, out_dtype="float32")))
    assert halfulp(np.array([0x3F80], np.uint16), "bfloat16")[0] == 2.0**-8  # 1.0: next is 1 + 2^-7
    assert halfulp(np.array([0x0000], np.uint16), "bfloat16")[0] == 2.0**-134


def test_x_forms_agree():
    """MV-1: one token as [in] equals [1, in]; bf16 x as uint16 bits, torch bf16 and ml_dtypes give the same bits."""
    rng = np.random.default_rng(5)
    q = qlora_ref.quantize_4bit(rng.standard_normal((4, 40)).astype(np.float32), quant_type="fp4", blocksize=32)
    x32 = rng.standard_normal((2, 40)).astype(np.float32)
    bits = f32_to_bf16(x32)
    ref = matvec_4bit(bits, q, dtype="bfloat16")
    np.testing.assert_array_equal(matvec_4bit(torch.from_numpy(x32).bfloat16(), q), ref)
    np.testing.assert_array_equal(matvec_4bit(bits[1], q, dtype="bfloat16"), ref[1])
    ml_dtypes = pytest.importorskip("ml_dtypes")
    np.testing.assert_array_equal(matvec_4bit(bits.view(ml_dtypes.bfloat16), q), ref)


def test_unmerged_lora_order():
    """MV-6: u and v are float32 sums in index order from +0, added to the base accumulator, rounded once."""
    rng = np.random.default_rng(6)
    q = qlora_ref.quantize_4bit(rng.standard_normal((3, 64)).astype(np.float32), blocksize=32)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    A = rng.standard_normal((4, 64)).astype(np.float32)
    B = rng.standard_normal((3, 4)).astype(np.float32)
    lora = LoraTerm(A, B, alpha=3.0)
    u = np.zeros((2, 4), np.float32)
    for j in range(64):
        u = u + x[:, j : j + 1] * A[None, :, j]
    v = np.zeros((2, 3), np.float32)
    for k in range(4):
        v = v + u[:, k : k + 1] * B[None, :, k]
    want = matvec_4bit(x, q, out_dtype="float32") + np.float32(0.75) * v
    np.testing.assert_array_equal(matvec_4bit(x, q, out_dtype="float32", lora=lora), want)
    np.testing.assert_array_equal(matvec_4bit(x, q, lora=lora), f32_to_bf16(want))


def test_merged_lora_reads_the_merged_weight():
    """MV-7: merged = the MV-4 product over round_bf16(W_hat + s B A) (LORA-6's one rounding)."""
    rng = np.random.default_rng(7)
    q = qlora_ref.quantize_4bit(rng.standard_normal((3, 64)).astype(np.float32), blocksize=32, double_quant=False)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    A = rng.standard_normal((2, 64)).astype(np.float32)
    B = rng.standard_normal((3, 2)).astype(np.float32)
    w_hat = qlora_ref.dequantize_4bit(q, "float32")
    merged = qlora_ref.lora_merge(w_hat, A, B, alpha=2.0)  # float32 W' (one rounding to float32)
    lora = LoraTerm(A, B, alpha=2.0, merged=True, merged_dtype="float32")
    np.testing.assert_array_equal(matvec_4bit(x, q, out_dtype="float32", lora=lora), _accumulate(x, merged, 32))


# --- MV-9: the boundary ---------------------------------------------------------------------------------------------


def test_boundary_errors():
    """MV-9: one clear error for each wrong input."""
    rng = np.random.default_rng(8)
    q = qlora_ref.quantize_4bit(rng.standard_normal((3, 40)).astype(np.float32))
    x = np.ones((2, 40), np.float32)
    A, B = np.ones((2, 40), np.float32), np.ones((3, 2), np.float32)
    with pytest.raises(ValueError, match="1..16 tokens"):
        matvec_4bit(np.ones((17, 40), np.float32), q)
    with pytest.raises(ValueError, match=r"x must be \[T, 40\]"):
        matvec_4bit(np.ones((2, 41), np.float32), q)
    with pytest.raises(ValueError, match="2-D"):
        matvec_4bit(x[0], qlora_ref.quantize_4bit(np.ones(40, np.float32)))
    with pytest.raises(ValueError, match="out_dtype"):
        matvec_4bit(x, q, out_dtype="float16")
    with pytest.raises(TypeError, match="float16"):
        matvec_4bit(x.astype(np.float16), q)
    with pytest.raises(NonFiniteError):
        matvec_4bit(np.full((1, 40), np.nan, np.float32), q)
    with pytest.raises(ValueError, match=r"A must be \[r, 40\]"):
        matvec_4bit(x, q, lora=LoraTerm(A, np.ones((4, 2), np.float32), alpha=1.0))
    with pytest.raises(TypeError, match="float32"):
        matvec_4bit(x, q, lora=LoraTerm(A.astype(np.float64), B, alpha=1.0))
    with pytest.raises(TypeError, match="LoraTerm"):
        matvec_4bit(x, q, lora=(A, B))
    with pytest.raises(ValueError, match="merged_dtype"):
        LoraTerm(A, B, alpha=1.0, merged=True, merged_dtype="int8")


def test_gamma_is_the_standard_constant():
    """MV-8: gamma_k = k u / (1 - k u) with u = 2^-24."""
    assert gamma(1) == pytest.approx(U32 / (1 - U32), rel=1e-15)
    assert gamma(64) > 64 * U32
