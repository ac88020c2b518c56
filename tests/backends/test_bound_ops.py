"""The lean seams of the backend protocol: bind_dequantize_4bit, bind_matvec_4bit, the deferred non-finite flag,
to_host / to_device, placement, and the torch <-> array bridge.  Every backend (numpy in CI, cupy under the ``gpu``
marker).

bind_dequantize_4bit(q, out)() must write exactly the bytes dequantize_4bit(q, out=out) writes (BW-7, DQ-3), for every
output dtype and for torch and array buffers; on CUDA a launch captured in a torch.cuda.CUDAGraph and replayed must
write them too (no allocation, no synchronisation, torch's capture stream followed).  bind_matvec_4bit(q, T)(x, y)
must write the bits matvec_4bit(x, q, out=y) writes, in both orders, the spec's order being the spec's bits.
"""

from __future__ import annotations

import numpy as np
import pytest

import qlora_ref
from backends import BACKENDS, bridge, get_backend, placement

BACKEND_PARAMS = [pytest.param("numpy", id="numpy"), pytest.param("cupy", id="cupy", marks=pytest.mark.gpu)]
DTYPES = ("float32", "float16", "bfloat16")
SHAPES = [(96, 130), (7, 13), (1, 1), (33, 4097)]  # odd n, partial blocks, > 256 nested blocks


@pytest.fixture(params=BACKEND_PARAMS, scope="module")
def be(request):
    return get_backend(request.param)


def _state(shape, double_quant=True, quant_type="nf4", blocksize=64, seed=0):
    x = (np.random.default_rng(seed).standard_normal(shape) * 0.02).astype(np.float32)
    return qlora_ref.quantize_4bit(x, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)


def _torch_bits(t) -> np.ndarray:
    import torch

    t = t.detach().cpu().contiguous()
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32).numpy().ravel()


def _input(be, x32: np.ndarray, dtype: str):
    """x32 in the spec's input form (bf16 as uint16 bits), on the backend's device."""
    x = x32.astype(np.float16) if dtype == "float16" else qlora_ref.f32_to_bf16(x32) if dtype == "bfloat16" else x32
    return be.to_device(x)


def _array_bits(a) -> np.ndarray:
    a = np.ascontiguousarray(bridge.to_host(a))
    return a.view({4: np.uint32, 2: np.uint16}[a.dtype.itemsize]).ravel()


# --- bind_dequantize_4bit ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True), ("int4", False)])
def test_bind_torch_out_same_bytes(be, dtype, shape, quant_type, double_quant):
    """A torch buffer on the backend's device: the bound launch writes dequantize_4bit's bytes, which are the spec's."""
    torch = pytest.importorskip("torch")
    q_host = _state(shape, double_quant, quant_type, seed=shape[0])
    q = be.to_device(q_host)
    device, _ = placement(be)
    want = qlora_ref.dequantize_4bit(q_host, dtype).ravel()
    want_bits = want.view(np.uint32 if dtype == "float32" else np.uint16).astype(np.int64)
    ref = torch.full(shape, 5.0, dtype=getattr(torch, dtype), device=device)
    be.dequantize_4bit(q, out=ref)
    out = torch.full(shape, 5.0, dtype=getattr(torch, dtype), device=device)
    launch = be.bind_dequantize_4bit(q, out)
    launch()
    if device == "cuda":
        torch.cuda.synchronize()
    np.testing.assert_array_equal(_torch_bits(out), _torch_bits(ref))
    mask = 0xFFFFFFFF if dtype == "float32" else 0xFFFF
    np.testing.assert_array_equal(_torch_bits(out).astype(np.int64) & mask, want_bits)
    out.fill_(5.0)
    launch()  # a second call writes the same bytes again
    np.testing.assert_array_equal(_torch_bits(out), _torch_bits(ref))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bind_array_out_same_bytes(be, dtype):
    """An array of the backend (numpy / CuPy; bf16 as uint16 bits) as the bound buffer."""
    q_host = _state((40, 72), seed=2)
    q = be.to_device(q_host)
    np_dtype = np.uint16 if dtype == "bfloat16" else np.dtype(dtype)
    out = be.to_device(np.full(q.n, 0x7E, np_dtype))
    be.bind_dequantize_4bit(q, out)()
    np.testing.assert_array_equal(_array_bits(out), _array_bits(qlora_ref.dequantize_4bit(q_host, dtype)))


def test_bind_refuses_a_wrong_buffer(be):
    torch = pytest.importorskip("torch")
    q = be.to_device(_state((8, 64)))
    device, _ = placement(be)
    with pytest.raises(ValueError, match="elements"):
        be.bind_dequantize_4bit(q, torch.empty(8 * 64 + 1, device=device))
    with pytest.raises(ValueError, match="contiguous"):
        be.bind_dequantize_4bit(q, torch.empty(64, 8, device=device).t())
    with pytest.raises(TypeError, match="dtype"):
        be.bind_dequantize_4bit(q, torch.empty(8 * 64, dtype=torch.int32, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
def test_bind_captured_in_cuda_graph(dtype, double_quant):
    """The bound launch captured in a torch.cuda.CUDAGraph, then replayed: the same bytes as the eager call."""
    torch = pytest.importorskip("torch")
    be = get_backend("cupy")
    q = be.to_device(_state((300, 301), double_quant, seed=11))
    tdtype = getattr(torch, dtype)
    ref = torch.empty(300, 301, dtype=tdtype, device="cuda")
    be.dequantize_4bit(q, out=ref)
    out = torch.zeros(300, 301, dtype=tdtype, device="cuda")
    launch = be.bind_dequantize_4bit(q, out)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up on a side stream, as torch's capture recipe does
        launch()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch()
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    np.testing.assert_array_equal(_torch_bits(out), _torch_bits(ref))
    out.fill_(1.0)  # replay again over other bytes: the graph writes them all
    graph.replay()
    torch.cuda.synchronize()
    np.testing.assert_array_equal(_torch_bits(out), _torch_bits(ref))


@pytest.mark.gpu
def test_bind_follows_torch_current_stream():
    """Each call launches on torch's current stream at call time (not the one current when it was bound)."""
    torch = pytest.importorskip("torch")
    be = get_backend("cupy")
    q = be.to_device(_state((256, 512), seed=4))
    out = torch.empty(256, 512, dtype=torch.bfloat16, device="cuda")
    ref = torch.empty_like(out)
    be.dequantize_4bit(q, out=ref)
    launch = be.bind_dequantize_4bit(q, out)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        out.zero_()
        launch()  # ordered after zero_() on the same stream
        got = out.clone()
    torch.cuda.synchronize()
    np.testing.assert_array_equal(_torch_bits(got), _torch_bits(ref))


# --- bind_matvec_4bit ---------------------------------------------------------------------------------------------


def _matvec_io(be, shape, tokens, x_dtype, out_dtype, seed=0):
    """(q on the device, x [tokens, in] torch tensor, y [tokens, out] torch tensor filled with 7s, spec's y bits)."""
    torch = pytest.importorskip("torch")
    device, _ = placement(be)
    q_host = _state(shape, seed=seed)
    x32 = np.random.default_rng(seed + 1).standard_normal((tokens, shape[1])).astype(np.float32)
    x = torch.from_numpy(x32).to(device=device, dtype=getattr(torch, x_dtype))
    y = torch.full((tokens, shape[0]), 7.0, dtype=getattr(torch, out_dtype), device=device)
    spec = qlora_ref.matvec.matvec_4bit(bridge.to_host(x), q_host, dtype=x_dtype, out_dtype=out_dtype)
    return be.to_device(q_host), x, y, spec


@pytest.mark.parametrize("order", ["spec", "any"])
@pytest.mark.parametrize(
    "x_dtype,out_dtype", [("bfloat16", "bfloat16"), ("float32", "float32"), ("bfloat16", "float32")]
)
@pytest.mark.parametrize("shape,tokens", [((96, 128), 1), ((40, 320), 3), ((33, 4096), 16), ((7, 13), 2)], ids=str)
def test_bind_matvec_same_bits(be, order, x_dtype, out_dtype, shape, tokens):
    """The bound launch writes matvec_4bit(x, q, out=y)'s bits; in the spec's order those are the spec's."""
    torch = pytest.importorskip("torch")
    q, x, y, spec = _matvec_io(be, shape, tokens, x_dtype, out_dtype, seed=shape[0] + tokens)
    ref = torch.empty_like(y)
    be.matvec_4bit(x, q, out=ref, check_finite=False, order=order)
    launch = be.bind_matvec_4bit(q, tokens, x_dtype=x_dtype, out_dtype=out_dtype, order=order)
    launch(x, y)
    np.testing.assert_array_equal(_torch_bits(y), _torch_bits(ref))
    if order == "spec":
        np.testing.assert_array_equal(_torch_bits(y).astype(np.int64) & (0xFFFF if out_dtype == "bfloat16" else
                                      0xFFFFFFFF), _array_bits(spec).astype(np.int64))  # fmt: skip
    x2 = x.flip(0).contiguous()  # another x at another address: the launch reads the addresses at each call
    launch(x2, y)
    be.matvec_4bit(x2, q, out=ref, check_finite=False, order=order)
    np.testing.assert_array_equal(_torch_bits(y), _torch_bits(ref))


def test_bind_matvec_refuses_bad_arguments(be):
    q = be.to_device(_state((8, 64)))
    with pytest.raises(ValueError, match="tokens"):
        be.bind_matvec_4bit(q, 17)
    with pytest.raises(ValueError, match="tokens"):
        be.bind_matvec_4bit(q, True)
    with pytest.raises(ValueError, match="x_dtype and out_dtype"):
        be.bind_matvec_4bit(q, 1, x_dtype="float16")
    with pytest.raises(ValueError, match="order"):
        be.bind_matvec_4bit(q, 1, order="fast")


@pytest.mark.gpu
def test_bind_matvec_unaligned_x_and_capture():
    """An x view at an address that is not 16-byte aligned takes the checked path (same bits); the bound launch
    captured in a CUDA graph and replayed writes the eager bits (torch's capture stream followed)."""
    torch = pytest.importorskip("torch")
    be = get_backend("cupy")
    q, x, y, _ = _matvec_io(be, (300, 512), 2, "bfloat16", "bfloat16", seed=5)
    ref = torch.empty_like(y)
    launch = be.bind_matvec_4bit(q, 2, order="any")
    big = torch.empty(2 * 512 + 1, dtype=torch.bfloat16, device="cuda")
    xu = big[1:].view(2, 512)  # 2 bytes past an aligned address
    xu.copy_(x)
    assert xu.data_ptr() % 16 != 0
    be.matvec_4bit(xu, q, out=ref, check_finite=False, order="any")
    launch(xu, y)
    np.testing.assert_array_equal(_torch_bits(y), _torch_bits(ref))
    be.matvec_4bit(x, q, out=ref, check_finite=False, order="any")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        launch(x, y)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch(x, y)
    y.zero_()
    graph.replay()
    torch.cuda.synchronize()
    np.testing.assert_array_equal(_torch_bits(y), _torch_bits(ref))


# --- the deferred non-finite check ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_finite_flag_counts_across_tensors(be, dtype):
    """BW-9, deferred: check_finite(x, flag=f) raises nothing; f counts every non-finite value of every x checked."""
    flag = be.finite_flag()
    a = np.ones(5000, np.float32)
    a[[3, 4097]] = [np.nan, np.inf]
    b = np.ones(77, np.float32)
    b[76] = -np.inf
    be.check_finite(_input(be, a, dtype), "a", flag=flag)  # no error: queued only
    be.check_finite(_input(be, b, dtype), "b", flag=flag)
    be.check_finite(_input(be, np.ones(9, np.float32), dtype), "c", flag=flag)
    assert flag.count() == 3
    with pytest.raises(qlora_ref.NonFiniteError, match="grads has 3 non-finite"):
        flag.raise_if_nonfinite("grads")
    flag.clear()
    assert flag.count() == 0
    flag.raise_if_nonfinite("grads")  # nothing since the clear


# --- host / device, placement, bridge -------------------------------------------------------------------------------


def test_to_host_to_device_round_trip(be):
    q = _state((9, 70), seed=3)
    qd = be.to_device(q)
    assert isinstance(qd, qlora_ref.Quantized4bit)
    back = be.to_host(qd)
    for field in ("packed", "absmax_q", "nested_absmax"):
        np.testing.assert_array_equal(getattr(back, field), getattr(q, field))
    assert np.float32(back.offset) == np.float32(q.offset)
    a = np.arange(10, dtype=np.float32)
    np.testing.assert_array_equal(be.to_host(be.to_device(a)), a)


def test_placement():
    """The one rule: numpy computes in float32 on the CPU, cupy in bfloat16 on CUDA (names need no GPU)."""
    assert placement("numpy") == ("cpu", "float32")
    assert placement("cupy") == ("cuda", "bfloat16")
    assert placement(get_backend("numpy")) == ("cpu", "float32")
    assert set(BACKENDS) == {"numpy", "cupy"}
    with pytest.raises(ValueError, match="unknown backend"):
        placement("tpu")


def test_bridge_bf16_bits_and_laziness():
    """bf16 tensors cross as their uint16 bits, both ways, without a copy; importing the bridge imports nothing."""
    import subprocess
    import sys

    code = "import sys, backends.bridge; assert 'torch' not in sys.modules and 'cupy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    torch = pytest.importorskip("torch")
    t = torch.randn(3, 5).to(torch.bfloat16)
    bits = bridge.to_host(t)
    assert bits.dtype == np.uint16 and bits.shape == (3, 5)
    np.testing.assert_array_equal(bits, t.view(torch.int16).numpy().view(np.uint16))
    back = bridge.numpy_to_torch(bits, "bfloat16")
    assert back.dtype == torch.bfloat16 and torch.equal(back, t)
    assert bridge.is_torch(t) and not bridge.is_torch(bits) and not bridge.is_cupy(bits)
    assert bridge.dtype_name(t) == "bfloat16" and bridge.dtype_name(bits) == "uint16"
    view = bridge.torch_to_numpy(t)
    view[0, 0] = 0  # a view: writes reach the tensor
    assert t[0, 0].item() == 0.0


@pytest.mark.gpu
def test_bridge_cuda_views_and_stream_cache():
    torch = pytest.importorskip("torch")
    t = torch.randn(4, 6, device="cuda").to(torch.bfloat16)
    a = bridge.to_device(t)
    assert a.dtype == np.uint16 and a.data.ptr == t.data_ptr()  # zero-copy
    back = bridge.cupy_to_torch(a, "bfloat16")
    assert back.data_ptr() == t.data_ptr() and torch.equal(back, t)
    s1 = bridge.current_stream(t.device.index)
    assert s1 is bridge.current_stream(t.device.index)  # cached by pointer
    assert s1.ptr == torch.cuda.current_stream().cuda_stream
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        assert bridge.torch_stream_getter(t.device.index)().ptr == side.cuda_stream
