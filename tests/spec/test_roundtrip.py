"""Round trips (specs/formats.md FMT-7, RT-1 .. RT-4): re-quantizing a decoded tensor, state dict -> Quantized4bit
-> state dict, and every corruption of a state dict refused.  The properties live in qlora_ref.testing for users."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, note
from hypothesis import strategies as st

import qlora_ref as Q
from qlora_ref.double_quant import absmax_mean
from qlora_ref.testing import (
    CORRUPTIONS,
    bnb_state_dicts,
    check_refused,
    check_requantize,
    check_state_dict_round_trip,
    corruptions,
    quantized_states,
    requantized,
    requantizes_exactly,
    same_state,
    weights,
)

# --- RT-1 / RT-2: quantize o dequantize -------------------------------------------------------------------------------


@given(quantized_states(source=("quantize",)))
def test_requantizing_a_decoded_tensor_gives_requantized_state(q):
    """RT-1 / RT-2 on adversarial weights (every kind, dtype, block size, quant type, with and without DQ)."""
    assume(requantizes_exactly(q))
    check_requantize(q)


@given(weights(), st.sampled_from(["nf4", "int4"]))
def test_plain_nf4_and_int4_states_are_fixed_points(w, quant_type):
    """RT-1: for plain NF4 / Int4, requantized(q) is q itself, byte for byte."""
    x, dtype, blocksize = w
    q = Q.quantize_4bit(x, quant_type=quant_type, blocksize=blocksize, double_quant=False, dtype=dtype)
    assume(requantizes_exactly(q))
    assert same_state(requantized(q), q)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_double_quantization_is_not_a_fixed_point(dtype):
    """RT-2: NF4 + DQ re-quantized keeps its codes and absmax a_T = round_T(a_hat), but not its DQ constants: the new
    offset is DQ-1's mean of a_hat (float32) or of round_bf16(a_hat), not of the original absmax."""
    x = (np.random.default_rng(3).standard_normal(64 * 512) * 0.02).astype(np.float32)
    x = x if dtype == "float32" else Q.f32_to_bf16(x)
    q = Q.quantize_4bit(x, dtype=dtype)
    assert requantizes_exactly(q)
    again = Q.quantize_4bit(Q.dequantize_4bit(q), dtype=dtype)
    a_t = requantized(q).absmax
    assert np.array_equal(again.packed, q.packed)
    assert np.float32(again.offset) == absmax_mean(a_t) != np.float32(q.offset)
    assert not np.array_equal(again.absmax_f32(), q.absmax_f32())
    if dtype == "float32":
        assert np.array_equal(a_t.view(np.uint32), q.absmax_f32().view(np.uint32))  # a_T = a_hat exactly


def _tiny_product():
    x = np.zeros(64, np.float32)
    a = 1.5 * 2.0**-123
    x[:2] = [a, 0.1 * a]  # 0.1 a is normal and takes code 8, but 0.0796 a is subnormal: decodes to 0 (BW-8)
    return Q.quantize_4bit(x, double_quant=False), 1, 8, 7


def _float16_subnormal():
    x = np.zeros(64, np.float16)
    u = 2.0**-24  # the float16 subnormal step
    x[:2] = [5 * u, -4 * u]  # y = -0.8: code 1 (-0.696), decodes to -3.48 u, a float16 subnormal: -3 u, y = -0.6
    return Q.quantize_4bit(x, double_quant=False), 1, 1, 2


def _huge_block():
    x = np.full(64, 2.0e38, np.float32)  # rcp(2e38) flushes to 0: y = 0, code 7 everywhere, decodes to +0.0
    return Q.quantize_4bit(x, double_quant=False), 0, 7, 0  # ... and re-quantizes as an all-zero block (BW-6)


@pytest.mark.parametrize("case", [_tiny_product, _float16_subnormal, _huge_block])
def test_outside_the_precondition_requantizing_changes_the_codes(case):
    """RT-1's precondition is needed: each excluded class re-quantizes to other codes, for the stated reason (a
    flushed product, a float16-subnormal product, a flushed reciprocal)."""
    q, i, old, new = case()
    assert not requantizes_exactly(q)
    again = Q.quantize_4bit(Q.dequantize_4bit(q), quant_type=q.quant_type, double_quant=False, dtype=q.dtype)
    assert q.codes()[i] == old and again.codes()[i] == new
    if case is _huge_block:
        assert again.absmax[0] == 0 and np.all(again.packed == 0)
        assert np.all(Q.dequantize_4bit(q) == 0) and not np.signbit(Q.dequantize_4bit(q)).any()  # +0.0
        assert np.signbit(Q.dequantize_4bit(again)).all()  # -0.0: the all-zero block


def test_a_negative_a_hat_mirrors_its_block():
    """RT-1 (a): double quantization can put a zero block's a_hat below 0; decoding then flips the block's signs
    (code 0, -1.0, gives +|a_hat|), so it re-quantizes with absmax |a_hat| and code 15."""
    rng = np.random.default_rng(0)
    for _ in range(100):  # a seeded search: the 12th state holds one
        nb = int(rng.integers(2, 40))
        x = (rng.standard_normal(nb * 64) * rng.uniform(0.01, 10, nb * 64)).astype(np.float32)
        z = int(rng.integers(0, nb))
        x[z * 64 : (z + 1) * 64] = 0
        q = Q.quantize_4bit(x)
        if q.absmax_f32()[z] < 0:
            break
    a_hat = q.absmax_f32()[z]
    assert a_hat < 0 and not requantizes_exactly(q)
    again = Q.quantize_4bit(Q.dequantize_4bit(q), double_quant=False)
    assert np.all(q.codes()[z * 64 : (z + 1) * 64] == 0) and np.all(again.codes()[z * 64 : (z + 1) * 64] == 15)
    assert again.absmax[z] == -a_hat


# --- RT-3: state dict -> Quantized4bit -> state dict -----------------------------------------------------------------


@given(bnb_state_dicts())
def test_state_dict_round_trip_is_the_identity(dp):
    """RT-3: every key, dtype, shape and byte comes back (quantized and random valid states, NF4 and FP4, DQ or not)."""
    d, prefix = dp
    check_state_dict_round_trip(d, prefix)


# --- RT-4: corruptions ------------------------------------------------------------------------------------------------


@given(st.booleans().flatmap(lambda dq: st.tuples(bnb_state_dicts(double_quant=dq, max_blocks=3), corruptions(dq))))
def test_every_corruption_is_refused(case):
    """RT-4 / FMT-5: each corruption of a valid state dict is one clear, one-line error naming the entry."""
    (d, prefix), name = case
    note(name)
    check_refused(d, prefix, name)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_each_corruption_on_a_fixed_state(name):
    """Every entry of CORRUPTIONS, on a fixed NF4 state of the kind it applies to (so none goes untested)."""
    applies = CORRUPTIONS[name][0]
    x = (np.random.default_rng(5).standard_normal((3, 100)) * 0.02).astype(np.float32)
    for double_quant in (True, False):
        if applies == "both" or applies == ("dq" if double_quant else "plain"):
            d = Q.quantize_4bit(x, double_quant=double_quant).to_bnb_state_dict("layer.weight")
            check_refused(d, "layer.weight", name)


def test_check_refused_fails_on_an_accepted_change():
    """The property can fail: a change the reader accepts is reported, not passed."""
    d = Q.quantize_4bit(np.ones(64, np.float32), double_quant=False).to_bnb_state_dict()
    CORRUPTIONS["test: harmless"] = ("both", lambda d, p: dict(d), ValueError, "")
    try:
        with pytest.raises(AssertionError, match="was accepted"):
            check_refused(d, "weight", "test: harmless")
    finally:
        del CORRUPTIONS["test: harmless"]
