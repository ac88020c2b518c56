"""DoRA on a 4-bit base (specs/dora.md): the block-row norm, the magnitude init, forward/backward vs autograd.

Tolerances (specs/dora.md, "Agreement"): standard model, gamma_k = k u / (1 - k u), evaluated on the abs-graph (the
same formulas on |operands|, every difference turned into a sum).  u64 = 2^-53, u32 = 2^-24.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import qlora_ref
from qlora_ref.dora import (
    dequantize_rows,
    dora_backward,
    dora_forward,
    dora_init,
    dora_merge,
    dora_weight_norm,
    low_rank_rows,
)
from qlora_ref.lora import dropout_keep, lora_scaling

U64, U32 = 2.0**-53, 2.0**-24


def gamma(k: int, u: float) -> float:
    return k * u / (1 - k * u)


@st.composite
def dora_case(draw, dtype=np.float64):
    """A small 4-bit base (any block size, with or without double quant), an adapter with B != 0, x, dropout."""
    out_f = draw(st.integers(1, 7))
    in_f = draw(st.integers(1, 70))
    r = draw(st.integers(1, 4))
    N = draw(st.integers(1, 3))
    blocksize = draw(st.sampled_from([32, 64, 128]))
    double_quant = draw(st.booleans())
    alpha = draw(st.sampled_from([1.0, 8.0, 16.0]))
    rslora = draw(st.booleans())
    p = draw(st.sampled_from([0.0, 0.0, 0.25]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    W = rng.standard_normal((out_f, in_f)).astype(np.float32)
    q = qlora_ref.quantize_4bit(W, blocksize=blocksize, double_quant=double_quant)
    A = rng.standard_normal((r, in_f)).astype(dtype) * 0.3
    B = rng.standard_normal((out_f, r)).astype(dtype) * 0.3
    x = rng.standard_normal((N, in_f)).astype(dtype)
    m = (rng.uniform(0.5, 2.0, out_f)).astype(dtype)
    dy = rng.standard_normal((N, out_f)).astype(dtype)
    keep = dropout_keep((N, in_f), p, rng) if p > 0 else None
    return dict(q=q, A=A, B=B, x=x, m=m, dy=dy, alpha=alpha, rslora=rslora, p=p, keep=keep, r=r)


def _kw(c):
    return dict(alpha=c["alpha"], rslora=c["rslora"], p=c["p"], keep=c["keep"])


# --- DORA-2: the block-row norm ----------------------------------------------------------------------------------


@given(c=dora_case(), data=st.data())
def test_dequantize_rows_is_bit_for_bit_the_dense_dequantization(c, data):
    """DORA-2: any row range decoded from the 4-bit state equals the same rows of dequantize_4bit (BW-7)."""
    q = c["q"]
    o0 = data.draw(st.integers(0, q.shape[0] - 1))
    o1 = data.draw(st.integers(o0 + 1, q.shape[0]))
    dense = qlora_ref.dequantize_4bit(q, "float32")
    np.testing.assert_array_equal(dequantize_rows(q, o0, o1), dense[o0:o1])


@given(c=dora_case(), block_rows=st.integers(1, 8))
def test_block_norm_equals_dense_norm_for_every_block_rows(c, block_rows):
    """DORA-1, DORA-2: the block-row norm is the dense norm bit for bit (same r-term order), for every block_rows;
    against numpy's BLAS-order ||W_hat + s (B @ A)||_row within the derived bound."""
    q, A, B = c["q"], c["A"], c["B"]
    s = lora_scaling(c["alpha"], c["r"], rslora=c["rslora"])
    W = qlora_ref.dequantize_4bit(q, "float32").astype(np.float64)
    V = W + s * low_rank_rows(B, A)
    dense = np.sqrt(np.sum(V * V, axis=1))
    got = dora_weight_norm(q, A, B, alpha=c["alpha"], rslora=c["rslora"], block_rows=block_rows)
    np.testing.assert_array_equal(got, dense)
    np.testing.assert_array_equal(got, dora_weight_norm(q, A, B, alpha=c["alpha"], rslora=c["rslora"]))
    blas = np.linalg.norm(W + s * (B @ A), axis=1)
    V_abs = np.abs(W) + s * (np.abs(B) @ np.abs(A))
    bound = (gamma(c["r"] + 1, U64) + gamma(q.shape[1] + 1, U64)) * np.linalg.norm(V_abs, axis=1) * 2
    assert np.all(np.abs(got - blas) <= bound)


def test_block_norm_never_holds_the_whole_weight(monkeypatch):
    """DORA-2: with block_rows = 1 no decoded block is larger than one row plus its covering blocks."""
    rng = np.random.default_rng(3)
    q = qlora_ref.quantize_4bit(rng.standard_normal((12, 200)).astype(np.float32))
    A, B = rng.standard_normal((2, 200)), rng.standard_normal((12, 2))
    sizes = []
    real = qlora_ref.dora.decode_4bit

    def spy(codes, *a):
        sizes.append(codes.size)
        return real(codes, *a)

    monkeypatch.setattr(qlora_ref.dora, "decode_4bit", spy)
    dora_weight_norm(q, A, B, alpha=4, block_rows=1)
    assert len(sizes) == 12 and max(sizes) <= 200 + 2 * 64 < q.n


# --- DORA-3, DORA-4: init and forward ------------------------------------------------------------------------------


@given(c=dora_case(dtype=np.float32))
def test_magnitude_init_with_B_zero_gives_the_base_output(c):
    """DORA-3, DORA-4: m = ||W_hat||_row when B = 0, so g = float32(n) / n = 1 within u32 and y = x W_hat^T."""
    q, A, x = c["q"], c["A"], c["x"]
    B = np.zeros_like(c["B"])
    m = dora_init(q, A, B, alpha=c["alpha"], rslora=c["rslora"])
    W = qlora_ref.dequantize_4bit(q, "float32")
    np.testing.assert_array_equal(m, np.linalg.norm(W.astype(np.float64), axis=1).astype(np.float32))
    assume(np.all(m > 0))  # an all-zero row of W_hat has n = 0 and g = 0/0 (DORA-7: PEFT divides the same way)
    y = dora_forward(x, q, A, B, m, alpha=c["alpha"], rslora=c["rslora"])
    base = x @ W.T
    k = q.shape[1]
    bound = (2 * U32 + 3 * gamma(k + 2, U32)) * (np.abs(x) @ np.abs(W).T) + 1e-30
    assert np.all(np.abs(y - base) <= bound)


def _torch_dense(c):
    """The dense DoRA map in torch float64 with n detached (DORA-6): autograd's dx, dA, dB, dm."""
    s = lora_scaling(c["alpha"], c["r"], rslora=c["rslora"])
    W = torch.from_numpy(qlora_ref.dequantize_4bit(c["q"], "float32").astype(np.float64))
    x, A, B, m = (torch.from_numpy(c[k]).requires_grad_() for k in ("x", "A", "B", "m"))
    mask = torch.ones_like(x) if c["keep"] is None else torch.from_numpy(c["keep"] / (1 - c["p"]))
    xd = x * mask
    n = torch.linalg.norm(W + s * B @ A, dim=1).detach()
    y = (x - xd) @ W.T + (m / n) * (xd @ W.T + s * (xd @ A.T) @ B.T)
    y.backward(torch.from_numpy(c["dy"]))
    return y.detach().numpy(), x.grad.numpy(), A.grad.numpy(), B.grad.numpy(), m.grad.numpy()


def _abs_graph(c):
    """|y|, |dx|, |dA|, |dB|, |dm| bounds: DORA-4/5's formulas on absolute values, differences as sums."""
    s = lora_scaling(c["alpha"], c["r"], rslora=c["rslora"])
    W = np.abs(qlora_ref.dequantize_4bit(c["q"], "float32").astype(np.float64))
    x, A, B, m, dy = (np.abs(c[k]) for k in ("x", "A", "B", "m", "dy"))
    mask = np.ones_like(x) if c["keep"] is None else c["keep"] / (1 - c["p"])
    n = dora_weight_norm(c["q"], c["A"], c["B"], alpha=c["alpha"], rslora=c["rslora"])
    g = m / n
    xd = x * mask
    u = xd @ A.T
    z = xd @ W.T + s * u @ B.T
    y = (x + xd) @ W.T + g * z
    gy = g * dy
    du = s * gy @ B
    dx = dy @ W + ((gy + dy) @ W + du @ A) * mask
    return y, dx, du.T @ xd, s * gy.T @ u, np.sum(dy * z, axis=0) / n


@given(c=dora_case())
def test_forward_and_backward_match_autograd_of_the_dense_map(c):
    """DORA-4, DORA-5, DORA-6: y, dx, dA, dB, dm vs torch autograd (float64) of the dense map with n detached,
    dropout included (PEFT's (x - xd) W^T + g z form)."""
    kw = _kw(c)
    y = dora_forward(c["x"], c["q"], c["A"], c["B"], c["m"], **kw)
    grads = dora_backward(c["dy"], c["x"], c["q"], c["A"], c["B"], c["m"], **kw)
    ref = _torch_dense(c)
    k = c["q"].shape[1] + c["r"] + c["x"].shape[0] + c["q"].shape[0] + 8
    for name, got, want, absg in zip(("y", "dx", "dA", "dB", "dm"), (y, *grads), ref, _abs_graph(c), strict=True):
        bound = 4 * gamma(k, U64) * absg * 8  # both sides within gamma_k of exact; n's relative error enters g
        err = np.abs(got - want)
        assert np.all(err <= bound + 1e-300), (name, err.max(), bound.max())


@given(c=dora_case(), block_rows=st.integers(1, 5))
def test_forward_and_backward_do_not_depend_on_block_rows(c, block_rows):
    """DORA-2 (knob): block_rows changes only summation orders (BLAS picks its order by the block's shape; dx is
    accumulated over blocks), so y and every gradient agree within 2 gamma_k of the abs-graph on each side."""
    kw = _kw(c)
    y1 = dora_forward(c["x"], c["q"], c["A"], c["B"], c["m"], **kw)
    y2 = dora_forward(c["x"], c["q"], c["A"], c["B"], c["m"], block_rows=block_rows, **kw)
    k = c["q"].shape[1] + c["r"] + 8
    assert np.all(np.abs(y2 - y1) <= 4 * gamma(k, U64) * _abs_graph(c)[0] + 1e-300)  # BLAS order per block shape
    g1 = dora_backward(c["dy"], c["x"], c["q"], c["A"], c["B"], c["m"], **kw)
    g2 = dora_backward(c["dy"], c["x"], c["q"], c["A"], c["B"], c["m"], block_rows=block_rows, **kw)
    k += c["q"].shape[0] + c["x"].shape[0]
    for a, b, absg in zip(g1, g2, _abs_graph(c)[1:], strict=True):
        assert np.all(np.abs(a - b) <= 4 * gamma(k, U64) * absg + 1e-300)


# --- DORA-7: merge and boundary ------------------------------------------------------------------------------------


def test_merge_is_the_weight_the_forward_computes_with():
    """DORA-7: x W'^T with W' = dora_merge(...) equals the p = 0 forward within float32 rounding of W'."""
    rng = np.random.default_rng(5)
    q = qlora_ref.quantize_4bit(rng.standard_normal((6, 40)).astype(np.float32))
    A, B = (rng.standard_normal(s).astype(np.float32) * 0.3 for s in ((3, 40), (6, 3)))
    m = rng.uniform(0.5, 2, 6).astype(np.float32)
    x = rng.standard_normal((4, 40))
    Wm = dora_merge(q, A, B, m, alpha=6)
    y = dora_forward(x, q, A.astype(np.float64), B.astype(np.float64), m.astype(np.float64), alpha=6)
    bound = (U32 + gamma(50, U64)) * (np.abs(x) @ np.abs(Wm.astype(np.float64)).T) * 2
    assert np.all(np.abs(x @ Wm.T.astype(np.float64) - y) <= bound)


def test_boundary_errors_say_what_to_pass():
    """DORA-7: one ValueError/TypeError per bad input, naming what was expected."""
    rng = np.random.default_rng(0)
    q = qlora_ref.quantize_4bit(rng.standard_normal((4, 64)).astype(np.float32))
    A, B, m, x = np.zeros((2, 64)), np.zeros((4, 2)), np.ones(4), np.zeros((1, 64))
    with pytest.raises(ValueError, match="A must be"):
        dora_weight_norm(q, np.zeros((2, 63)), B, alpha=1)
    with pytest.raises(ValueError, match="block_rows"):
        dora_weight_norm(q, A, B, alpha=1, block_rows=0)
    with pytest.raises(ValueError, match="magnitude"):
        dora_forward(x, q, A, B, np.ones(3), alpha=1)
    with pytest.raises(TypeError, match="float32 or float64"):
        dora_forward(x.astype(np.int32), q, A, B, m, alpha=1)
    with pytest.raises(ValueError, match="keep"):
        dora_forward(x, q, A, B, m, alpha=1, p=0.5)
    with pytest.raises(ValueError, match="row range"):
        dequantize_rows(q, 3, 3)
    with pytest.raises(ValueError, match="2-D"):
        dora_init(qlora_ref.quantize_4bit(np.ones(64, np.float32)), A, B, alpha=1)
