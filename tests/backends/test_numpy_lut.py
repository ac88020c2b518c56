"""The numpy backend's table-driven dequantization (backends/numpy_lut.py) against the spec, bit for bit.

BW-7, BW-8, DQ-3: the float32 product table[code] * absmax (flushed if subnormal), then one rounding to the output
dtype.  The states are the spec's adversarial ones (qlora_ref.testing.quantized_states: quantized weights and
arbitrary valid fields, odd lengths, partial last blocks, every block size and codebook); buffers are exactly n long
(and longer: the elements past n must stay untouched).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qlora_ref
from backends import get_backend
from backends.numpy_lut import dequantize_4bit_cpu, release_scratch
from qlora_ref import testing

DTYPES = ("float32", "float16", "bfloat16")


def _np_dtype(name: str):
    return np.uint16 if name == "bfloat16" else np.dtype(name)


def _bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view({4: np.uint32, 2: np.uint16}[a.dtype.itemsize])


@given(q=testing.quantized_states(), extra=st.integers(0, 5))
def test_cpu_lut_float32_bit_identical(q, extra):
    """out32 of n (+ extra) elements: the first n are the spec's float32 bits, the rest untouched."""
    want = qlora_ref.dequantize_4bit(q, "float32").ravel()
    out = np.full(q.n + extra, 7.0, np.float32)
    got = dequantize_4bit_cpu(q, out)
    assert got.shape == (q.n,)
    np.testing.assert_array_equal(_bits(got), _bits(want))
    np.testing.assert_array_equal(out[q.n :], np.float32(7.0))


@pytest.mark.parametrize("dtype", DTYPES)
@given(q=testing.quantized_states())
def test_numpy_backend_out_bit_identical(dtype, q):
    """dequantize_4bit(q, out=numpy array) and its bound launch: the spec's bits in every output dtype."""
    be = get_backend("numpy")
    want = qlora_ref.dequantize_4bit(q, dtype).ravel()
    out = np.full(q.n, 0x7E, _np_dtype(dtype))
    assert be.dequantize_4bit(q, out=out) is out
    np.testing.assert_array_equal(_bits(out), _bits(want))
    out[...] = 0x7E
    launch = be.bind_dequantize_4bit(q, out)
    assert launch() is None
    np.testing.assert_array_equal(_bits(out), _bits(want))


@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_backend_torch_out(dtype):
    """out= a torch CPU tensor (2-D, the layer's scratch shape): the spec's bits, bound or not; the scratch can go."""
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(5).standard_normal((37, 70)).astype(np.float32)
    q = qlora_ref.quantize_4bit(x, blocksize=64)
    want = qlora_ref.dequantize_4bit(q, dtype)
    be = get_backend("numpy")
    out = torch.full(q.shape, 3.0, dtype=getattr(torch, dtype))
    assert be.dequantize_4bit(q, out=out) is out
    got = out.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else out.numpy()
    np.testing.assert_array_equal(_bits(got), _bits(want))
    out.fill_(3.0)
    release_scratch()
    be.bind_dequantize_4bit(q, out)()
    np.testing.assert_array_equal(_bits(got), _bits(want))


def test_numpy_bind_checks_once():
    """Binding refuses what dequantize_4bit refuses: wrong size, non-contiguous, unsupported dtype, not a state."""
    be = get_backend("numpy")
    q = qlora_ref.quantize_4bit(np.ones(128, np.float32))
    with pytest.raises(ValueError, match="elements"):
        be.bind_dequantize_4bit(q, np.empty(127, np.float32))
    with pytest.raises(ValueError, match="contiguous"):
        be.bind_dequantize_4bit(q, np.empty(256, np.float32)[::2])
    with pytest.raises(TypeError, match="dtype"):
        be.bind_dequantize_4bit(q, np.empty(128, np.float64))
    with pytest.raises(TypeError, match="Quantized4bit"):
        be.bind_dequantize_4bit(np.ones(128, np.float32), np.empty(128, np.float32))
    with pytest.raises(ValueError, match="out32"):
        dequantize_4bit_cpu(q, np.empty(100, np.float32))
