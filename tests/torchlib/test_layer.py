"""QLoRALinear against the spec: dequantization bits (BW-7), forward/backward (LORA-2..LORA-4), memory, errors.

Tolerances (forward and gradients kept apart, as STYLE.md asks):
- Dequantization: exact (one float32 product, or one rounding to bf16 from it).
- float32 GEMMs: a K-term dot product in float32 is within K * eps32 * sum|a_k b_k| of the exact value (plain
  recursive summation bound, Higham 3.1); the spec (numpy) and torch both carry that error, so each element may differ
  by 2 K eps32 sum|a_k b_k|.  Forward: K = in (+ r for the LoRA term); gradients: K = out (dX), M (dA, dB), r.
  The tests use these element-wise bounds with the |.|-products computed in float64.
- float64 gradcheck: torch's defaults (finite differences, eps 1e-6, atol 1e-5, rtol 1e-3).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qlora_ref
from backends import get_backend
from backends.torchlib import scratch
from backends.torchlib.layer import QLoRAFunction, QLoRALinear, dequantize_4bit_cpu, draw_dropout_seed, dropout_noise
from qlora_ref import lora as spec_lora

EPS32 = float(np.finfo(np.float32).eps)


def _q(shape, quant_type="nf4", blocksize=64, double_quant=True, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * 0.05).astype(dtype)
    return qlora_ref.quantize_4bit(w, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)


def _layer(
    out_f=48,
    in_f=96,
    r=8,
    alpha=16,
    dropout=0.0,
    rslora=False,
    compute_dtype="float32",
    lora_dtype=None,
    backend="numpy",
    seed=0,
    bias=False,
):
    torch.manual_seed(seed)
    be = get_backend(backend)
    w = torch.randn(out_f, in_f) * 0.05
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(w)
    m = QLoRALinear.from_linear(
        lin,
        backend=be,
        r=r,
        alpha=alpha,
        dropout=dropout,
        rslora=rslora,
        compute_dtype=compute_dtype,
        lora_dtype=lora_dtype or compute_dtype,
    )
    m.reset_lora_parameters("random")  # B != 0 so the LoRA term is exercised
    return m


def _spec_W(m) -> np.ndarray:
    q = m.q if isinstance(m.q.packed, np.ndarray) else _host_q(m.q)
    return qlora_ref.dequantize_4bit(q, "float32")


def _host_q(q):
    from backends.torchlib.export import _numpy_q

    return _numpy_q(q)


def _k_eps(k: int) -> float:
    """2 (K + 2) eps32: both sides' float32 error for a chain of K-term sums and two more roundings (scale, add)."""
    return 2.0 * (k + 2) * EPS32


def _assert_within(got, want, bound, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.abs(got - want)
    bad = err > bound + 1e-30
    if bad.any():
        i = np.unravel_index(np.argmax(err - bound), err.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} elements out of bound; worst at {i}: got {got[i]}, "
            f"want {want[i]}, |err| {err[i]:.3e} > bound {bound[i]:.3e}"
        )


# --- dequantization: bit-identical to the spec


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize(
    "shape,blocksize", [((48, 96), 64), ((7, 13), 32), ((33, 65), 128), ((300, 301), 4096), ((1, 1), 64), ((3, 5), 64)]
)
def test_cpu_dequantize_bit_identical_to_spec(quant_type, double_quant, shape, blocksize):
    """BW-7: table[code] * absmax in float32, odd n and partial blocks included, every bit equal."""
    q = _q(shape, quant_type, blocksize, double_quant, seed=shape[0] * 7 + blocksize)
    want = qlora_ref.dequantize_4bit(q, "float32").ravel()
    out = np.full(q.nblocks * q.blocksize, np.nan, np.float32)
    got = dequantize_4bit_cpu(q, out)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_cpu_dequantize_flushes_subnormal_products(quant_type, double_quant):
    """BW-8: weights near 1e-37 give subnormal code * absmax products; they flush to signed zeros, as in the spec."""
    rng = np.random.default_rng(17)
    scale = rng.choice(np.array([1.0, 3e-37, 4e-38, 2e-38]), size=(32, 1))  # per row = per block of 64
    w = (rng.standard_normal((32, 64)) * scale).astype(np.float32)
    q = qlora_ref.quantize_4bit(w, quant_type=quant_type, double_quant=double_quant)
    if not double_quant:  # double quantization rounds tiny absmax values away; without it the flush path must run
        code = qlora_ref.codebooks.dequant_table(quant_type)
        assert (np.abs(q.absmax.astype(np.float64)) * np.abs(code[code != 0]).min() < np.finfo(np.float32).tiny).any()
    want = qlora_ref.dequantize_4bit(q, "float32").ravel()
    got = dequantize_4bit_cpu(q, np.empty(q.nblocks * q.blocksize, np.float32))
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    tiny = np.abs(want) < np.finfo(np.float32).tiny
    assert not np.any(tiny & (want != 0)), "the spec output has no subnormals"


@pytest.mark.parametrize("src_dtype", [np.float32, np.float16])
def test_layer_dequantize_one_rounding_to_compute_dtype(src_dtype):
    """W_hat in bf16/fp16 compute = the spec's dequantize_4bit(q, dtype) bits (one rounding from float32)."""
    q = _q((40, 64), seed=3, dtype=src_dtype)
    be = get_backend("numpy")
    for name in ("bfloat16", "float16", "float32"):
        m = QLoRALinear(q, backend=be, r=4, compute_dtype=name)
        got = m.dequantized()
        want = qlora_ref.dequantize_4bit(q, name)
        if name == "bfloat16":
            np.testing.assert_array_equal(got.view(torch.int16).numpy().view(np.uint16), want)
        else:
            np.testing.assert_array_equal(
                got.numpy().view(np.uint16 if name == "float16" else np.uint32),
                want.view(np.uint16 if name == "float16" else np.uint32),
            )


def test_scratch_buffer_shared_across_layers():
    """One scratch buffer per (device, dtype): two layers dequantize into the same memory."""
    scratch.release_scratch()
    a, b = _layer(48, 96, seed=1), _layer(96, 48, seed=2)
    wa, wb = a.dequantized(), b.dequantized()
    assert wa.data_ptr() == wb.data_ptr()
    assert wa.data_ptr() == scratch.current(scratch.scratch_key("cpu", torch.float32)).data_ptr()


# --- forward and backward against qlora_ref.lora


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_backward_match_spec(rslora, bias):
    """y, dX, dA, dB vs lora_forward / lora_backward on the spec's W_hat (LORA-2, LORA-4), float32 bounds."""
    m = _layer(48, 96, r=8, alpha=16, rslora=rslora, bias=bias, seed=5)
    torch.manual_seed(11)
    x = torch.randn(3, 5, 96, requires_grad=True)
    y = m(x)
    dy = torch.randn_like(y)
    y.backward(dy)

    W = _spec_W(m)
    A, B = m.lora_A.detach().numpy(), m.lora_B.detach().numpy()
    xn, dyn = x.detach().numpy(), dy.numpy()
    y_ref = spec_lora.lora_forward(xn, W, A, B, alpha=16, rslora=rslora)
    if bias:
        y_ref = y_ref + m.bias.numpy()
    s = m.scaling
    assert s == spec_lora.lora_scaling(16, 8, rslora=rslora)
    x2, dy2 = np.abs(xn.reshape(-1, 96)).astype(np.float64), np.abs(dyn.reshape(-1, 48)).astype(np.float64)
    aW, aA, aB, M, r = np.abs(W).astype(np.float64), np.abs(A).astype(np.float64), np.abs(B).astype(np.float64), 15, 8
    bound_y = _k_eps(96 + r) * (x2 @ aW.T + s * (x2 @ aA.T) @ aB.T)
    _assert_within(y.detach().numpy().reshape(-1, 48), y_ref.reshape(-1, 48), bound_y, "forward y")

    dx_ref, dA_ref, dB_ref = spec_lora.lora_backward(dyn, xn, W, A, B, alpha=16, rslora=rslora)
    bound_dx = _k_eps(48 + r) * (dy2 @ aW + s * (dy2 @ aB) @ aA)
    _assert_within(x.grad.numpy().reshape(-1, 96), dx_ref.reshape(-1, 96), bound_dx, "dX")
    bound_dA = _k_eps(48 + M) * s * (dy2 @ aB).T @ x2
    _assert_within(m.lora_A.grad.numpy(), dA_ref, bound_dA, "dA")
    bound_dB = _k_eps(96 + M) * s * dy2.T @ (x2 @ aA.T)
    _assert_within(m.lora_B.grad.numpy(), dB_ref, bound_dB, "dB")


def test_dropout_mask_is_redrawn_and_matches_spec():
    """LORA-3: the forward's mask comes from a seed drawn from torch's RNG; backward redraws the same mask."""
    p = 0.3
    m = _layer(32, 64, r=4, dropout=p, seed=7)
    m.train()
    x = torch.randn(6, 64, requires_grad=True)
    torch.manual_seed(123)
    seed = draw_dropout_seed()
    keep = (dropout_noise((6, 64), p, seed, "numpy", torch.float32) != 0).numpy()
    assert 0.5 < keep.mean() < 0.9
    torch.manual_seed(123)
    y = m(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    W = _spec_W(m)
    A, B = m.lora_A.detach().numpy(), m.lora_B.detach().numpy()
    xn = x.detach().numpy()
    y_ref = spec_lora.lora_forward(xn, W, A, B, alpha=16, p=p, keep=keep)
    np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=1e-5, atol=1e-5)
    dx_ref, dA_ref, dB_ref = spec_lora.lora_backward(dy.numpy(), xn, W, A, B, alpha=16, p=p, keep=keep)
    np.testing.assert_allclose(x.grad.numpy(), dx_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m.lora_A.grad.numpy(), dA_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m.lora_B.grad.numpy(), dB_ref, rtol=1e-5, atol=1e-5)
    m.eval()  # no dropout in eval mode: the plain forward
    np.testing.assert_allclose(
        m(x).detach().numpy(), spec_lora.lora_forward(xn, W, A, B, alpha=16), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_gradcheck_float64(dropout):
    """torch.autograd.gradcheck on a tiny float64 layer: the hand-written backward is the forward's derivative."""
    m = _layer(6, 10, r=3, alpha=6, dropout=dropout, compute_dtype="float64", seed=9, bias=True)
    x = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    A = m.lora_A.detach().clone().requires_grad_(True)
    B = m.lora_B.detach().clone().requires_grad_(True)
    seed = 1234 if dropout else None
    assert torch.autograd.gradcheck(lambda x, A, B: QLoRAFunction.apply(x, A, B, m, seed), (x, A, B))


def test_saves_only_x_and_xA():
    """The memory ledger: backward keeps x, u = x A^T (M, r) and references to A, B; nothing of the weight's size."""
    m = _layer(48, 96, r=8, seed=4)
    x = torch.randn(10, 96, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        m(x)
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([(10, 96), (10, 8), (8, 96), (48, 8)]), shapes
    activ = [t for t in saved if t.data_ptr() not in (m.lora_A.data_ptr(), m.lora_B.data_ptr())]
    assert sum(t.numel() for t in activ) == 10 * 96 + 10 * 8


def test_frozen_base_no_parameters_but_lora():
    m = _layer(48, 96, seed=2, bias=True)
    assert [n for n, _ in m.named_parameters()] == ["lora_A", "lora_B"]
    assert set(m.state_dict()) == {"lora_A", "lora_B", "bias"}
    x = torch.randn(2, 96)
    m(x).sum().backward()
    assert m.lora_A.grad is not None and m.lora_B.grad is not None


def test_no_input_grad_skips_dX():
    """A frozen input (the first layer after frozen embeddings) needs no dX: only dA, dB are produced."""
    m = _layer(16, 32, r=2, seed=3)
    x = torch.randn(3, 32)
    m(x).sum().backward()
    assert m.lora_A.grad is not None and x.grad is None


def test_lora_bf16_params_with_fp32_compute():
    m = _layer(16, 32, r=2, seed=3, lora_dtype="bfloat16")
    assert m.lora_A.dtype == torch.bfloat16
    x = torch.randn(3, 32, requires_grad=True)
    y = m(x)
    y.sum().backward()
    assert y.dtype == torch.float32 and m.lora_A.grad.dtype == torch.bfloat16 and x.grad.dtype == torch.float32


def test_bf16_compute_with_fp32_lora_matches_spec():
    """The GPU default (bf16 activations and W_hat, fp32 A and B), run on the CPU: y, dX within bf16 rounding of the
    float32 spec on the same bf16 inputs (|err| <= 2^-7 max|y|: a few bf16 roundings of values of that size); dA, dB
    within 2^-7 of their scale (they see dY and x in bf16)."""
    m = _layer(32, 64, r=4, seed=12, compute_dtype="bfloat16", lora_dtype="float32")
    torch.manual_seed(5)
    xb = torch.randn(6, 64).to(torch.bfloat16).requires_grad_(True)
    y = m(xb)
    dy = torch.randn(6, 32).to(torch.bfloat16)
    y.backward(dy)
    assert y.dtype == torch.bfloat16 and xb.grad.dtype == torch.bfloat16 and m.lora_A.grad.dtype == torch.float32
    W = _spec_W(m)
    A, B = m.lora_A.detach().numpy(), m.lora_B.detach().numpy()
    xn, dyn = xb.detach().float().numpy(), dy.float().numpy()
    y_ref = spec_lora.lora_forward(xn, W, A, B, alpha=16)
    dx_ref, dA_ref, dB_ref = spec_lora.lora_backward(dyn, xn, W, A, B, alpha=16)
    for got, want, what in ((y, y_ref, "y"), (xb.grad, dx_ref, "dX"), (m.lora_A.grad, dA_ref, "dA"),
                            (m.lora_B.grad, dB_ref, "dB")):  # fmt: skip
        err = np.abs(got.detach().float().numpy() - want).max()
        assert err <= 2**-7 * np.abs(want).max(), f"{what}: max |err| {err} vs scale {np.abs(want).max()}"


def test_boundary_errors():
    q = _q((8, 64))
    be = get_backend("numpy")
    with pytest.raises(ValueError, match="rank r"):
        QLoRALinear(q, backend=be, r=0)
    with pytest.raises(ValueError, match="dropout"):
        QLoRALinear(q, backend=be, r=2, dropout=1.0)
    with pytest.raises(ValueError, match="dtype"):
        QLoRALinear(q, backend=be, r=2, compute_dtype="int8")
    with pytest.raises(ValueError, match="2-D"):
        QLoRALinear(_q((4, 4, 4)), backend=be, r=2)
    m = QLoRALinear(q, backend=be, r=2)
    with pytest.raises(ValueError, match="last dimension"):
        m(torch.randn(2, 63))
    with pytest.raises(TypeError, match="torch.nn.Linear"):
        QLoRALinear.from_linear(torch.nn.Conv1d(2, 2, 1), backend=be)


# --- GPU: the same checks with backend="cupy"


@pytest.mark.gpu
@pytest.mark.parametrize("compute_dtype", ["bfloat16", "float32"])
def test_gpu_dequantize_matches_spec(compute_dtype):
    """The cupy backend writes W_hat into the torch scratch tensor with the spec's bits (BW-7).

    Checked twice, so a failure says where it is: the backend's own output (kernel), then the layer's scratch (out=).
    """
    m = _layer(64, 192, r=8, backend="cupy", compute_dtype=compute_dtype, seed=21)
    bits = np.uint16 if compute_dtype == "bfloat16" else np.uint32
    want = qlora_ref.dequantize_4bit(_host_q(m.q), compute_dtype).view(bits)
    kernel = m.backend.dequantize_4bit(m.q, dtype=compute_dtype)  # CuPy array, bf16 as uint16 bits
    np.testing.assert_array_equal(kernel.get().view(bits), want, err_msg="backend kernel vs spec")
    got = m.dequantized().cpu()
    got = got.view(torch.int16).numpy().view(bits) if compute_dtype == "bfloat16" else got.numpy().view(bits)
    np.testing.assert_array_equal(got, want, err_msg="layer scratch (out=) vs spec")


@pytest.mark.gpu
def test_gpu_forward_backward_match_cpu_float32():
    """backend='cupy' in float32 compute: forward and grads equal the spec within the float32 GEMM bounds (x100 for
    TF32-free cuBLAS reduction-order differences is not needed: the bound is order-independent)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    m = _layer(64, 192, r=8, backend="cupy", compute_dtype="float32", seed=22)
    torch.manual_seed(1)
    x = torch.randn(7, 192, device="cuda", requires_grad=True)
    y = m(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    W = _spec_W(m)
    A, B = m.lora_A.detach().cpu().numpy(), m.lora_B.detach().cpu().numpy()
    xn, dyn = x.detach().cpu().numpy(), dy.cpu().numpy()
    y_ref = spec_lora.lora_forward(xn, W, A, B, alpha=16)
    np.testing.assert_allclose(y.detach().cpu().numpy(), y_ref, rtol=1e-4, atol=1e-5)
    dx_ref, dA_ref, dB_ref = spec_lora.lora_backward(dyn, xn, W, A, B, alpha=16)
    np.testing.assert_allclose(x.grad.cpu().numpy(), dx_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(m.lora_A.grad.cpu().numpy(), dA_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(m.lora_B.grad.cpu().numpy(), dB_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_gpu_bf16_training_step_close_to_fp32():
    """bf16 compute (the GPU default) with fp32 LoRA: y and grads within bf16 rounding of the float32 run."""
    m = _layer(64, 192, r=8, backend="cupy", compute_dtype="bfloat16", lora_dtype="float32", seed=23)
    x = torch.randn(16, 192, device="cuda")
    xb = x.to(torch.bfloat16).requires_grad_(True)
    y = m(xb)
    y.float().sum().backward()
    W = _spec_W(m)
    A, B = m.lora_A.detach().cpu().numpy(), m.lora_B.detach().cpu().numpy()
    y_ref = spec_lora.lora_forward(xb.detach().float().cpu().numpy(), W, A, B, alpha=16)
    scale = np.abs(y_ref).max()
    assert np.abs(y.detach().float().cpu().numpy() - y_ref).max() <= 2**-7 * scale * 4
    assert torch.isfinite(m.lora_A.grad).all() and torch.isfinite(m.lora_B.grad).all()
