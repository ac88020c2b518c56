"""LoRA (specs/lora.md): hand-derived gradients, merge, scaling, init and PEFT parity.

Tolerances (specs/lora.md, "Agreement"): every bound below is a floating-point error bound derived from the standard
model |fl(a op b) - a op b| <= u |a op b|, with gamma_k = k u / (1 - k u) for a length-k dot product, evaluated on the
absolute values of the operands ("abs-graph").  u64 = 2^-53, u32 = 2^-24.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qlora_ref import NonFiniteError, bf16_to_f32, f32_to_bf16
from qlora_ref.lora import dropout_keep, lora_backward, lora_forward, lora_init, lora_merge, lora_scaling

U64 = 2.0**-53
U32 = 2.0**-24


def gamma(k: int, u: float) -> float:
    return k * u / (1 - k * u)


@st.composite
def lora_case(draw, dyadic: bool = False):
    """Small shapes, a seed for the values, alpha, rsLoRA, and dropout p with its keep mask."""
    N = draw(st.integers(1, 4))
    fin = draw(st.integers(1, 6))
    fout = draw(st.integers(1, 6))
    r = draw(st.integers(1, 4))
    alpha = draw(st.sampled_from([0.5, 1.0, 8.0, 16.0, 3.0]))
    rslora = draw(st.booleans())
    p = draw(st.sampled_from([0.0, 0.1, 0.5]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def val(*shape):
        if dyadic:  # k / 2^12, |k| <= 2^13: x +- 2^-10 is exact, so finite differences see the true perturbation
            return rng.integers(-(2**13), 2**13 + 1, size=shape).astype(np.float64) / 2**12
        return rng.standard_normal(shape)

    x, W, A, B, G = val(N, fin), val(fout, fin), val(r, fin), val(fout, r), val(N, fout)
    keep = dropout_keep((N, fin), p, rng) if p > 0 else None
    return dict(x=x, W=W, A=A, B=B, G=G, alpha=alpha, rslora=rslora, p=p, keep=keep, r=r)


def _kw(c):
    return dict(alpha=c["alpha"], rslora=c["rslora"], p=c["p"], keep=c["keep"])


def _mask(c):
    return np.ones_like(c["x"]) if c["keep"] is None else c["keep"] / (1 - c["p"])


def _grad_abs_bounds(c, dy):
    """|computed - exact| bounds of (dx, dA, dB) from the abs-graph of LORA-4's formulas (float64)."""
    x, W, A, B, m = np.abs(c["x"]), np.abs(c["W"]), np.abs(c["A"]), np.abs(c["B"]), np.abs(_mask(c))
    s = lora_scaling(c["alpha"], c["r"], rslora=c["rslora"])
    ady = np.abs(dy)
    k = x.shape[0] + W.shape[0] + A.shape[0] + A.shape[1] + 6  # longest chain of roundings in any output
    x_d = x * m
    dx = ady @ W + s * ((ady @ B) @ A) * m
    dA = s * (ady @ B).T @ x_d
    dB = s * ady.T @ (x_d @ A.T)
    return gamma(k, U64) * dx, gamma(k, U64) * dA, gamma(k, U64) * dB


@given(lora_case(dyadic=True))
def test_lora4_gradients_match_central_differences(c):
    """LORA-4: dx, dA, dB equal float64 central differences of L = sum(y * G).

    L is linear in each of x, A, B separately, so a central difference has no truncation error: its only error is the
    rounding of the two evaluations of L, each <= gamma_k * L_abs (L_abs: L on absolute values, perturbed entries
    widened by h), divided by 2h.  Dyadic data make x +- h exact.
    """
    h = 2.0**-10
    kw = _kw(c)
    dx, dA, dB = lora_backward(c["G"], c["x"], c["W"], c["A"], c["B"], **kw)
    ex, eA, eB = _grad_abs_bounds(c, c["G"])

    s = lora_scaling(c["alpha"], c["r"], rslora=c["rslora"])
    absm = np.abs(_mask(c))
    L_abs = float(
        np.sum(
            np.abs(c["G"])
            * ((np.abs(c["x"]) + h) @ (np.abs(c["W"]) + h).T
               + s * (((np.abs(c["x"]) + h) * absm) @ (np.abs(c["A"]) + h).T) @ (np.abs(c["B"]) + h).T)
        )
    )  # fmt: skip
    k = c["x"].shape[1] + c["r"] + c["x"].shape[0] * c["W"].shape[0] + 6
    fd_err = gamma(k, U64) * L_abs / h

    def L(x, A, B):
        return float(np.sum(lora_forward(x, c["W"], A, B, **kw) * c["G"]))

    for name, analytic, err in (("x", dx, ex), ("A", dA, eA), ("B", dB, eB)):
        base = {"x": c["x"], "A": c["A"], "B": c["B"]}
        arr = base[name]
        for idx in np.ndindex(arr.shape):
            plus, minus = arr.copy(), arr.copy()
            plus[idx] += h
            minus[idx] -= h
            fd = (L(**{**base, name: plus}) - L(**{**base, name: minus})) / (2 * h)
            bound = fd_err + err[idx]
            assert abs(fd - analytic[idx]) <= bound, (name, idx, fd, analytic[idx], bound)


@given(lora_case())
def test_lora4_backward_matches_torch_autograd(c):
    """LORA-4: the hand-derived backward equals torch autograd of the same float64 graph within 2x the abs-graph
    bound (each side is within it of the exact value)."""
    kw = _kw(c)
    dx, dA, dB = lora_backward(c["G"], c["x"], c["W"], c["A"], c["B"], **kw)
    s = lora_scaling(c["alpha"], c["r"], rslora=c["rslora"])
    tx, tA, tB = (torch.tensor(c[k], requires_grad=True) for k in ("x", "A", "B"))
    tW, tm = torch.tensor(c["W"]), torch.tensor(_mask(c))
    y = tx @ tW.T + ((tx * tm) @ tA.T @ tB.T) * s
    y.backward(torch.tensor(c["G"]))
    for ours, theirs, err in zip((dx, dA, dB), (tx.grad, tA.grad, tB.grad), _grad_abs_bounds(c, c["G"]), strict=True):
        assert np.all(np.abs(ours - theirs.numpy()) <= 2 * err)


@given(lora_case())
def test_lora2_forward_matches_peft_linear(c):
    """LORA-2, LORA-1: y equals PEFT's LoRA-wrapped nn.Linear (float32, dropout 0) within 2 gamma_k |abs-graph|.

    PEFT scales the LoRA branch by its `scaling`, which must equal lora_scaling (alpha/r, or alpha/sqrt(r) with rsLoRA).
    """
    from peft import LoraConfig, inject_adapter_in_model

    x, W, A, B = (c[k].astype(np.float32) for k in ("x", "W", "A", "B"))
    fout, fin = W.shape
    model = torch.nn.Sequential(torch.nn.Linear(fin, fout, bias=False))
    model[0].weight.data = torch.from_numpy(W.copy())
    cfg = LoraConfig(r=c["r"], lora_alpha=c["alpha"], target_modules=["0"], lora_dropout=0.0, use_rslora=c["rslora"])
    model = inject_adapter_in_model(cfg, model)
    layer = model[0]
    assert layer.scaling["default"] == lora_scaling(c["alpha"], c["r"], rslora=c["rslora"])
    layer.lora_A["default"].weight.data = torch.from_numpy(A.copy())
    layer.lora_B["default"].weight.data = torch.from_numpy(B.copy())
    with torch.no_grad():
        theirs = model(torch.from_numpy(x)).numpy()
    ours = lora_forward(x, W, A, B, alpha=c["alpha"], rslora=c["rslora"])
    s = lora_scaling(c["alpha"], c["r"], rslora=c["rslora"])
    ax = np.abs(x).astype(np.float64)
    abs_graph = ax @ np.abs(W).T + s * (ax @ np.abs(A).T) @ np.abs(B).T
    k = fin + c["r"] + 4
    assert np.all(np.abs(ours.astype(np.float64) - theirs) <= 2 * gamma(k, U32) * abs_graph)


def test_lora1_rslora_scale_and_peft_scaling():
    """LORA-1: s = alpha/r, rsLoRA s = alpha/sqrt(r), both the very floats PEFT computes."""
    from peft import LoraConfig, inject_adapter_in_model

    for r, alpha in ((1, 1.0), (8, 16.0), (64, 16.0), (3, 7.0)):
        assert lora_scaling(alpha, r) == alpha / r
        assert lora_scaling(alpha, r, rslora=True) == alpha / math.sqrt(r)
        for rs in (False, True):
            m = inject_adapter_in_model(
                LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"], use_rslora=rs),
                torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False)),
            )
            assert m[0].scaling["default"] == lora_scaling(alpha, r, rslora=rs)
    # rsLoRA keeps the branch's scale as r grows: s * sqrt(r) is constant (alpha), while plain s * r is alpha.
    assert lora_scaling(16.0, 64, rslora=True) / lora_scaling(16.0, 64) == pytest.approx(8.0, rel=1e-15)


@given(lora_case())
def test_lora3_dropped_inputs_get_only_the_base_gradient(c):
    """LORA-3: where keep is False the LoRA branch never sees x: dx there is exactly dy W, and changing x there
    changes neither dA nor the LoRA branch's share of y."""
    if c["p"] == 0.0:
        c = {**c, "p": 0.5, "keep": dropout_keep(c["x"].shape, 0.5, np.random.default_rng(0))}
    kw = _kw(c)
    dx, dA, dB = lora_backward(c["G"], c["x"], c["W"], c["A"], c["B"], **kw)
    dropped = ~c["keep"]
    assert np.array_equal(dx[dropped], (c["G"] @ c["W"])[dropped])
    x2 = np.where(dropped, c["x"] * 3.0 + 1.0, c["x"])
    dx2, dA2, dB2 = lora_backward(c["G"], x2, c["W"], c["A"], c["B"], **kw)
    assert np.array_equal(dA2, dA) and np.array_equal(dB2, dB)


def test_lora3_inverted_dropout_mask_has_mean_one():
    """LORA-3: mask = keep/(1-p) has expectation 1 (checked to 6 standard errors on 200k draws)."""
    for p in (0.05, 0.1, 0.5):
        keep = dropout_keep((200_000,), p, np.random.default_rng(1))
        mask = keep / (1 - p)
        se = math.sqrt(p / (1 - p) / keep.size)
        assert abs(mask.mean() - 1) <= 6 * se


def test_lora5_init_matches_peft_default_and_gaussian():
    """LORA-5: A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform_(a=sqrt(5))), gaussian std 1/r, B = 0.

    Checked on PEFT's own initialised layer and on ours: the bound holds, the range is used (max |A| > 0.99 bound:
    probability 0.99^16384 that it fails), and the gaussian std is within 5% (~9 standard errors at n = 16384).
    """
    from peft import LoraConfig, inject_adapter_in_model

    fin, fout, r = 256, 32, 64
    bound = 1 / math.sqrt(fin)
    torch.manual_seed(0)
    for init in (True, "gaussian"):
        m = inject_adapter_in_model(
            LoraConfig(r=r, lora_alpha=16, target_modules=["0"], init_lora_weights=init),
            torch.nn.Sequential(torch.nn.Linear(fin, fout, bias=False)),
        )
        tA = m[0].lora_A["default"].weight.detach().numpy()
        assert not m[0].lora_B["default"].weight.detach().numpy().any()
        A, B = lora_init(fin, fout, r, rng=np.random.default_rng(0), init="kaiming_uniform" if init is True else init)
        assert A.shape == tA.shape == (r, fin) and B.shape == (fout, r) and not B.any() and A.dtype == np.float32
        for a in (A, tA):
            if init is True:
                assert np.abs(a).max() <= bound and np.abs(a).max() > 0.99 * bound
            else:
                assert abs(a.std() - 1 / r) <= 0.05 / r


# --- merge ----------------------------------------------------------------------------------------------------------

UNIT = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-24}  # unit roundoff of T
TINY = {"bfloat16": 2.0**-134, "float16": 2.0**-25, "float32": 2.0**-150}  # half the smallest subnormal of T


def _weight(rng, shape, dtype):
    w32 = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    if dtype == "bfloat16":
        return f32_to_bf16(w32)
    return w32.astype(dtype)


def _decode(w, dtype):
    return (bf16_to_f32(w) if dtype == "bfloat16" else w).astype(np.float64)


@st.composite
def merge_case(draw):
    dtype = draw(st.sampled_from(["bfloat16", "float16", "float32"]))
    c = draw(lora_case())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    W = _weight(rng, c["W"].shape, dtype)
    A = (c["A"] * 0.1).astype(np.float32)
    B = (c["B"] * 0.01).astype(np.float32)
    return dict(c, W=W, A=A, B=B, dtype=dtype)


@given(merge_case())
def test_lora6_merge_is_one_rounding_of_the_float64_sum(c):
    """LORA-6: merged = nearest T to D = W + s*B@A (formed in float64): no neighbour of merged is closer to D."""
    dtype = c["dtype"]
    s = lora_scaling(c["alpha"], c["r"], rslora=c["rslora"])
    merged = lora_merge(c["W"], c["A"], c["B"], alpha=c["alpha"], rslora=c["rslora"])
    assert merged.dtype == c["W"].dtype and merged.shape == c["W"].shape
    D = _decode(c["W"], dtype) + s * (c["B"].astype(np.float64) @ c["A"].astype(np.float64))
    M = _decode(merged, dtype)
    if dtype == "bfloat16":
        nbrs = [bf16_to_f32((merged.astype(np.int32) + d).astype(np.uint16)).astype(np.float64) for d in (-1, 1)]
    else:
        ft = np.dtype(dtype).type
        nbrs = [
            np.nextafter(merged, ft(np.inf)).astype(np.float64),
            np.nextafter(merged, ft(-np.inf)).astype(np.float64),
        ]
    for nb in nbrs:
        ok = ~np.isfinite(nb) | (np.abs(M - D) <= np.abs(nb - D))
        assert ok.all(), (D[~ok], M[~ok], nb[~ok])


def test_lora6_merge_avoids_double_rounding():
    """LORA-6 pinned: D = 1 + 2^-8 + 2^-30 lies just above a bf16 tie.  Rounding to float32 first lands on the tie
    (1 + 2^-8), which then rounds to even (1.0); the single rounding gives 1 + 2^-7 (bf16 bits 0x3F81)."""
    W = f32_to_bf16(np.array([[1.0]], np.float32))
    A = np.array([[2.0**-8 + 2.0**-30]], np.float32)
    B = np.array([[1.0]], np.float32)
    merged = lora_merge(W, A, B, alpha=1.0, dtype="bfloat16")
    assert merged.tolist() == [[0x3F81]]
    assert f32_to_bf16(np.float32(1.0) + A[0, 0]).item() == 0x3F80  # the double rounding this avoids
    # ml_dtypes bfloat16 arrays are accepted as W and come back as bits
    ml_dtypes = pytest.importorskip("ml_dtypes")
    assert lora_merge(W.view(ml_dtypes.bfloat16), A, B, alpha=1.0).tolist() == [[0x3F81]]


@given(merge_case())
def test_lora6_merged_weight_reproduces_forward(c):
    """LORA-6 == LORA-2: x @ merged^T equals lora_forward(x, W, A, B) (float64, no dropout) within
    u_T |x| @ |D|^T + TINY_T * sum|x| (merge rounding) + 2 gamma_k abs-graph (float64 matmuls)."""
    dtype = c["dtype"]
    x = c["x"]
    s = lora_scaling(c["alpha"], c["r"], rslora=c["rslora"])
    merged = lora_merge(c["W"], c["A"], c["B"], alpha=c["alpha"], rslora=c["rslora"])
    y_merged = x @ _decode(merged, dtype).T
    A64, B64 = c["A"].astype(np.float64), c["B"].astype(np.float64)
    y = lora_forward(x, c["W"], A64, B64, alpha=c["alpha"], rslora=c["rslora"])
    W64 = _decode(c["W"], dtype)
    D = W64 + s * (B64 @ A64)
    ax = np.abs(x)
    bound = UNIT[dtype] * (ax @ np.abs(D).T) + TINY[dtype] * ax.sum(axis=1, keepdims=True)
    k = x.shape[1] + c["r"] + 6
    bound += 2 * gamma(k, U64) * (ax @ np.abs(W64).T + s * (ax @ np.abs(A64).T) @ np.abs(B64).T)
    assert np.all(np.abs(y_merged - y) <= bound)


# --- boundary errors ------------------------------------------------------------------------------------------------


def _ok():
    rng = np.random.default_rng(0)
    return dict(
        x=rng.standard_normal((2, 4)).astype(np.float32),
        W=rng.standard_normal((3, 4)).astype(np.float32),
        A=rng.standard_normal((2, 4)).astype(np.float32),
        B=rng.standard_normal((3, 2)).astype(np.float32),
    )


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(A=np.zeros((2, 5), np.float32)), ValueError, "shape mismatch"),
        (dict(B=np.zeros((3, 3), np.float32)), ValueError, "shape mismatch"),
        (dict(x=np.zeros((2, 5), np.float32)), ValueError, "shape mismatch"),
        (dict(x=np.zeros((2, 4), np.float16)), TypeError, "float32 or float64"),
        (dict(A=np.zeros((2, 4), np.float64)), TypeError, "x's dtype"),
        (dict(W=np.zeros((3, 4), np.int32)), TypeError, "W must be"),
        (dict(W=np.zeros(4, np.float32)), ValueError, "ndim"),
    ],
)
def test_lora_rejects_bad_shapes_and_dtypes(change, exc, match):
    """LORA-7: shapes follow PEFT (A [r, in], B [out, r]); dtypes must agree; the message names what was received."""
    args = {**_ok(), **change}
    with pytest.raises(exc, match=match):
        lora_forward(args["x"], args["W"], args["A"], args["B"], alpha=16)


def test_lora_rejects_bad_dropout_and_scalars():
    """LORA-7: p in [0, 1); a keep mask exactly when p > 0, bool and of x's shape; alpha > 0; r >= 1."""
    a = _ok()
    call = lambda **kw: lora_forward(a["x"], a["W"], a["A"], a["B"], **{"alpha": 16, **kw})  # noqa: E731
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        call(p=1.0, keep=np.ones((2, 4), bool))
    with pytest.raises(ValueError, match="explicit keep mask"):
        call(p=0.1)
    with pytest.raises(ValueError, match="p == 0"):
        call(keep=np.ones((2, 4), bool))
    with pytest.raises(ValueError, match="bool array"):
        call(p=0.1, keep=np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="bool array"):
        call(p=0.1, keep=np.ones((4, 2), bool))
    with pytest.raises(ValueError, match="alpha"):
        call(alpha=0.0)
    with pytest.raises(ValueError, match="rank r"):
        lora_scaling(16, 0)
    with pytest.raises(ValueError, match="dy must have"):
        lora_backward(np.zeros((2, 4), np.float32), a["x"], a["W"], a["A"], a["B"], alpha=16)
    with pytest.raises(ValueError, match="init must be"):
        lora_init(4, 3, 2, rng=np.random.default_rng(0), init="zeros")
    with pytest.raises(TypeError, match="Generator"):
        lora_init(4, 3, 2, rng=0)


def test_lora_merge_rejects_nonfinite_and_wrong_dtypes():
    """LORA-7: merge refuses NaN/Inf (NonFiniteError, a ValueError naming the count and first index) and non-float32
    adapters; uint16 weights must be declared bfloat16."""
    a = _ok()
    bad = a["A"].copy()
    bad[1, 2] = np.nan
    with pytest.raises(NonFiniteError, match=r"1 non-finite.*index 6"):
        lora_merge(a["W"], bad, a["B"], alpha=16)
    with pytest.raises(TypeError, match="float32"):
        lora_merge(a["W"], a["A"].astype(np.float64), a["B"], alpha=16)
    with pytest.raises(TypeError, match="bfloat16"):
        lora_merge(f32_to_bf16(a["W"]), a["A"], a["B"], alpha=16, dtype="float16")
    with pytest.raises(ValueError, match=r"A must be \[r, 4\]"):
        lora_merge(a["W"], a["A"].T.copy(), a["B"], alpha=16)
