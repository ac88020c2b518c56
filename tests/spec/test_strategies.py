"""Tests of the strategies in qlora_ref.testing themselves (STYLE habit 10): they are bounded, and they do produce the
adversarial cases they promise.  Coverage uses `hypothesis.find` (generation only, no shrinking) or a @given run that
counts what it saw; every test can fail.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import Phase, find, given, settings
from hypothesis import strategies as st

import qlora_ref
from qlora_ref.blockwise import scale_blocks
from qlora_ref.codebooks import FP4_THRESHOLDS, NF4_UPPER_AT_TIE, int4_thresholds, midpoint_thresholds, nf4_thresholds
from qlora_ref.testing import (
    KINDS,
    MAX_MAGNITUDE,
    blocksizes,
    carrier_to_float32,
    dtypes,
    quant_types,
    quantized_states,
    reproducer,
    threshold_values,
    weights,
)

TINY = float(np.finfo(np.float32).tiny)
CARRIER = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
SEARCH = settings(max_examples=600, phases=[Phase.generate], database=None)


def _find(strategy, condition):
    """The first generated example satisfying condition (fails with NoSuchExample if none in 600)."""
    return find(strategy, condition, settings=SEARCH)


def _blocks32(w) -> np.ndarray:
    """(nblocks, blocksize) float32 view, NaN-padded past n."""
    x, dtype, blocksize = w
    x32 = carrier_to_float32(x, dtype).ravel()
    nblocks = -(-x32.size // blocksize)
    padded = np.full(nblocks * blocksize, np.nan, np.float32)
    padded[: x32.size] = x32
    return padded.reshape(nblocks, blocksize)


def _zero_blocks(w) -> np.ndarray:
    b = _blocks32(w)
    return np.all((b == 0) | np.isnan(b), axis=1)


# --- bounded --------------------------------------------------------------------------------------------------------


@given(weights())
def test_weights_are_finite_and_in_range(w):
    """Every value is finite in its dtype (float16 included) and within MAX_MAGNITUDE; the carrier dtype, block size,
    length and shape are as documented, and the spec quantizes and decodes it to finite values."""
    x, dtype, blocksize = w
    assert isinstance(x, np.ndarray) and x.dtype == CARRIER[dtype]
    assert blocksize in qlora_ref.BLOCKSIZES
    assert 1 <= x.size <= max(3 * 4096, blocksize) and x.ndim in (1, 2)
    x32 = carrier_to_float32(x, dtype)
    assert np.all(np.isfinite(x32))
    assert np.abs(x32).max() <= MAX_MAGNITUDE[dtype] * (1 + 2.0**-8)
    q = qlora_ref.quantize_4bit(x, blocksize=blocksize, double_quant=False, dtype=dtype)
    assert np.all(np.isfinite(carrier_to_float32(qlora_ref.dequantize_4bit(q), dtype)))


@given(quantized_states())
def test_quantized_states_are_valid_and_decode_finite(q):
    """quantized_states yields Quantized4bit values that decode to finite values of their dtype."""
    assert isinstance(q, qlora_ref.Quantized4bit)
    assert np.all(np.isfinite(q.absmax_f32()))
    x_hat = qlora_ref.dequantize_4bit(q)
    assert x_hat.shape == q.shape and x_hat.dtype == CARRIER[q.dtype]
    assert np.all(np.isfinite(carrier_to_float32(x_hat, q.dtype)))


@given(st.data())
def test_bad_strategy_arguments_raise(data):
    """Unknown dtypes, block sizes or kinds are errors at draw time, not silent defaults."""
    for kwargs in ({"dtype": "float64"}, {"blocksize": 48}, {"kinds": ("gaussian",)}, {"kinds": ()}):
        with pytest.raises(ValueError, match="must be"):
            data.draw(weights(**kwargs))


# --- coverage: every block size, dtype, length class -----------------------------------------------------------------


@pytest.mark.parametrize("blocksize", qlora_ref.BLOCKSIZES)
def test_every_blocksize_occurs(blocksize):
    assert _find(weights(), lambda w: w[2] == blocksize)[2] == blocksize
    assert _find(blocksizes(), lambda b: b == blocksize) == blocksize


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_every_dtype_occurs(dtype):
    assert _find(weights(), lambda w: w[1] == dtype)[0].dtype == CARRIER[dtype]
    assert _find(dtypes(), lambda d: d == dtype) == dtype


def test_every_quant_type_occurs():
    assert {_find(quant_types(), lambda t, t0=t0: t == t0) for t0 in ("nf4", "fp4", "int4")} == {"nf4", "fp4", "int4"}


@pytest.mark.parametrize(
    "what, condition",
    [
        ("odd length", lambda w: w[0].size % 2 == 1),
        ("even length", lambda w: w[0].size % 2 == 0),
        ("partial last block", lambda w: w[0].size % w[2] != 0 and w[0].size > w[2]),
        ("whole blocks only", lambda w: w[0].size % w[2] == 0 and w[0].size > w[2]),
        ("a single short block", lambda w: w[0].size < w[2]),
        ("2-D shape", lambda w: w[0].ndim == 2 and w[0].shape[0] > 1),
        ("five blocks", lambda w: -(-w[0].size // w[2]) == 5),
    ],
)
def test_length_classes_occur(what, condition):
    assert condition(_find(weights(), condition)), what


# --- coverage: adversarial blocks ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "where, condition",
    [
        ("leading", lambda z: z[0] and not z.all()),
        ("middle", lambda z: z.size >= 3 and z[1:-1].any() and not z[0] and not z[-1]),
        ("last", lambda z: z[-1] and not z.all()),
        ("every block", lambda z: z.all()),
    ],
)
def test_all_zero_blocks_occur(where, condition):
    w = _find(weights(), lambda w: condition(_zero_blocks(w)))
    assert condition(_zero_blocks(w)), where


def test_negative_zeros_occur():
    def has_negative_zero(w):
        x32 = carrier_to_float32(w[0], w[1])
        return bool(np.any((x32 == 0) & np.signbit(x32)))

    assert has_negative_zero(_find(weights(kinds=("zeros", "normal")), has_negative_zero))


def _ties(w, both_signs: bool) -> bool:
    b = _blocks32(w)
    a = np.nanmax(np.abs(b), axis=1, keepdims=True)
    plus, minus = (b == a).sum(axis=1), (b == -a).sum(axis=1)
    ok = (a[:, 0] > 0) & (plus + minus >= 3)
    return bool(np.any(ok & (plus >= 1) & (minus >= 1))) if both_signs else bool(np.any(ok))


def test_absmax_ties_occur():
    """Blocks with several elements at +-absmax, with both signs (BW-2)."""
    assert _ties(_find(weights(kinds=("ties",)), lambda w: _ties(w, True)), True)
    assert _ties(_find(weights(kinds=("ties",), dtype="bfloat16"), lambda w: _ties(w, True)), True)


@pytest.mark.parametrize(
    "what, dtype, condition",
    [
        ("huge, rcp flushes (absmax > 2^126)", "float32", lambda x: np.abs(x).max() > 2.0**126),
        ("huge bfloat16 (> 1e38)", "bfloat16", lambda x: np.abs(x).max() > 1e38),
        ("float16 near its max", "float16", lambda x: np.abs(x).max() >= 2.0**15),
        ("float32 subnormal", "float32", lambda x: np.any((x != 0) & (np.abs(x) < TINY))),
        ("bfloat16 subnormal", "bfloat16", lambda x: np.any((x != 0) & (np.abs(x) < TINY))),
        ("float16 subnormal", "float16", lambda x: np.any((x != 0) & (np.abs(x) < 2.0**-14))),
        ("near 1e-30", "float32", lambda x: np.any((np.abs(x) > 1e-31) & (np.abs(x) < 1e-29))),
    ],
)
def test_extreme_magnitudes_occur(what, dtype, condition):
    def holds(w):
        return bool(condition(carrier_to_float32(w[0], w[1])))

    assert holds(_find(weights(dtype=dtype), holds)), what


def test_heavy_tails_occur():
    """A block whose absmax is over 100 times its median magnitude (an outlier dominates the scale)."""

    def heavy(w):
        b = np.abs(_blocks32(w))
        return bool(np.any(np.nanmax(b, axis=1) > 100 * np.nanmedian(b, axis=1)))

    assert heavy(_find(weights(kinds=("heavy",)), heavy))


@pytest.mark.parametrize(
    "quant_type, thresholds",
    [
        ("nf4", nf4_thresholds()),
        ("nf4", midpoint_thresholds(qlora_ref.nf4_table())[list(NF4_UPPER_AT_TIE)]),  # the measured-tie midpoints
        ("int4", int4_thresholds()),
        ("fp4", np.concatenate([FP4_THRESHOLDS, -FP4_THRESHOLDS])),
    ],
)
def test_every_exact_threshold_is_hit(quant_type, thresholds):
    """For float32, the quantizer's y = x * rcp(absmax) lands exactly on every decision threshold of the type (and
    on one ulp either side of it) in some generated block (CB-5, BW-3): counted over a @given run."""
    targets = np.concatenate(
        [thresholds, np.nextafter(thresholds, np.float32(np.inf)), np.nextafter(thresholds, np.float32(-np.inf))]
    ).astype(np.float32)
    seen = np.zeros(targets.size, bool)

    @settings(max_examples=60, phases=[Phase.generate], database=None)
    @given(weights(dtype="float32", quant_type=quant_type, kinds=("thresholds",)))
    def collect(w):
        x, dtype, blocksize = w
        x32 = carrier_to_float32(x, dtype).ravel()
        absmax = qlora_ref.quantize_4bit(x, blocksize=blocksize, double_quant=False).absmax
        y = scale_blocks(x32, absmax, blocksize)[: x32.size]
        seen[np.isin(targets, y)] = True

    collect()
    assert seen.all(), f"thresholds never hit: {targets[~seen]}"


@given(weights(dtype="float32", kinds=("thresholds",), max_blocks=2))
def test_threshold_values_are_exact_multiples_of_a_power_of_two(w):
    """In a float32 thresholds block, absmax is a power of two and every x / absmax is exactly one of
    threshold_values() or +-1 (the absmax element)."""
    allowed = np.concatenate([np.abs(threshold_values()), [1.0]])
    for b in _blocks32(w):
        b = b[~np.isnan(b)]
        a = np.abs(b).max()
        assert np.frexp(a)[0] == 0.5, a
        assert np.all(np.isin(np.abs(b / a), allowed))


def test_every_kind_is_drawn():
    """Each block kind is reachable on its own, and the default mixes several kinds in one tensor."""
    for kind in KINDS:
        _find(weights(kinds=(kind,)), lambda w: True)

    def mixed(w):
        z = _zero_blocks(w)
        return z.any() and not z.all()

    assert mixed(_find(weights(), mixed))


# --- quantized_states coverage ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "what, strategy, condition",
    [
        ("double quant", quantized_states(), lambda q: q.double_quant),
        ("plain", quantized_states(), lambda q: not q.double_quant),
        (
            "nested blocks > 1",
            quantized_states(blocksize=32, max_blocks=600, double_quant=True),
            lambda q: q.nblocks > 256,
        ),
        ("Int4 code 15 (random)", quantized_states(quant_type="int4"), lambda q: np.any(q.codes() == 15)),
        ("FP4 code 8", quantized_states(quant_type="fp4", source=("quantize",)), lambda q: np.any(q.codes() == 8)),
        ("bfloat16", quantized_states(), lambda q: q.dtype == "bfloat16"),
        ("2-D", quantized_states(), lambda q: len(q.shape) == 2),
    ],
)
def test_quantized_states_cover(what, strategy, condition):
    assert condition(_find(strategy, condition)), what


# --- reproducer ------------------------------------------------------------------------------------------------------


@given(weights(max_blocks=2), quant_types())
def test_reproducer_rebuilds_the_call(w, quant_type):
    """exec(reproducer(x, ...)) rebuilds x bit for bit (literal for small arrays, zlib+base64 for large) and makes
    the same call (STYLE habit 12)."""
    x, dtype, blocksize = w
    kwargs = dict(quant_type=quant_type, blocksize=blocksize, double_quant=False, dtype=dtype)
    code = reproducer(x, **kwargs)
    namespace: dict = {}
    exec(code, namespace)
    assert namespace["x"].dtype == x.dtype and namespace["x"].shape == x.shape
    assert np.array_equal(namespace["x"].view(np.uint8), x.view(np.uint8))
    assert np.array_equal(namespace["result"].packed, qlora_ref.quantize_4bit(x, **kwargs).packed)


def test_reproducer_small_arrays_are_literal():
    """Small arrays are written as exact literals (subnormals and -0.0 included) and any call can be named."""
    x = np.array([1.5, -0.0, 1e-45, 3.0e38], np.float32)
    code = reproducer(x, call="qlora_ref.f32_to_bf16")
    assert "np.array([1.5, -0.0, 1.401298464324817e-45, 3.0000000054977558e+38], dtype='<f4')" in code
    namespace: dict = {}
    exec(code, namespace)
    assert np.array_equal(namespace["result"], qlora_ref.f32_to_bf16(x))
