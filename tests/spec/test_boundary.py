"""The spec's boundary (specs/formats.md FMT-5, FMT-6): dtype-likes of every spelling, torch tensors and ml_dtypes
arrays read without casting, state-dict entries checked (never cast), one clear one-line error for each bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given

import qlora_ref as Q
from qlora_ref.dtypes import output_dtype, resolve_dtype
from qlora_ref.testing import check_dtype_like, dtype_likes, quantized_states, same_state

# --- FMT-6: dtype-likes ---------------------------------------------------------------------------------------------


@given(quantized_states(max_blocks=3), dtype_likes())
def test_every_dtype_like_gives_the_same_bytes(q, like_and_name):
    """dequantize_4bit(q, like) == dequantize_4bit(q, name) byte for byte, in output_dtype(like); quantize_4bit
    accepts the same spellings."""
    like, name = like_and_name
    check_dtype_like(q, like, name)


def test_dequantize_takes_numpy_types_and_returns_them():
    """The issue's example: dtype=np.float32 (raised before) returns float32; np.dtype objects too."""
    q = Q.quantize_4bit(np.linspace(-1, 1, 300, dtype=np.float32))
    assert Q.dequantize_4bit(q, dtype=np.float32).dtype == np.float32
    assert Q.dequantize_4bit(q, np.dtype("float16")).dtype == np.float16
    bits = Q.dequantize_4bit(q, "bf16")
    assert bits.dtype == np.uint16 and np.array_equal(bits, Q.f32_to_bf16(Q.dequantize_4bit(q, "float32")))
    assert Q.Quantized4bit(packed=q.packed, shape=q.shape, dtype=np.float16, absmax=q.absmax_f32()).dtype == "float16"


@pytest.mark.parametrize(
    "like, error, match",
    [
        ("float64", ValueError, r"dtype must be one of \('float32', 'float16', 'bfloat16'\) .*got 'float64'$"),
        (np.float64, ValueError, r"got <class 'numpy.float64'> \(float64\)"),
        (float, ValueError, r"got <class 'float'> \(float64\)"),
        (np.int8, ValueError, r"\(int8\)"),
        ("bfloat17", ValueError, "got 'bfloat17'"),
        (3, TypeError, "must be a dtype name"),
        (object(), TypeError, "must be a dtype name"),
    ],
)
def test_bad_dtype_likes_are_one_line_errors(like, error, match):
    q = Q.quantize_4bit(np.ones(64, np.float32))
    for call in (lambda: resolve_dtype(like), lambda: Q.dequantize_4bit(q, like)):
        with pytest.raises(error, match=match) as info:
            call()
        assert "\n" not in str(info.value)


def test_ml_dtypes_bfloat16_asked_for_comes_back_as_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.random.default_rng(0).standard_normal(200).astype(np.float32)
    q = Q.quantize_4bit(Q.f32_to_bf16(x), dtype="bfloat16")
    out = Q.dequantize_4bit(q, ml_dtypes.bfloat16)
    assert out.dtype == np.dtype(ml_dtypes.bfloat16) and output_dtype(ml_dtypes.bfloat16) == out.dtype
    assert np.array_equal(out.view(np.uint16), Q.dequantize_4bit(q))  # the same bits as the uint16 carrier
    assert Q.dequantize_4bit(q, "bfloat16").dtype == np.uint16  # a string still means bits
    assert same_state(Q.quantize_4bit(out), q)  # an ml_dtypes array is bf16 by its dtype: no dtype= needed


def test_uint16_without_dtype_is_refused():
    """A uint16 array is not read as bf16 bits unless dtype='bfloat16' says so."""
    bits = Q.f32_to_bf16(np.ones(64, np.float32))
    with pytest.raises(TypeError, match="pass dtype='bfloat16'"):
        Q.quantize_4bit(bits)
    assert Q.quantize_4bit(bits, dtype="bfloat16").dtype == "bfloat16"


# --- torch at the boundary (torch is never imported by qlora_ref) --------------------------------------------------


def test_torch_tensors_and_dtypes_are_read_without_casting():
    torch = pytest.importorskip("torch")
    x = torch.randn(48, 40, generator=torch.Generator().manual_seed(0))
    bf16 = x.to(torch.bfloat16)
    bits = bf16.view(torch.int16).numpy().view(np.uint16)
    q = Q.quantize_4bit(bf16)  # a bf16 tensor is accepted as bf16 (before: "unsupported ScalarType BFloat16")
    assert q.dtype == "bfloat16" and same_state(q, Q.quantize_4bit(bits, dtype="bfloat16"))
    assert same_state(Q.quantize_4bit(bits, dtype=torch.bfloat16), q)
    assert same_state(Q.quantize_4bit(x.requires_grad_()), Q.quantize_4bit(x.detach().numpy()))
    with pytest.raises(TypeError, match="input is bfloat16 but dtype='float16'"):
        Q.quantize_4bit(bf16, dtype=torch.float16)
    assert Q.dequantize_4bit(q, torch.float32).dtype == np.float32
    assert np.array_equal(Q.dequantize_4bit(q, torch.bfloat16), Q.dequantize_4bit(q))  # bf16 bits
    with pytest.raises(ValueError, match=r"got torch.float64 \(float64\)"):
        Q.dequantize_4bit(q, torch.float64)


def test_torch_state_dict_is_checked_not_cast():
    """FMT-5 with torch tensors: bitsandbytes' dtypes are read, a bf16 absmax is refused saying what was expected."""
    torch = pytest.importorskip("torch")
    q = Q.quantize_4bit(np.random.default_rng(1).standard_normal(640).astype(np.float32), double_quant=False)
    d = {k: torch.from_numpy(v.copy()) for k, v in q.to_bnb_state_dict().items()}
    assert same_state(Q.Quantized4bit.from_bnb_state_dict(d), q)
    d["weight.absmax"] = d["weight.absmax"].to(torch.bfloat16)
    with pytest.raises(ValueError, match="'weight.absmax' must be float32 .*got bfloat16"):
        Q.Quantized4bit.from_bnb_state_dict(d)


def test_float_quant_storage_is_read_as_bytes():
    """bitsandbytes' quant_storage (e.g. bfloat16 for FSDP) holds the same packed bytes in another dtype (FMT-5)."""
    torch = pytest.importorskip("torch")
    q = Q.quantize_4bit(np.random.default_rng(2).standard_normal(256).astype(np.float32))
    d = q.to_bnb_state_dict()
    d["weight"] = torch.from_numpy(d["weight"].ravel().copy()).view(torch.bfloat16).reshape(-1, 1)  # (64, 1) bf16
    assert same_state(Q.Quantized4bit.from_bnb_state_dict(d), q)


# --- FMT-5: the issue's corruptions, each by name ------------------------------------------------------------------


def _dq_and_plain():
    x = (np.random.default_rng(4).standard_normal((64, 130)) * 0.02).astype(np.float32)
    return Q.quantize_4bit(x).to_bnb_state_dict(), Q.quantize_4bit(x, double_quant=False).to_bnb_state_dict()


def _blob(meta) -> np.ndarray:
    raw = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    return np.frombuffer(raw, np.uint8).copy()


def test_the_issues_corruptions_are_refused():
    """Each corruption the issue lists (weights off by 1.37, 5.6, ... or NaN before) is one ValueError/TypeError
    that names the key and what was expected."""
    dq, plain = _dq_and_plain()
    blob = "weight.quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(dq[blob]).decode())
    a_hat = Q.Quantized4bit.from_bnb_state_dict(dq).absmax_f32()
    wide = dq["weight"].astype(np.int64)
    wide[0, 0] += 256
    cases = [
        ({**dq, "weight.absmax": a_hat}, ValueError, r"'weight.absmax' must be uint8 .*got float32"),
        ({**dq, "weight": wide}, ValueError, r"'weight' must be uint8 .*got int64 \(values \d+\.\.\d+"),
        ({**plain, "weight.absmax": dq["weight.absmax"]}, ValueError, r"'weight.absmax' must be float32 .*got uint8"),
        ({**dq, "weight.nested_absmax": dq["weight.nested_absmax"] * np.nan}, ValueError, "weight.nested_absmax must"),
        ({**dq, blob: _blob({**meta, "nested_offset": float("nan")})}, ValueError, "nested_offset must hold finite"),
        ({**plain, "weight.absmax": plain["weight.absmax"] + np.inf}, ValueError, "weight.absmax must hold finite"),
        ({**dq, blob: _blob({k: v for k, v in meta.items() if k != "shape"})}, ValueError, r"has no \['shape'\]"),
        ({**dq, blob: _blob(b"not json")}, ValueError, "is not UTF-8 JSON"),
        (list(dq.items()), TypeError, "a state dict maps keys to arrays .* got list"),
    ]
    for bad, error, match in cases:
        with pytest.raises(error, match=match) as info:
            Q.Quantized4bit.from_bnb_state_dict(bad)
        assert "\n" not in str(info.value)


def test_constructor_refuses_non_finite_or_negative_constants():
    """The same constants' rule in Quantized4bit itself: NaN decodes a whole block to NaN, a negative scale flips it."""
    q = Q.quantize_4bit(np.ones(128, np.float32))
    for field, value in (("nested_absmax", np.array([np.nan], np.float32)), ("offset", np.float32(-1.0))):
        with pytest.raises(ValueError, match=f"{field} must hold finite, non-negative"):
            Q.Quantized4bit(
                packed=q.packed,
                shape=q.shape,
                dtype=q.dtype,
                absmax_q=q.absmax_q,
                nested_absmax=value if field == "nested_absmax" else q.nested_absmax,
                offset=value if field == "offset" else q.offset,
            )
