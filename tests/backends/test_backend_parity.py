"""Every backend against the spec, one test per operation, written once (STYLE habit 9).

Each test runs on every backend (`BACKEND_PARAMS`): "numpy" in CI, "cupy" under the ``gpu`` marker (skipped cleanly
without CuPy and a GPU).  The spec, `qlora_ref`, computes the expected result on the host; the backend must give the
same BITS (agreement class "exact": codes, absmax, nested state, offsets, packing and single-rounding dequantization;
no tolerance anywhere in this file).  Inputs are adversarial (strategies below): all-zero blocks, values at the exact
decision thresholds of every codebook with a power-of-two absmax (so y = x * rcp(absmax) lands exactly on them),
±absmax ties, odd lengths, partial last blocks, every block size, huge and tiny (subnormal) magnitudes.
A failure prints a reproducer (the strategy's arguments) via hypothesis and `exc.add_note`.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qlora_ref
from backends import get_backend
from qlora_ref import testing
from qlora_ref.codebooks import QUANT_TYPES, dynamic_map

BACKEND_PARAMS = [pytest.param("numpy", id="numpy"), pytest.param("cupy", id="cupy", marks=pytest.mark.gpu)]
DTYPES = ("float32", "float16", "bfloat16")


@pytest.fixture(params=BACKEND_PARAMS, scope="module")
def be(request):
    return get_backend(request.param)


# --- moving arrays between the host and a backend ----------------------------------------------------------------


def to_backend(be, a):
    if be.device == "cpu":
        return a
    import cupy

    return cupy.asarray(a)


def host(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def bits(a) -> np.ndarray:
    """Bit patterns, so -0.0 != +0.0; NaNs are made one canonical NaN first (payloads are not part of the contract:
    numpy propagates an input NaN's payload where the GPU produces its own canonical NaN)."""
    a = np.array(host(a), copy=True)
    if a.dtype.kind == "f":
        a[np.isnan(a)] = np.nan
    a = np.ascontiguousarray(a)
    return a.view({4: np.uint32, 2: np.uint16, 1: np.uint8}[a.dtype.itemsize])


def assert_same_bits(got, want, what: str, repro: str) -> None:
    g, w = bits(got), bits(want)
    if g.shape != w.shape or not np.array_equal(g, w):
        bad = np.flatnonzero(g.ravel() != w.ravel()) if g.shape == w.shape else []
        msg = f"{what}: shapes {g.shape} vs {w.shape}, {len(bad)} differing; first: {bad[:5]}"
        if len(bad):
            msg += f" got {g.ravel()[bad[:5]]} want {w.ravel()[bad[:5]]}"
        err = AssertionError(msg)
        err.add_note(f"reproduce: {repro}")
        raise err


def quantized_to_backend(be, q: qlora_ref.Quantized4bit):
    if be.device == "cpu":
        return q
    from backends.cupy_backend.ops import DeviceQuantized4bit

    return DeviceQuantized4bit.from_host(q)


# --- inputs ---------------------------------------------------------------------------------------------------------
# The adversarial generators are the spec's own (qlora_ref.testing: all-zero blocks, exact thresholds with a
# power-of-two absmax, ties, huge / tiny / subnormal magnitudes, heavy tails, partial last blocks, odd lengths, every
# block size and dtype); failures carry its copy-pasteable reproducer.


def as_input(x32: np.ndarray, dtype: str) -> np.ndarray:
    """The spec's input form: float32 / float16 arrays, bf16 as uint16 bits."""
    if dtype == "float16":
        return x32.astype(np.float16)
    if dtype == "bfloat16":
        return qlora_ref.f32_to_bf16(x32)
    return x32


def _spec_or_error(fn, *args, **kwargs):
    """(result, None) or (None, the ValueError the spec raised): the backend must then raise the same."""
    try:
        return fn(*args, **kwargs), None
    except ValueError as exc:
        return None, exc


# --- quantize_4bit --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@given(data=st.data())
def test_quantize_4bit(be, quant_type, double_quant, data):
    """BW-1..BW-8, PK-1, PK-2, DQ-1, DQ-2: packed bytes, absmax / nested state and offset, bit for bit; where the spec
    refuses the input (a double-quant offset that overflows float32) the backend raises the same error."""
    x, dtype, blocksize = data.draw(testing.weights(quant_type=quant_type))
    kw = dict(quant_type=quant_type, blocksize=blocksize, double_quant=double_quant, dtype=dtype)
    with testing.failure_note(x, call=f"get_backend({be.name!r}).quantize_4bit", **kw):
        want, refused = _spec_or_error(qlora_ref.quantize_4bit, x, **kw)
        if refused is not None:
            with pytest.raises(type(refused)) as got_error:
                be.quantize_4bit(to_backend(be, x), **kw)
            assert str(got_error.value) == str(refused)
        else:
            got = be.quantize_4bit(to_backend(be, x), **kw)
            repro = f"quantize_4bit(x, **{kw}) with x of shape {x.shape}"
            assert isinstance(got, qlora_ref.Quantized4bit)
            assert (got.shape, got.dtype, got.nblocks) == (want.shape, want.dtype, want.nblocks)
            assert_same_bits(got.packed, want.packed, "packed", repro)
            if double_quant:
                assert_same_bits(got.absmax_q, want.absmax_q, "absmax_q", repro)
                assert_same_bits(got.nested_absmax, want.nested_absmax, "nested_absmax", repro)
                assert_same_bits(np.float32(got.offset), np.float32(want.offset), "offset", repro)
                assert_same_bits(got.absmax_f32(), want.absmax_f32(), "absmax_f32 (DQ-3)", repro)
            else:
                assert_same_bits(got.absmax, want.absmax, "absmax", repro)


@given(n=st.integers(1, 20_000), seed=st.integers(0, 2**32 - 1))
def test_double_quant_offset_tree(be, n, seed):
    """DQ-1: the offset's fixed summation tree at many lengths (lane counts 1..512, many rounds), bit for bit."""
    rng = np.random.default_rng(seed)
    blocksize = 32
    x = (rng.standard_normal(n * blocksize) * rng.uniform(1e-3, 1e3, n * blocksize)).astype(np.float32)
    want = qlora_ref.quantize_4bit(x, blocksize=blocksize)
    got = be.quantize_4bit(to_backend(be, x), blocksize=blocksize)
    repro = f"n_blocks={n} seed={seed}"
    assert_same_bits(np.float32(got.offset), np.float32(want.offset), "offset", repro)
    assert_same_bits(got.absmax_q, want.absmax_q, "absmax_q", repro)
    assert_same_bits(got.nested_absmax, want.nested_absmax, "nested_absmax", repro)


# --- dequantize_4bit ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("out_dtype", [None, *DTYPES])
@given(data=st.data())
def test_dequantize_4bit(be, out_dtype, data):
    """BW-7, BW-8, DQ-3: one float32 product (flushed), one rounding to the output dtype, bit for bit, for quantized
    weights and for arbitrary valid states (any codes, odd-tail fillers, FP4 -0, Int4's unused code 15)."""
    q = data.draw(testing.quantized_states())
    want = qlora_ref.dequantize_4bit(q, out_dtype)
    got = be.dequantize_4bit(quantized_to_backend(be, q), dtype=out_dtype)
    repro = f"dequantize_4bit({q.quant_type} {q.dtype} {q.shape} bs={q.blocksize} dq={q.double_quant}, {out_dtype})"
    assert tuple(got.shape) == q.shape
    assert_same_bits(got, want, "dequantized", repro)


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dequantize_4bit_into_out(be, out_dtype):
    """``out=`` receives the same bits and is returned; a wrong size or dtype is a clear error."""
    x = np.random.default_rng(0).standard_normal(3 * 64 + 5).astype(np.float32)
    q = qlora_ref.quantize_4bit(x)
    want = qlora_ref.dequantize_4bit(q, out_dtype)
    np_dtype = np.uint16 if out_dtype == "bfloat16" else np.dtype(out_dtype)
    out = to_backend(be, np.full(x.size, 0x7E, np_dtype))  # poisoned
    ret = be.dequantize_4bit(quantized_to_backend(be, q), out=out)
    assert ret is out
    assert_same_bits(out, want.ravel(), "out", f"dequantize_4bit(q, out={out_dtype}[{x.size}])")
    with pytest.raises(ValueError, match="elements"):
        be.dequantize_4bit(quantized_to_backend(be, q), out=to_backend(be, np.empty(x.size + 1, np_dtype)))
    other = "float32" if out_dtype != "float32" else "float16"
    with pytest.raises(TypeError, match="dtype"):
        be.dequantize_4bit(quantized_to_backend(be, q), dtype=other, out=out)


# --- 8-bit blockwise ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@given(data=st.data())
def test_blockwise_8bit(be, signed, data):
    """DQ-2, DQ-3: dynamic-map codes and absmax, then decoding, bit for bit; NaN/Inf refused with the spec's error."""
    code = dynamic_map(signed)
    x, _, blocksize = data.draw(testing.weights(dtype="float32", max_blocks=4))
    x32 = np.ascontiguousarray(x, np.float32).ravel()
    blocksize = data.draw(st.sampled_from([16, 64, 256, 100, blocksize]))
    if not signed:
        x32 = np.abs(x32)
    if data.draw(st.booleans()):  # midpoints of the map, exactly (absmax 1 after the 1.0 entry)
        mids = ((code[:-1] + code[1:]) * np.float32(0.5)).astype(np.float32)
        k = min(x32.size, 64)
        x32[:k] = np.random.default_rng(k).choice(mids, k)
        x32[0] = 1.0
    repro = f"quantize_blockwise_8bit(x n={x32.size}, dynamic_map({signed}), {blocksize})"
    if data.draw(st.integers(0, 4)) == 0:  # a non-finite value: both refuse, with the same message
        x32[data.draw(st.integers(0, x32.size - 1))] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        with pytest.raises(qlora_ref.NonFiniteError) as want_error:
            qlora_ref.quantize_blockwise_8bit(x32, code, blocksize)
        with pytest.raises(qlora_ref.NonFiniteError) as got_error:
            be.quantize_blockwise_8bit(to_backend(be, x32), to_backend(be, code), blocksize)
        assert str(got_error.value) == str(want_error.value), repro
    else:
        codes_w, absmax_w = qlora_ref.quantize_blockwise_8bit(x32, code, blocksize)
        codes_g, absmax_g = be.quantize_blockwise_8bit(to_backend(be, x32), to_backend(be, code), blocksize)
        assert_same_bits(codes_g, codes_w, "codes", repro)
        assert_same_bits(absmax_g, absmax_w, "absmax", repro)
        n = data.draw(st.integers(0, x32.size))
        want = qlora_ref.dequantize_blockwise_8bit(codes_w, absmax_w, code, blocksize, n)
        got = be.dequantize_blockwise_8bit(
            to_backend(be, codes_w), to_backend(be, absmax_w), to_backend(be, code), blocksize, n
        )
        assert_same_bits(got, want, "dequantized 8-bit", repro + f" then dequantize n={n}")


# --- packing --------------------------------------------------------------------------------------------------------


@given(n=st.integers(1, 5000), filler=st.integers(0, 15), seed=st.integers(0, 2**32 - 1))
def test_pack_unpack(be, n, filler, seed):
    """PK-1..PK-3: [a, b, c] -> [ab, c<filler>], and back."""
    codes = np.random.default_rng(seed).integers(0, 16, n).astype(np.uint8)
    packed = be.pack_4bit(to_backend(be, codes), filler)
    repro = f"pack_4bit(codes n={n} seed={seed}, filler={filler})"
    assert_same_bits(packed, qlora_ref.pack_4bit(codes, filler), "packed", repro)
    assert_same_bits(be.unpack_4bit(packed, n), codes, "unpacked", repro)


def test_pack_rejects_wide_codes(be):
    codes = np.array([1, 2, 17, 3], np.uint8)
    with pytest.raises(ValueError, match=r"codes must be 4-bit \(0..15\); found 17"):
        qlora_ref.pack_4bit(codes)
    with pytest.raises(ValueError, match=r"codes must be 4-bit \(0..15\); found 17"):
        be.pack_4bit(to_backend(be, codes))


# --- non-finite input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_same_error(be, dtype, bad):
    """BW-9: the backend raises NonFiniteError with the spec's message (count and first index), from check_finite and
    from quantize_4bit."""
    x = np.random.default_rng(1).standard_normal(5000).astype(np.float32)
    x[[4097, 123, 4999]] = bad
    xin = as_input(x, dtype)
    kw = dict(dtype="bfloat16") if dtype == "bfloat16" else {}
    with pytest.raises(qlora_ref.NonFiniteError) as want:
        qlora_ref.quantize_4bit(xin, **kw)
    with pytest.raises(qlora_ref.NonFiniteError) as got:
        be.quantize_4bit(to_backend(be, xin), **kw)
    assert str(got.value) == str(want.value)
    assert "3 non-finite" in str(got.value) and "index 123" in str(got.value)
    with pytest.raises(qlora_ref.NonFiniteError) as got_check:
        be.check_finite(to_backend(be, xin))
    assert str(got_check.value) == str(want.value)
    be.check_finite(to_backend(be, as_input(np.ones(7, np.float32), dtype)))  # finite: no error


# --- torch tensors at the boundary ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_tensors(be, dtype):
    """A torch tensor on the backend's device (bf16 native) gives the same bytes as the spec; out= a torch tensor."""
    torch = pytest.importorskip("torch")
    tdtype = getattr(torch, dtype)
    device = "cuda" if be.device == "cuda" else "cpu"
    w = (torch.randn(96, 130, generator=torch.Generator().manual_seed(3)) * 0.02).to(tdtype)
    x_spec = w.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else w.numpy()
    want = qlora_ref.quantize_4bit(x_spec, dtype=dtype)
    got = be.quantize_4bit(w.to(device))
    assert_same_bits(got.packed, want.packed, "packed", f"torch {dtype} (96, 130)")
    assert_same_bits(got.absmax_q, want.absmax_q, "absmax_q", f"torch {dtype} (96, 130)")
    wt = w.t()  # non-contiguous: quantized as its row-major copy, like the spec's ravel
    wt_spec = np.ascontiguousarray(x_spec.T)
    got_t = be.quantize_4bit(wt.to(device))
    assert_same_bits(got_t.packed, qlora_ref.quantize_4bit(wt_spec, dtype=dtype).packed, "packed (w.t())", "w.t()")
    out = torch.empty(96, 130, dtype=tdtype, device=device)
    assert be.dequantize_4bit(got, out=out) is out
    want_deq = qlora_ref.dequantize_4bit(want)
    got_deq = out.cpu().view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else out.cpu().numpy()
    assert_same_bits(got_deq, want_deq, "dequantized into torch out", f"torch {dtype} (96, 130)")


# --- GPU only: every kernel variant gives the same bits (STYLE habit 8) --------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("blocksize", qlora_ref.BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_kernel_variants_agree(blocksize, dtype):
    """v1 (naive oracle) and v2 (fast) kernels, every dequant chunking, aligned and unaligned pointers: same bits,
    on an input large enough to use many CTAs (and > 256 nested blocks)."""
    import cupy

    from backends.cupy_backend import ops

    n = 256 * blocksize * 3 + 37
    rng = np.random.default_rng(blocksize)
    x32 = (rng.standard_normal(n) * 0.02).astype(np.float32)
    x32[: blocksize * 2] = 0.0  # two all-zero blocks
    xin = as_input(x32, dtype)
    kw = dict(blocksize=blocksize, dtype="bfloat16" if dtype == "bfloat16" else None)
    want = qlora_ref.quantize_4bit(xin, **kw)
    xd = cupy.asarray(xin)
    for kernel in ("v1", "v2"):
        got = ops.quantize_4bit(xd, kernel=kernel, **kw)
        assert_same_bits(got.packed, want.packed, f"packed {kernel}", f"n={n} {kw}")
        assert_same_bits(got.absmax_q, want.absmax_q, f"absmax_q {kernel}", f"n={n} {kw}")
        assert_same_bits(got.nested_absmax, want.nested_absmax, f"nested {kernel}", f"n={n} {kw}")
    unaligned = cupy.empty(xd.size + 1, xd.dtype)[1:]  # 2 or 4 bytes off a 16-byte boundary
    unaligned[...] = xd
    assert_same_bits(ops.quantize_4bit(unaligned, **kw).packed, want.packed, "packed unaligned", f"n={n} {kw}")
    want_deq = qlora_ref.dequantize_4bit(want)
    for kernel in ("v1", "v2"):
        for chunks in ops.build.DEQUANT_CHUNKS:
            got = ops.dequantize_4bit(want, kernel=kernel, chunks=chunks)
            assert_same_bits(got, want_deq, f"dequant {kernel} chunks={chunks}", f"n={n} {kw}")
    x32[n // 2] = np.nan
    bad = cupy.asarray(as_input(x32, dtype))
    for kernel in ("v1", "v2"):
        with pytest.raises(qlora_ref.NonFiniteError, match=f"1 non-finite .* at flat index {n // 2}"):
            ops.check_finite(bad, kernel=kernel)
