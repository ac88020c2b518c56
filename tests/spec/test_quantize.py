"""Unit tests of the spec's quantizer: worked examples, the fast-math arithmetic, costs and boundary errors."""

from __future__ import annotations

import numpy as np
import pytest

import qlora_ref as Q
from qlora_ref import fastmath


def test_nf4_worked_example_strict_greater():
    """BW-4: a block [-1, 0, t5, t5+ulp, 1] (absmax 1) encodes by counting thresholds strictly below y."""
    t = Q.nf4_thresholds()
    up = np.nextafter(t[5], np.float32(1))
    x = np.array([-1.0, 0.0, t[5], up, 1.0] + [0.0] * 59, np.float32)
    codes = Q.quantize_4bit(x, double_quant=False).codes()
    assert codes[:5].tolist() == [0, 7, 5, 6, 15]


def test_partial_block_and_odd_tail():
    """PK-2: n = 1001 leaves the last low nibble to the code of 0.0 (7), as bitsandbytes writes 0xa7."""
    x = np.full(1001, 0.5, np.float32)
    x[-1] = 1.0
    q = Q.quantize_4bit(x, double_quant=False)
    assert q.packed.size == 501 and q.packed[-1] == 0xF7
    assert q.nblocks == 16 and q.absmax[-1] == 1.0


def test_rcp_table_is_within_one_ulp_and_significand_only():
    """BW-3: the measured reciprocal is the correctly rounded one within one ulp, the same at every exponent."""
    rng = np.random.default_rng(0)
    x = rng.uniform(1, 2, 100_000).astype(np.float32)
    r = fastmath.rcp_approx(x)
    exact = np.float32(1) / x
    assert np.all(np.abs(r.view(np.int32).astype(np.int64) - exact.view(np.int32)) <= 1)
    assert np.any(r != exact)
    for scale in (2.0**-40, 2.0**-3, 2.0**20):
        rs = fastmath.rcp_approx((x * np.float32(scale)).astype(np.float32))
        assert np.array_equal(rs, (r / np.float32(scale)).astype(np.float32))
    assert fastmath.rcp_approx(np.array([1, 2, 0.25], np.float32)).tolist() == [1, 0.5, 4]
    assert np.isinf(fastmath.rcp_approx(np.array([0.0], np.float32)))[0]


def test_flush_to_zero_keeps_sign():
    """BW-8: subnormals become zeros of the same sign; a subnormal reciprocal becomes 0."""
    tiny = np.array([1e-40, -1e-40, 1e-30], np.float32)
    f = fastmath.ftz(tiny)
    assert f[0] == 0 and not np.signbit(f[0]) and f[1] == 0 and np.signbit(f[1]) and f[2] == tiny[2]
    assert fastmath.rcp_approx(np.array([2.0**127], np.float32))[0] == 0


def test_subnormal_block_is_a_zero_block():
    """BW-8 then BW-6: a block of subnormals reads as zeros: absmax 0, bytes 0x00."""
    q = Q.quantize_4bit(np.full(64, 1e-40, np.float32), double_quant=False)
    assert q.absmax[0] == 0 and np.all(q.packed == 0)


def test_bits_per_parameter():
    """DQ-4: storage is 4.5 bits/param plain and about 4.127 with double quantization (blocksize 64)."""
    x = np.random.default_rng(0).standard_normal(64 * 256 * 16).astype(np.float32)
    plain = Q.quantize_4bit(x, double_quant=False).nbytes() * 8 / x.size
    dq = Q.quantize_4bit(x).nbytes() * 8 / x.size
    assert plain == 4.5
    assert abs(dq - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-3


def test_state_dict_tables_and_int4_refused():
    """FMT-3: quant_map is the 16-entry table and nested_quant_map the signed dynamic map; FMT-4: no Int4 export."""
    x = np.linspace(-1, 1, 512, dtype=np.float32)
    d = Q.quantize_4bit(x, quant_type="fp4").to_bnb_state_dict()
    assert np.array_equal(d["weight.quant_map"], Q.fp4_table())
    assert np.array_equal(d["weight.nested_quant_map"], Q.dynamic_map(True))
    with pytest.raises(ValueError, match="bitsandbytes has no 'int4' type"):
        Q.quantize_4bit(x, quant_type="int4").to_bnb_state_dict()


@pytest.mark.parametrize(
    "x, kwargs, error, match",
    [
        (np.array([1.0, np.nan, np.inf, 2.0], np.float32), {}, Q.NonFiniteError, "2 non-finite value.*flat index 1"),
        (np.ones(64, np.float32), {"blocksize": 48}, ValueError, "blocksize must be one of"),
        (np.ones(0, np.float32), {}, ValueError, "is empty"),
        (np.ones(64, np.int32), {}, TypeError, "int32 is not supported"),
        (np.ones(64, np.uint16), {"dtype": "float16"}, TypeError, "read as bfloat16 bits"),
        (np.ones(64, np.float32), {"quant_type": "nf2"}, ValueError, "quant_type must be one of"),
    ],
)
def test_boundary_errors_say_what_to_do(x, kwargs, error, match):
    """BW-9: clear errors at the boundary."""
    with pytest.raises(error, match=match):
        Q.quantize_4bit(x, **kwargs)


def test_mismatched_state_is_refused():
    """BW-9: a Quantized4bit whose arrays do not fit its shape is an error naming what it needed."""
    q = Q.quantize_4bit(np.ones(128, np.float32), double_quant=False)
    with pytest.raises(ValueError, match=r"absmax does not match its data.*float32 \(2,\)"):
        Q.Quantized4bit(packed=q.packed, shape=(128,), dtype="float32", absmax=q.absmax[:1])
    with pytest.raises(TypeError, match="expects a Quantized4bit"):
        Q.dequantize_4bit(np.zeros(3))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_dequantize_rounds_once_to_the_asked_dtype(dtype):
    """BW-7: the float32 product rounded once; bf16 comes back as uint16 bits."""
    x = np.random.default_rng(1).standard_normal((33, 7)).astype(np.float32)
    q = Q.quantize_4bit(x)
    out = Q.dequantize_4bit(q, dtype=dtype)
    f32 = Q.dequantize_4bit(q, dtype="float32")
    assert out.shape == (33, 7)
    if dtype == "bfloat16":
        assert out.dtype == np.uint16 and np.array_equal(out, Q.f32_to_bf16(f32))
    else:
        assert out.dtype == dtype and np.array_equal(out, f32.astype(dtype))


def test_spec_imports_only_numpy_and_scipy():
    """The executable spec pulls in no framework: importing qlora_ref loads no torch, cupy, hypothesis or ml_dtypes."""
    import subprocess
    import sys

    code = (
        "import sys, qlora_ref; qlora_ref.quantize_4bit(__import__('numpy').ones(64, 'float32'));"
        "bad = [m for m in ('torch', 'cupy', 'hypothesis', 'ml_dtypes', 'backends') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_double_quant_refuses_an_overflowing_absmax_sum():
    """DQ-1: an absmax sum beyond float32 is refused with advice, not turned into inf."""
    x = np.full(192, 2e38, np.float32)
    with pytest.raises(ValueError, match="double_quant=False"):
        Q.quantize_4bit(x)
    assert np.all(np.isfinite(Q.dequantize_4bit(Q.quantize_4bit(x, double_quant=False))))
