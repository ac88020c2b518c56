"""The 4-bit decode matvec on every backend against the spec, bit for bit (specs/matvec.md MV-1 .. MV-5, MV-9).

The CuPy kernel (backends/cupy_backend/kernels/matvec_4bit.cu) sums in the spec's order (MV-4), so the agreement
class is "exact": the same bits as qlora_ref.matvec.matvec_4bit, for both kernels (v1, v2) and for every launch
configuration (STYLE habit 8).  A mismatch reports how far off it is against MV-8's any-order bound as well, which
says whether the order or the decode is wrong.  GPU tests carry the ``gpu`` marker (skipped cleanly without CuPy and a
GPU; run them with ``--hypothesis-profile=gpu``); the launch plans and the numpy backend's method run anywhere.
A failing example prints its case dict; `build(case)` rebuilds its arrays.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import qlora_ref
from backends import get_backend
from backends.cupy_backend import build as kernel_build
from backends.cupy_backend import launch
from qlora_ref import BLOCKSIZES, NonFiniteError, bf16_to_f32, f32_to_bf16, testing
from qlora_ref.codebooks import QUANT_TYPES
from qlora_ref.matvec import matvec_4bit, matvec_bound, matvec_f64, segments

gpu = pytest.mark.gpu

# --- cases -----------------------------------------------------------------------------------------------------------


@st.composite
def cases(draw, max_out: int = 40):
    """A case as a dict of small parameters: rows whose in is a multiple of the block size (every segment whole),
    one off it, or anything (partial first and last segments, rows of every phase), every block size, codebook,
    double quant on/off, 1..16 tokens, x float32 / bf16 with per-element scales 2^-40..2^30 (order-sensitive sums,
    subnormal products), weights at several scales with all-zero columns."""
    blocksize = draw(st.sampled_from(BLOCKSIZES))
    k = draw(st.integers(1, max(1, 1024 // blocksize)))
    in_f = draw(st.sampled_from([k * blocksize, k * blocksize + 8, max(1, k * blocksize - 1)]) | st.integers(1, 300))
    return dict(
        out_f=draw(st.integers(1, max_out)),
        in_f=in_f,
        T=draw(st.integers(1, 16)),
        blocksize=blocksize,
        quant_type=draw(st.sampled_from(QUANT_TYPES)),
        double_quant=draw(st.booleans()),
        x_dtype=draw(st.sampled_from(["float32", "bfloat16"])),
        out_dtype=draw(st.sampled_from(["bfloat16", "float32"])),
        w_scale=draw(st.sampled_from([1e-30, 1e-3, 1.0, 50.0])),
        x_exp=draw(st.sampled_from([(0, 1), (-20, 20), (-40, 30)])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def build(case: dict):
    """(x, q, dtype): x float32 or bf16 bits [T, in], q [out, in], dtype "bfloat16" for bf16 bits else None."""
    rng = np.random.default_rng(case["seed"])
    W = (rng.standard_normal((case["out_f"], case["in_f"])) * case["w_scale"]).astype(np.float32)
    W[:, rng.random(case["in_f"]) < 0.1] = 0.0
    q = qlora_ref.quantize_4bit(
        W, quant_type=case["quant_type"], blocksize=case["blocksize"], double_quant=case["double_quant"]
    )
    lo, hi = case["x_exp"]
    x = rng.standard_normal((case["T"], case["in_f"])) * 2.0 ** rng.integers(lo, hi, (case["T"], case["in_f"]))
    x = x.astype(np.float32)
    x[:, rng.random(case["in_f"]) < 0.05] = -0.0
    if case["x_dtype"] == "bfloat16":
        return f32_to_bf16(x), q, "bfloat16"
    return x, q, None


def bits(a) -> np.ndarray:
    """Bit patterns (float32 as uint32, bf16 bits as they are), every NaN made one canonical NaN (payloads are not
    part of the contract: a GPU makes its own)."""
    a = np.array(a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else a, copy=True)
    if a.dtype == np.float32:
        a[np.isnan(a)] = np.nan
        return a.view(np.uint32)
    a[np.isnan(bf16_to_f32(a))] = 0x7FC0
    return a


def assert_same_bits(got, want, x, q, dtype, out_dtype, repro: str) -> None:
    g, w = bits(got), bits(want)
    if g.shape == w.shape and np.array_equal(g, w):
        return
    msg = f"shapes {g.shape} vs {w.shape}"
    if g.shape == w.shape:
        bad = np.argwhere(g != w)
        y = g if out_dtype == "bfloat16" else g.view(np.float32)
        y64, _ = matvec_f64(x, q, dtype=dtype)
        bound = matvec_bound(x, q, y, dtype=dtype, out_dtype=out_dtype, any_order=True)
        y = bf16_to_f32(y) if out_dtype == "bfloat16" else y
        ratio = float((np.abs(y.astype(np.float64) - y64) / bound).max())
        msg = (
            f"{len(bad)} of {g.size} differ, first at {bad[:3].tolist()}; worst |y - y64| / any-order bound {ratio:.3g}"
        )
    err = AssertionError(msg)
    err.add_note(f"reproduce: {repro}")
    raise err


# --- the launch plans (plain integers: run anywhere) ------------------------------------------------------------------


@given(
    out_f=st.integers(1, 200_000),
    in_f=st.integers(1, 40_000),
    blocksize=st.sampled_from(BLOCKSIZES),
    T=st.integers(1, 16),
    sm_count=st.sampled_from([1, 16, 78, 132, 264]),
)
def test_v2_config_covers_every_row(out_f, in_f, blocksize, T, sm_count):
    """matvec_4bit_v2_config: a layout the kernel can run (lanes | threads, window <= blocksize, shared <= 48 KiB, TP
    >= T), and CTA g of phase class cls (blockIdx = g * classes + cls) holds rows cls + period * (g * ROWS + r):
    every row of every class is in one CTA (class 0, the largest, fills the groups), rows share a class's phase."""
    c = launch.matvec_4bit_v2_config(out_f, in_f, blocksize, T, sm_count)
    assert c == launch.matvec_4bit_v2_layout(out_f, in_f, blocksize, T, c.lanes, c.window, c.block[0])
    assert c.tokens in kernel_build.MATVEC_TOKENS and c.tokens >= T and c.tokens < 2 * T
    assert c.block[0] % c.lanes == 0 and 32 % c.lanes == 0 and 64 <= c.block[0] <= 256
    assert 32 <= c.window <= min(blocksize, 128) and c.shared_bytes <= launch.MATVEC_SHARED_MAX
    period = blocksize // math.gcd(in_f, blocksize)
    rows = c.block[0] // c.lanes
    assert c.period == period and c.classes == min(period, out_f) and c.grid[0] % c.classes == 0
    groups = c.grid[0] // c.classes
    assert (groups - 1) * rows * period < out_f <= groups * rows * period  # class 0 (the largest) fits, no spare CTA
    rng = np.random.default_rng(out_f + in_f)
    for o in rng.integers(0, out_f, 8):  # a row and its class's first row have one phase, so they share one tile
        cls = int(o) % period
        assert (int(o) * in_f) % blocksize == (cls * in_f) % blocksize


@given(out_f=st.integers(1, 12), in_f=st.integers(1, 300), blocksize=st.sampled_from(BLOCKSIZES[:4]))
def test_v2_segment_count_is_the_specs(out_f, in_f, blocksize):
    """The kernel's segments per row, C = (ph + in + bs - 1) >> log2(bs) with ph = (cls * in) % bs, and its segment of
    element j, (j + ph) >> log2(bs), are qlora_ref.matvec.segments' (MV-4)."""
    seg, _ = segments(out_f, in_f, blocksize)
    period = blocksize // math.gcd(in_f, blocksize)
    for o in range(out_f):
        ph = ((o % period) * in_f) % blocksize
        assert seg[o, -1] + 1 == (ph + in_f + blocksize - 1) // blocksize
        np.testing.assert_array_equal(seg[o], (np.arange(in_f) + ph) // blocksize)


def test_v2_layout_refuses_what_the_kernel_cannot_run():
    for lanes, window, threads in [(3, 32, 96), (64, 32, 256), (8, 256, 256), (8, 32, 300), (32, 32, 16)]:
        with pytest.raises(ValueError, match="no matvec_4bit_v2 launch"):
            launch.matvec_4bit_v2_layout(64, 640, 64, 4, lanes, window, threads)
    with pytest.raises(ValueError, match="no matvec_4bit_v2 launch"):
        launch.matvec_4bit_v2_layout(64, 640, 32, 4, 8, 64, 256)  # window past the block
    with pytest.raises(ValueError, match="no matvec_4bit_v2 launch"):
        launch.matvec_4bit_v2_layout(64, 640, 64, 17, 8, 32, 256)  # 17 tokens


def test_kernel_names_are_registered():
    names = kernel_build.NAME_EXPRESSIONS["matvec_4bit.cu"]
    for dq in ("false", "true"):
        assert f"matvec_4bit_v1<{dq}>" in names
        for tp in kernel_build.MATVEC_TOKENS:
            assert f"matvec_4bit_v2<{dq}, {tp}>" in names
            assert f"matvec_4bit_v3<{dq}, {tp}, {kernel_build.MATVEC_V3_CHUNKS[tp]}>" in names
            assert f"matvec_4bit_v3<{dq}, {tp}, {kernel_build.MATVEC_V3_CHUNKS_MANY_ROWS[tp]}>" in names
        for cpt, depth in kernel_build.MATVEC_V4_DEPTH.items():  # what matvec.py launches is compiled
            assert f"matvec_4bit_v4<{dq}, {cpt}, {depth}>" in names
            assert depth in kernel_build.MATVEC_V4_DEPTHS[cpt]


def test_v3_chunks_in_flight_follow_the_wave():
    """KU per row: the default while out / 4 warps fit 12 per multiprocessor, the many-rows table past that."""
    assert launch.matvec_4bit_v3_chunks(4096, 1, 132) == kernel_build.MATVEC_V3_CHUNKS[1]
    assert launch.matvec_4bit_v3_chunks(11008, 1, 132) == kernel_build.MATVEC_V3_CHUNKS_MANY_ROWS[1] == 1
    assert launch.matvec_4bit_v3_chunks(4 * 12 * 132, 3, 132) == kernel_build.MATVEC_V3_CHUNKS[4]
    assert launch.matvec_4bit_v3_chunks(4 * 12 * 132 + 1, 2, 132) == kernel_build.MATVEC_V3_CHUNKS_MANY_ROWS[2]


@pytest.mark.parametrize(
    ("kernel", "out_f", "in_f", "blocksize", "packed_aligned", "x_aligned", "tokens", "runs"),
    [
        ("v4", 4096, 4096, 64, True, True, 1, "v4"),
        ("v4", 11008, 4096, 64, True, True, 1, "v4"),  # the most weights it takes
        ("v4", 4096, 11008, 64, True, True, 1, "v4"),
        ("v4", 8192, 8192, 64, True, True, 1, "v3"),  # many rows: v3 measured faster
        ("v4", 32000, 4096, 64, True, True, 1, "v3"),
        ("v4", 16, 2048, 32, True, True, 1, "v4"),  # the fewest chunks it takes (64)
        ("v4", 16, 32768, 64, True, True, 1, "v4"),  # the most (1024: CPT 2 x 512 threads)
        ("v4", 16, 2016, 64, True, True, 1, "v3"),  # 63 chunks: most lanes would idle
        ("v4", 16, 32800, 64, True, True, 1, "v3"),  # 1025 chunks
        ("v4", 16, 4096, 64, True, True, 2, "v3"),  # v4 is one token's kernel
        ("v4", 16, 4104, 64, True, True, 1, "v2"),
        ("v4", 16, 4096, 64, True, False, 1, "v2"),
        ("v4", 16, 4096, 64, False, True, 1, "v1"),
        ("v3", 16, 4096, 64, True, True, 1, "v3"),
        ("v3", 16, 4096, 32, True, True, 3, "v3"),
        ("v3", 16, 4104, 64, True, True, 1, "v2"),  # in % 32 != 0: a chunk would straddle rows
        ("v3", 16, 4096, 64, True, False, 1, "v2"),  # x off 16 bytes
        ("v3", 16, 4096, 64, False, True, 1, "v1"),  # codes off 16 bytes
        ("v2", 16, 4096, 64, True, True, 1, "v2"),
        ("v2", 16, 4096, 64, False, True, 1, "v1"),
        ("v1", 16, 4096, 64, True, True, 1, "v1"),
    ],
)
def test_the_kernel_that_runs(kernel, out_f, in_f, blocksize, packed_aligned, x_aligned, tokens, runs):
    assert launch.matvec_kernel(kernel, out_f, in_f, blocksize, packed_aligned, x_aligned, tokens) == runs


@given(
    out_f=st.integers(1, 200_000),
    chunks=st.integers(launch.MATVEC_V4_MIN_CHUNKS, launch.MATVEC_V4_MAX_CHUNKS),
    sm_count=st.integers(1, 200),
    per_sm=st.integers(0, 32),
)
def test_v4_config_covers_every_row_once(out_f, chunks, sm_count, per_sm):
    """Every chunk has a thread, every CTA at least one row, the rows of all CTAs partition out, and the row sums fit
    the shared memory the launch asks for, within MATVEC_SHARED_MAX."""
    in_f = 32 * chunks
    c = launch.matvec_4bit_v4_config(out_f, in_f, sm_count, per_sm)
    (ctas,), (threads,) = c.grid, c.block
    assert threads % 32 == 0 and threads <= launch.MATVEC_V4_MAX_THREADS and c.chunks in launch.MATVEC_V4_CPT
    assert c.chunks * threads >= chunks > c.chunks * (threads - 32)  # every chunk a thread, no warp idle
    assert c.chunks == 1 or 32 * math.ceil(chunks / 32) > launch.MATVEC_V4_MAX_THREADS  # the fewest per thread
    assert 1 <= ctas <= out_f
    starts = [b * out_f // ctas for b in range(ctas + 1)]
    rows = [starts[b + 1] - starts[b] for b in range(ctas)]
    assert sum(rows) == out_f and min(rows) >= 1
    assert 4 * (272 + max(rows) * threads) <= c.shared_bytes <= launch.MATVEC_SHARED_MAX
    wave = min(out_f, sm_count * max(1, per_sm))
    if 4 * (272 + math.ceil(out_f / wave) * threads) <= launch.MATVEC_SHARED_MAX:
        assert ctas == wave  # one wave of what the multiprocessors hold, unless the row sums would not fit


def test_v3_grid_covers_every_row():
    for out_f in (1, 15, 16, 17, 4096, 11008):
        (grid,), (threads,) = launch.matvec_4bit_v3_config(out_f)
        rows = grid * (threads // 32) * launch.MATVEC_V3_ROWS
        assert out_f <= rows < out_f + (threads // 32) * launch.MATVEC_V3_ROWS


# --- the numpy backend's method (runs anywhere) ----------------------------------------------------------------------


@given(cases(max_out=6))
def test_numpy_backend_is_the_spec(case):
    """The numpy backend's matvec_4bit is qlora_ref.matvec.matvec_4bit: the same bits, also through out=."""
    x, q, dtype = build(case)
    be = get_backend("numpy")
    want = matvec_4bit(x, q, dtype=dtype, out_dtype=case["out_dtype"])
    got = be.matvec_4bit(x, q, dtype=dtype, out_dtype=case["out_dtype"])
    assert_same_bits(got, want, x, q, dtype, case["out_dtype"], f"numpy backend, case {case}")
    out = np.full(want.shape, 0x7FC1 if want.dtype == np.uint16 else np.nan, want.dtype)
    assert be.matvec_4bit(x, q, dtype=dtype, out=out) is out  # out_dtype from out's dtype
    assert_same_bits(out, want, x, q, dtype, case["out_dtype"], f"numpy backend out=, case {case}")


def test_numpy_backend_torch_forms_and_errors():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    q = qlora_ref.quantize_4bit(rng.standard_normal((5, 70)).astype(np.float32), blocksize=32)
    x32 = rng.standard_normal((3, 70)).astype(np.float32)
    be = get_backend("numpy")
    want = matvec_4bit(f32_to_bf16(x32), q, dtype="bfloat16")
    np.testing.assert_array_equal(be.matvec_4bit(torch.from_numpy(x32).bfloat16(), q), want)
    np.testing.assert_array_equal(be.matvec_4bit(f32_to_bf16(x32)[1], q, dtype="bfloat16"), want[1])  # one token
    out = torch.zeros((3, 5), dtype=torch.bfloat16)
    assert be.matvec_4bit(torch.from_numpy(x32).bfloat16(), q, out=out) is out
    np.testing.assert_array_equal(out.view(torch.int16).numpy().view(np.uint16), want)
    with pytest.raises(TypeError, match="out has dtype bfloat16 but the result is float32"):
        be.matvec_4bit(x32, q, out_dtype="float32", out=out)
    with pytest.raises(ValueError, match="out has 14 elements"):
        be.matvec_4bit(x32, q, out=np.zeros(14, np.float32))
    with pytest.raises(ValueError, match="contiguous"):
        be.matvec_4bit(x32, q, out=np.zeros((5, 3), np.float32).T)
    with pytest.raises(ValueError, match="1..16 tokens"):
        be.matvec_4bit(np.ones((17, 70), np.float32), q)
    with pytest.raises(TypeError, match="float16"):
        be.matvec_4bit(x32.astype(np.float16), q)
    np.testing.assert_array_equal(be.matvec_4bit(x32, q, order="any"), matvec_4bit(x32, q))  # the spec's order is one
    with pytest.raises(ValueError, match="order must be one of"):
        be.matvec_4bit(x32, q, order="fast")


# --- the GPU kernel --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cupy_mv():
    from backends.cupy_backend import matvec

    return matvec


def to_gpu(case_x):
    import cupy

    return cupy.asarray(case_x)


@gpu
@pytest.mark.parametrize("kernel", ["v2", "v1"])
@given(case=cases())
def test_gpu_same_bits_as_spec(cupy_mv, kernel, case):
    """MV-1 .. MV-5: both kernels give the spec's bits (shapes with partial segments, every phase, every block size,
    codebook, double quant, token count, x and y dtype)."""
    from backends.cupy_backend.quantized import DeviceQuantized4bit

    x, q, dtype = build(case)
    want = matvec_4bit(x, q, dtype=dtype, out_dtype=case["out_dtype"])
    got = cupy_mv.matvec_4bit(
        to_gpu(x), DeviceQuantized4bit.from_host(q), dtype=dtype, out_dtype=case["out_dtype"], kernel=kernel
    )
    assert tuple(got.shape) == want.shape and got.dtype == want.dtype
    assert_same_bits(got, want, x, q, dtype, case["out_dtype"], f"kernel={kernel}, case {case}; build(case)")


def assert_within_any_order_bound(got, x, q, dtype, out_dtype, repro: str) -> None:
    """MV-8 with any_order=True: |y - y64| <= the bound of any summation tree (k = in), element by element."""
    y = bits(got)
    y = y if out_dtype == "bfloat16" else y.view(np.float32)
    y64, _ = matvec_f64(x, q, dtype=dtype)
    bound = matvec_bound(x, q, y, dtype=dtype, out_dtype=out_dtype, any_order=True)
    yf = bf16_to_f32(y) if out_dtype == "bfloat16" else y
    err = np.abs(yf.astype(np.float64) - y64)
    if not (err <= bound).all():
        bad = np.argwhere(err > bound)
        e = AssertionError(
            f"{len(bad)} of {err.size} past the any-order bound, worst {float((err / bound).max()):.3g}x"
        )
        e.add_note(f"reproduce: {repro}")
        raise e


@gpu
@given(case=cases())
def test_gpu_v3_within_the_any_order_bound(cupy_mv, case):
    """matvec_4bit_v3 (FMA, a lane tree: not the spec's order) is within MV-8's any-order bound on every case; where
    it cannot run (in % 32 != 0) v2 serves the call with the spec's bits."""
    from backends.cupy_backend.quantized import DeviceQuantized4bit

    x, q, dtype = build(case)
    got = cupy_mv.matvec_4bit(
        to_gpu(x), DeviceQuantized4bit.from_host(q), dtype=dtype, out_dtype=case["out_dtype"], kernel="v3"
    )
    repro = f"kernel=v3, case {case}; build(case)"
    if case["in_f"] % 32:
        want = matvec_4bit(x, q, dtype=dtype, out_dtype=case["out_dtype"])
        assert_same_bits(got, want, x, q, dtype, case["out_dtype"], repro)
    else:
        assert_within_any_order_bound(got, x, q, dtype, case["out_dtype"], repro)


@st.composite
def one_token_cases(draw):
    """Cases matvec_4bit_v4 runs: one token, in = 32 * (64 .. 1024) chunks, a block size of 32 or more, the scales of
    `cases` plus weights near float32's smallest normals (absmax under 2^-100: the chunks that keep the spec's
    flushed decode)."""
    case = draw(cases(max_out=40))
    chunks = draw(st.sampled_from([64, 128, 344, 1024]) | st.integers(64, 1024))
    case.update(
        T=1,
        in_f=32 * chunks,
        blocksize=draw(st.sampled_from([b for b in BLOCKSIZES if b >= 32])),
        w_scale=draw(st.sampled_from([1e-38, 1e-30, 1e-3, 1.0, 50.0])),
    )
    return case


@gpu
@given(case=one_token_cases())
def test_gpu_v4_within_the_any_order_bound(cupy_mv, case):
    """matvec_4bit_v4 (one token: x in registers, the absmax taken out of each chunk's sum) is within MV-8's
    any-order bound on every case, both codebooks, double quant on and off, bf16 and float32 x and y."""
    from backends.cupy_backend.quantized import DeviceQuantized4bit

    x, q, dtype = build(case)
    qd = DeviceQuantized4bit.from_host(q)
    assert (
        launch.matvec_kernel(
            "v4", case["out_f"], case["in_f"], case["blocksize"], qd.packed.data.ptr % 16 == 0, True, 1
        )
        == "v4"
    )
    got = cupy_mv.matvec_4bit(to_gpu(x), qd, dtype=dtype, out_dtype=case["out_dtype"], kernel="v4")
    assert_within_any_order_bound(got, x, q, dtype, case["out_dtype"], f"kernel=v4, case {case}; build(case)")


@gpu
@pytest.mark.parametrize("T", [1, 2, 4, 7, 16])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize(
    "shape",
    [(4096, 4096), (1027, 11008), (96, 576), (6400, 64)],
    ids=["4096x4096", "1027x11008", "96x576", "6400x64-many-rows"],  # the last: past one wave, the KU of many rows
)
def test_gpu_v3_llama_shapes_and_the_backend_order(cupy_mv, T, double_quant, shape):
    """The serving shapes (rows not a multiple of the 16 a CTA holds, too) through the backend's order="any" (v4 for
    one token where it runs, else v3): within MV-8's any-order bound, and not the spec's bits everywhere (so v3 or v4,
    not v2, ran: FMA keeps low bits)."""
    rng = np.random.default_rng(T)
    q = qlora_ref.quantize_4bit((rng.standard_normal(shape) * 0.02).astype(np.float32), double_quant=double_quant)
    x = rng.standard_normal((T, shape[1])).astype(np.float32)
    got = get_backend("cupy").matvec_4bit(to_gpu(x), q, out_dtype="float32", order="any", check_finite=False)
    assert_within_any_order_bound(got, x, q, None, "float32", f"shape={shape} T={T} dq={double_quant}")
    want = matvec_4bit(x, q, out_dtype="float32")
    assert not np.array_equal(bits(got), bits(want))


@gpu
@pytest.mark.parametrize("out_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("kernel", ["v2", "v1"])
def test_gpu_subnormal_products_are_kept(cupy_mv, kernel, out_dtype):
    """MV-3's float32 product keeps gradual underflow: x = -3.1e-11 times w = 3.5e-31 is the subnormal -1.08e-41
    (bits 0x80001e1c), and its sign survives into the bf16 -0 of y (found by hypothesis on an H200, when CuPy's own
    compile path appended -ftz=true to the kernels' options and flushed it to -0, so y came out +0)."""
    case = dict(out_f=1, in_f=1, T=5, blocksize=32, quant_type="nf4", double_quant=False, x_dtype="float32",
                out_dtype=out_dtype, w_scale=1e-30, x_exp=(-40, 30), seed=1)  # fmt: skip
    x, q, dtype = build(case)
    want = matvec_4bit(x, q, dtype=dtype, out_dtype=out_dtype)
    assert int(bits(want)[4, 0]) == (0x8000 if out_dtype == "bfloat16" else 0x80001E1C)  # the spec keeps it
    got = cupy_mv.matvec_4bit(to_gpu(x), q, dtype=dtype, out_dtype=out_dtype, kernel=kernel)
    assert_same_bits(got, want, x, q, dtype, out_dtype, f"kernel={kernel}, case {case}")


@gpu
@given(case=cases(max_out=24), data=st.data())
def test_gpu_every_launch_layout_same_bits(cupy_mv, case, data):
    """STYLE 8: lanes per row, window, threads per CTA (any layout the kernel accepts) give the same bits."""
    x, q, dtype = build(case)
    lanes = data.draw(st.sampled_from([1, 2, 4, 8, 16, 32]))
    window = data.draw(st.sampled_from([w for w in (32, 64, 128) if w <= case["blocksize"]]))
    threads = data.draw(st.sampled_from([t for t in (32, 64, 128, 256) if t >= lanes]))
    try:
        config = launch.matvec_4bit_v2_layout(q.shape[0], q.shape[1], q.blocksize, case["T"], lanes, window, threads)
    except ValueError:  # past 48 KiB of shared memory
        assume(False)
    want = matvec_4bit(x, q, dtype=dtype, out_dtype=case["out_dtype"])
    got = cupy_mv.matvec_4bit(to_gpu(x), q, dtype=dtype, out_dtype=case["out_dtype"], config=config)
    assert_same_bits(got, want, x, q, dtype, case["out_dtype"], f"config={config}, case {case}")


@gpu
@given(state=testing.quantized_states(source=("random",), max_blocks=6), data=st.data())
def test_gpu_arbitrary_states(cupy_mv, state, data):
    """Any valid state (any codes, FP4 -0, odd tails with any filler, random absmax / nested constants) viewed as
    [out, in] for every factorisation out * in = n: the spec's bits."""
    n = state.n
    out_f = data.draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]))
    q = dataclasses.replace(state, shape=(out_f, n // out_f))
    T = data.draw(st.integers(1, 16))
    x = f32_to_bf16(np.random.default_rng(T).standard_normal((T, n // out_f)).astype(np.float32))
    for out_dtype in ("float32", "bfloat16"):
        want = matvec_4bit(x, q, dtype="bfloat16", out_dtype=out_dtype)
        for kernel in ("v2", "v1"):
            got = cupy_mv.matvec_4bit(to_gpu(x), q, dtype="bfloat16", out_dtype=out_dtype, kernel=kernel)
            repro = f"{kernel} {q.quant_type} dq={q.double_quant} bs={q.blocksize} shape={q.shape} T={T} {out_dtype}"
            assert_same_bits(got, want, x, q, "bfloat16", out_dtype, repro)


@gpu
@pytest.mark.parametrize("T", [1, 3, 16])
@pytest.mark.parametrize(
    "shape,blocksize",
    [((4096, 4096), 64), ((1024, 11008), 64), ((512, 4096), 4096)],
    ids=["4096x4096", "1024x11008", "512x4096-bs4096"],
)
def test_gpu_llama_shapes(cupy_mv, T, shape, blocksize):
    """The serving shapes (LLaMA projections, NF4, double quant, bf16 in and out): the spec's bits."""
    rng = np.random.default_rng(T)
    q = qlora_ref.quantize_4bit((rng.standard_normal(shape) * 0.02).astype(np.float32), blocksize=blocksize)
    x = f32_to_bf16(rng.standard_normal((T, shape[1])).astype(np.float32))
    want = matvec_4bit(x, q, dtype="bfloat16")
    got = cupy_mv.matvec_4bit(to_gpu(x), q, dtype="bfloat16")
    assert_same_bits(got, want, x, q, "bfloat16", "bfloat16", f"shape={shape} bs={blocksize} T={T}")


def ones_q(in_f: int, blocksize: int) -> qlora_ref.Quantized4bit:
    return qlora_ref.quantize_4bit(np.ones((1, in_f), np.float32), blocksize=blocksize, double_quant=False)


@gpu
@pytest.mark.parametrize("kernel", ["v2", "v1"])
def test_gpu_order_by_hand(cupy_mv, kernel):
    """MV-4 (tests/spec/test_matvec.py's hand cases): ((1 + t) + t) = 1 within one segment; 1 + 2t across two; and
    the MV-3 products are not contracted (a fused x * w + s would keep the low bits)."""
    t = np.float32(2.0**-24)
    got = cupy_mv.matvec_4bit(
        to_gpu(np.array([[1.0, t, t]], np.float32)), ones_q(3, 32), out_dtype="float32", kernel=kernel
    )
    assert float(got.get()[0, 0]) == 1.0
    x = np.zeros((1, 64), np.float32)
    x[0, 0], x[0, 32], x[0, 33] = 1.0, t, t
    got = cupy_mv.matvec_4bit(to_gpu(x), ones_q(64, 32), out_dtype="float32", kernel=kernel)
    assert float(got.get()[0, 0]) == 1.0 + 2.0**-23
    # x = 1 + 2^-12 twice times w = 1 + ...: products need more than 24 bits, so an FMA would round differently
    w = np.full((1, 64), 1.0, np.float32)
    q = qlora_ref.quantize_4bit(w * np.float32(0.7), blocksize=64, double_quant=False)
    xx = np.full((1, 64), 1.0 + 2.0**-12, np.float32) * (1.0 + np.arange(64, dtype=np.float32) * 2.0**-20)
    xx = xx.astype(np.float32)
    want = matvec_4bit(xx, q, out_dtype="float32")
    got = cupy_mv.matvec_4bit(to_gpu(xx), q, out_dtype="float32", kernel=kernel)
    np.testing.assert_array_equal(bits(got), bits(want))


@gpu
def test_gpu_torch_tensors_and_out(cupy_mv):
    """MV-1: torch CUDA bf16 / f32 x (zero-copy, non-contiguous too), a 1-D token, out= a torch bf16 / f32 tensor or
    a CuPy array (written and returned); the backend method is the same function."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    import cupy

    rng = np.random.default_rng(11)
    q_host = qlora_ref.quantize_4bit(rng.standard_normal((40, 200)).astype(np.float32), blocksize=64)
    q = get_backend("cupy").to_device(q_host)
    x32 = rng.standard_normal((5, 200)).astype(np.float32)
    want_bf = matvec_4bit(f32_to_bf16(x32), q_host, dtype="bfloat16")
    want_f32 = matvec_4bit(x32, q_host, out_dtype="float32")
    xt = torch.from_numpy(x32).cuda()
    np.testing.assert_array_equal(bits(cupy_mv.matvec_4bit(xt.bfloat16(), q)), want_bf)
    np.testing.assert_array_equal(bits(cupy_mv.matvec_4bit(xt, q, out_dtype="float32")), bits(want_f32))
    xt_nc = torch.from_numpy(np.ascontiguousarray(x32.T)).cuda().T  # non-contiguous view of the same values
    np.testing.assert_array_equal(bits(cupy_mv.matvec_4bit(xt_nc, q, out_dtype="float32")), bits(want_f32))
    one = cupy_mv.matvec_4bit(xt.bfloat16()[2], q)
    assert tuple(one.shape) == (40,)
    np.testing.assert_array_equal(bits(one), want_bf[2])
    out = torch.full((5, 40), 7.0, dtype=torch.bfloat16, device="cuda")
    assert cupy_mv.matvec_4bit(xt.bfloat16(), q, out=out) is out
    torch.cuda.synchronize()
    np.testing.assert_array_equal(out.cpu().view(torch.int16).numpy().view(np.uint16), want_bf)
    out32 = cupy.full((5, 40), np.nan, cupy.float32)
    assert get_backend("cupy").matvec_4bit(cupy.asarray(x32), q, out=out32) is out32
    np.testing.assert_array_equal(bits(out32), bits(want_f32))


@gpu
def test_gpu_unaligned_packed_takes_v1(cupy_mv):
    """A packed buffer off 16-byte alignment (a view) is served by v1: the same bits."""
    import cupy

    from backends.cupy_backend.quantized import DeviceQuantized4bit

    rng = np.random.default_rng(12)
    q_host = qlora_ref.quantize_4bit(rng.standard_normal((9, 130)).astype(np.float32), blocksize=32)
    qd = DeviceQuantized4bit.from_host(q_host)
    buf = cupy.zeros(qd.packed.size + 1, cupy.uint8)
    buf[1:] = qd.packed
    q_off = dataclasses.replace(qd, packed=buf[1:])
    assert q_off.packed.data.ptr % 16 != 0
    x = rng.standard_normal((4, 130)).astype(np.float32)
    np.testing.assert_array_equal(bits(cupy_mv.matvec_4bit(to_gpu(x), q_off)), matvec_4bit(x, q_host))


@gpu
def test_gpu_bad_inputs(cupy_mv):
    """MV-9 at the GPU boundary: one clear error for each wrong input, before any launch."""
    import cupy

    from backends.cupy_backend.finite import FiniteFlag

    rng = np.random.default_rng(13)
    q = qlora_ref.quantize_4bit(rng.standard_normal((3, 40)).astype(np.float32))
    x = cupy.ones((2, 40), cupy.float32)
    mv = cupy_mv.matvec_4bit
    with pytest.raises(ValueError, match="1..16 tokens"):
        mv(cupy.ones((17, 40), cupy.float32), q)
    with pytest.raises(ValueError, match=r"x must be \[T, 40\]"):
        mv(cupy.ones((2, 41), cupy.float32), q)
    with pytest.raises(ValueError, match=r"x must be \[T, 40\]"):
        mv(cupy.ones((1, 2, 40), cupy.float32), q)
    with pytest.raises(ValueError, match="2-D"):
        mv(x[0], qlora_ref.quantize_4bit(np.ones(40, np.float32)))
    with pytest.raises(ValueError, match="out_dtype"):
        mv(x, q, out_dtype="float16")
    with pytest.raises(TypeError, match="float16"):
        mv(x.astype(cupy.float16), q)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        mv(x.astype(cupy.float64), q)
    with pytest.raises(TypeError, match="numpy array"):
        mv(np.ones((2, 40), np.float32), q)
    with pytest.raises(NonFiniteError):
        mv(cupy.full((1, 40), cupy.nan, cupy.float32), q)
    flag = FiniteFlag()
    mv(cupy.full((1, 40), cupy.inf, cupy.float32), q, flag=flag)  # queued, not raised
    assert flag.count() == 40
    with pytest.raises(ValueError, match="out has 5 elements"):
        mv(x, q, out=cupy.empty(5, cupy.uint16))
    with pytest.raises(TypeError, match="out has dtype float32 but the result is bfloat16"):
        mv(x, q, out_dtype="bfloat16", out=cupy.empty((2, 3), cupy.float32))
    with pytest.raises(ValueError, match="contiguous"):
        mv(x, q, out=cupy.empty((3, 2), cupy.uint16).T)
    with pytest.raises(TypeError, match="out must be a CuPy array"):
        mv(x, q, out=np.empty((2, 3), np.uint16))
    with pytest.raises(ValueError, match="kernel"):
        mv(x, q, kernel="v5")
    other = launch.matvec_4bit_v2_layout(3, 40, 64, 4, 8, 32, 64)
    with pytest.raises(ValueError, match="does not fit"):
        mv(x, q, config=other)  # built for 4 tokens, called with 2
