"""AdamW (specs/adamw.md): the 32-bit step against torch.optim.AdamW, decay placement, 8-bit state, clipping, errors.

Every tolerance is a derived error bound (specs/adamw.md, "Agreement"), carried step by step along the trajectory:
each floating-point operation contributes u |result| (u = 2^-24), plus 2^-149 for a possible underflow, and the
scalar discrepancies between the two implementations (their float32 coefficients) are taken exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qlora_ref import NonFiniteError, dynamic_map
from qlora_ref.adamw import AdamW8bitState, adam_scalars, adamw_step, adamw_step_8bit, clip_grad_norm

U = 2.0**-24
ETA = 2.0**-149  # absolute error of one float32 operation that underflows
f32 = np.float32


def gamma(k: int) -> float:
    return k * U / (1 - k * U)


@st.composite
def adam_case(draw):
    """A short training run: hyperparameters, a gradient scale, and per-step gradients with some exact zeros."""
    n = draw(st.integers(1, 70))
    steps = draw(st.integers(1, 40))
    lr = draw(st.floats(1e-5, 1e-1))
    b1 = draw(st.sampled_from([0.5, 0.8, 0.9, 0.95, 0.99]))
    b2 = draw(st.sampled_from([0.9, 0.99, 0.999, 0.9999]))
    eps = draw(st.sampled_from([1e-8, 1e-6, 1e-3]))
    wd = draw(st.sampled_from([0.0, 1e-2, 0.1]))
    scale = 10.0 ** draw(st.integers(-3, 2))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    p0 = rng.standard_normal(n).astype(np.float32)
    grads = (rng.standard_normal((steps, n)) * scale).astype(np.float32)
    grads[rng.random((steps, n)) < 0.1] = 0.0
    return dict(p0=p0, grads=grads, lr=lr, betas=(b1, b2), eps=eps, wd=wd)


def _torch_run(c):
    """torch.optim.AdamW, single-tensor path (foreach=False), float32; yields (p, m, v) after each step."""
    p = torch.nn.Parameter(torch.from_numpy(c["p0"].copy()))
    opt = torch.optim.AdamW([p], lr=c["lr"], betas=c["betas"], eps=c["eps"], weight_decay=c["wd"], foreach=False)
    for g in c["grads"]:
        p.grad = torch.from_numpy(g.copy())
        opt.step()
        st_ = opt.state[p]
        yield p.detach().numpy().copy(), st_["exp_avg"].numpy().copy(), st_["exp_avg_sq"].numpy().copy()


@given(adam_case())
def test_adamw5_32bit_matches_torch_adamw_within_derived_bound(c):
    """ADAMW-2, ADAMW-5: adamw_step(decay="before") vs torch.optim.AdamW, every element and step, within D_m, D_v, D_p.

    With b1f = f32(beta1), a1 = 1 - b1f (exact), w = f32(1 - beta1) torch's lerp weight, a2 = 1 - f32(beta2),
    c = f32(1 - beta2) torch's addcmul value, the per-element differences obey (specs/adamw.md ADAMW-5):
      D_m' = b1f D_m + |a1 - w| |g - m_t| + u(b1f|m_o| + a1|g| + |m_o'|) + 2u w |g - m_t| + u|m_t'| + 6 eta
      D_v' = b2f D_v + |a2 - c| g^2 + u(b2f|v_o| + 2 a2 g^2 + |v_o'|) + u(b2f|v_t| + 2 c g^2 + |v_t'|) + 8 eta
      D_p' = (D_p d_o + |d_o - d_t||p_t| + u(|p1_o| + |p1_t|)) + |U_o - U_t| + u(|p_o'| + |p_t'|) + 4 eta
    where |U_o - U_t| <= gamma4|U~_o| + gamma6|U~_t| + |S|(D_m/(sqrt v_o + E) + |m_t| dsqrt/((sqrt v_o+E)(sqrt v_t+E)))
    + |U~(m_t, v_t) - U~_t| (the exact scalar discrepancy), dsqrt = min(sqrt D_v, D_v/(sqrt v_o + sqrt v_t)).
    """
    b1, b2 = c["betas"]
    lr, eps, wd = c["lr"], c["eps"], c["wd"]
    b1f, b2f = f32(b1), f32(b2)
    a1, a2 = float(f32(1) - b1f), float(f32(1) - b2f)
    w, cv = float(f32(1 - b1)), float(f32(1 - b2))
    b1f, b2f = float(b1f), float(b2f)
    d_o = float(f32(1) - f32(lr) * f32(wd))
    d_t = float(f32(1 - lr * wd)) if wd else 1.0

    p_o, m_o, v_o = c["p0"], np.zeros_like(c["p0"]), np.zeros_like(c["p0"])
    m_t_prev = np.zeros(c["p0"].shape)
    v_t_prev = np.zeros(c["p0"].shape)
    p_t_prev = c["p0"].astype(np.float64)
    Dm = Dv = Dp = np.zeros(c["p0"].shape)
    for t, (g, (p_t, m_t, v_t)) in enumerate(zip(c["grads"], _torch_run(c), strict=True), start=1):
        m_prev, v_prev, p_prev = m_o.astype(np.float64), v_o.astype(np.float64), p_o.astype(np.float64)
        p_o, m_o, v_o = adamw_step(p_o, g, m_o, v_o, t, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, decay="before")
        g64 = g.astype(np.float64)
        mo, vo, po = m_o.astype(np.float64), v_o.astype(np.float64), p_o.astype(np.float64)
        mt, vt, pt = m_t.astype(np.float64), v_t.astype(np.float64), p_t.astype(np.float64)

        gm = np.abs(g64 - m_t_prev)
        Dm = (b1f * Dm + abs(a1 - w) * gm + U * (b1f * np.abs(m_prev) + a1 * np.abs(g64) + np.abs(mo))
              + 2 * U * w * gm * (1 + U) + U * np.abs(mt) + 6 * ETA)  # fmt: skip
        g2 = g64 * g64
        Dv = (b2f * Dv + abs(a2 - cv) * g2 + abs(b2 - b2f) * v_t_prev
              + U * (b2f * v_prev + 2 * a2 * g2 + vo) + U * (b2f * v_t_prev + 2 * cv * g2 + vt) + 8 * ETA)  # fmt: skip

        # the update U = step_size * m / (sqrt(v) + E): ours with float32 scalars, torch's with its own
        _, c2, S = (float(s) for s in adam_scalars(f32(t), f32(lr), f32(b1), f32(b2)))
        E = float(f32(eps) * f32(c2))
        bc1, sb2 = 1 - b1**t, math.sqrt(1 - b2**t)
        V, B2, epsf = float(f32(-lr / bc1)), float(f32(sb2)), float(f32(eps))
        den_o, den_t = np.sqrt(vo) + E, np.sqrt(vt) + E
        U_o = S * mo / den_o
        U_t = V * B2 * mt / (np.sqrt(vt) + epsf * B2)
        scalar_gap = np.abs(S * mt / den_t - U_t) + 1e-14 * np.abs(U_t)  # float64 evaluation of a difference
        sq_o, sq_t = np.sqrt(vo), np.sqrt(vt)
        with np.errstate(divide="ignore", invalid="ignore"):
            dsqrt = np.minimum(np.sqrt(Dv), np.where(sq_o + sq_t > 0, Dv / (sq_o + sq_t), np.inf))
        dU = (gamma(4) * np.abs(U_o) + gamma(6) * np.abs(U_t) + scalar_gap
              + abs(S) * (Dm / den_o + np.abs(mt) * dsqrt / (den_o * den_t)))  # fmt: skip
        p1_o, p1_t = p_prev * d_o, p_t_prev * d_t
        Dp = (Dp * d_o + abs(d_o - d_t) * np.abs(p_t_prev) + U * (np.abs(p1_o) + np.abs(p1_t))
              + dU + U * (np.abs(po) + np.abs(pt)) + 4 * ETA)  # fmt: skip

        for name, ours, theirs, D in (("m", mo, mt, Dm), ("v", vo, vt, Dv), ("p", po, pt, Dp)):
            bad = np.abs(ours - theirs) > D * (1 + 1e-9)
            assert not bad.any(), (name, t, ours[bad], theirs[bad], D[bad])
        m_t_prev, v_t_prev, p_t_prev = mt, vt, pt


@given(adam_case())
def test_adamw4_decay_placement_differs_by_lr2_wd(c):
    """ADAMW-3, ADAMW-4: from the same (p, m, v, g), decay="after" (bitsandbytes) - decay="before" (torch) = U (d - 1)
    + rounding, with U the shared Adam update and d = f32(1 - lr wd); so |difference| <= |U| (lr wd + |d - 1 + lr wd|)
    + 2u(|p_a| + |p_b| + |p + U|) + 4 eta, and |U| <= lr |m_hat| / (sqrt(v_hat) + eps) (1 + gamma5): O(lr^2 wd)."""
    b1, b2 = c["betas"]
    lr, wd = c["lr"], max(c["wd"], 1e-2)
    rng = np.random.default_rng(0)
    p = c["p0"]
    g = c["grads"][0]
    m = (rng.standard_normal(p.shape) * 0.1).astype(np.float32)
    v = (rng.random(p.shape) * 0.01).astype(np.float32)
    t = len(c["grads"])
    kw = dict(lr=lr, betas=(b1, b2), eps=c["eps"], weight_decay=wd)
    p_a, m_a, v_a = adamw_step(p, g, m, v, t, decay="after", **kw)
    p_b, m_b, v_b = adamw_step(p, g, m, v, t, decay="before", **kw)
    assert np.array_equal(m_a, m_b) and np.array_equal(v_a, v_b)  # the moments never see p
    d = float(f32(1) - f32(lr) * f32(wd))
    b1f, b2f = float(f32(b1)), float(f32(b2))  # the spec's betas are float32: 1 - f32(0.9999) is 6e-4 off 1e-4
    c1, c2 = 1 - b1f**t, math.sqrt(1 - b2f**t)
    m_hat, v_hat = m_a.astype(np.float64) / c1, v_a.astype(np.float64) / c2**2
    U_bound = lr * np.abs(m_hat) / (np.sqrt(v_hat) + c["eps"]) * (1 + gamma(5) + 1e-6)
    p64 = p.astype(np.float64)
    bound = U_bound * (lr * wd + abs(d - 1 + lr * wd)) + 2 * U * (np.abs(p_a) + np.abs(p_b) + np.abs(p64) + U_bound)
    bound += 4 * ETA
    assert np.all(np.abs(p_a.astype(np.float64) - p_b) <= bound)


@given(st.integers(1, 600), st.integers(0, 2**32 - 1), st.sampled_from([1e-4, 1e-2]))
def test_adamw1_first_step_moves_each_weight_by_lr_times_g_over_abs_g(n, seed, lr):
    """ADAMW-1: from zero state, t = 1: p' = p - lr g / (|g| + eps) (bias correction cancels exactly: c1 = 1 - b1f
    is the very a1 in m = a1 g), within gamma12 |step| + u |p'|: 11 roundings reach the step (lr, c2 twice, S's
    product and quotient, m, v's two, sqrt, eps*c2, the add, the quotient, the product) and one the add to p."""
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n).astype(np.float32)
    g = (rng.standard_normal(n) * 10.0 ** rng.integers(-3, 3)).astype(np.float32)
    z = np.zeros(n, np.float32)
    p1, _, _ = adamw_step(p, g, z, z, 1, lr=lr)
    g64 = g.astype(np.float64)
    step = lr * g64 / (np.abs(g64) + 1e-8)
    assert np.all(np.abs(p1 - (p - step)) <= gamma(12) * np.abs(step) + U * np.abs(p1))


# --- 8-bit state ----------------------------------------------------------------------------------------------------


def _nearest_dist(ratio: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Distance from each ratio to the nearest entry of the (sorted) code, float64."""
    code64 = code.astype(np.float64)
    k = np.clip(np.searchsorted(code64, ratio), 1, code64.size - 1)
    return np.minimum(np.abs(ratio - code64[k - 1]), np.abs(ratio - code64[k]))


def _roundtrip_bound(x: np.ndarray, absmax: np.ndarray, code: np.ndarray) -> np.ndarray:
    """ADAMW-6: |dequant(quant(x)) - x| <= absmax (dist(x/absmax, code) + 5u) + u |x_hat|, per element.

    The quantizer picks the nearest code to y = x * f32(1/absmax) (2 roundings, 2u|y|) up to the float32 rounding of
    the midpoints (u); decoding rounds once (u |x_hat|); dist is 1-Lipschitz, so the three add to 5u absmax + u|x_hat|.
    """
    a = np.repeat(absmax.astype(np.float64), 256)[: x.size]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(a > 0, x.astype(np.float64) / a, 0.0)
    return a * (_nearest_dist(ratio, code) + 5 * U) + U * (np.abs(x) * (1 + 0.01)) + ETA


@given(st.integers(1, 1100), st.integers(0, 2**32 - 1), st.integers(-6, 3))
def test_adamw6_state_roundtrip_within_nearest_code_bound(n, seed, e):
    """ADAMW-6: quantize then dequantize m (signed map) and v (unsigned map) is within the nearest-code bound, and the
    coarse bound: |error| <= 0.0071 absmax for m (largest half-gap 0.00703, the cell [-1, code[0]]), and
    max-half-gap(unsigned) absmax for v.  All-zero blocks stay exactly zero."""
    rng = np.random.default_rng(seed)
    m = (rng.standard_normal(n) * 10.0**e).astype(np.float32)
    v = (rng.random(n) ** 4 * 10.0 ** (2 * e)).astype(np.float32)
    m[rng.random(n) < 0.05] = 0.0
    if n > 256:
        m[:256] = 0.0  # an all-zero block
    state = AdamW8bitState.quantize(m, v)
    m_hat, v_hat = state.dequantize()
    sm, uv = dynamic_map(signed=True), dynamic_map(signed=False)
    assert np.all(np.abs(m_hat - m) <= _roundtrip_bound(m, state.m_absmax, sm))
    assert np.all(np.abs(v_hat - v) <= _roundtrip_bound(v, state.v_absmax, uv))
    am = np.repeat(state.m_absmax, 256)[:n]
    av = np.repeat(state.v_absmax, 256)[:n]
    half_gap_v = np.diff(uv.astype(np.float64)).max() / 2
    assert np.all(np.abs(m_hat - m) <= am * (0.0071 + 5 * U) + U * np.abs(m))
    assert np.all(np.abs(v_hat - v) <= av * (half_gap_v + 5 * U) + U * np.abs(v))
    if n > 256:
        assert not m_hat[:256].any()


@given(adam_case())
def test_adamw7_8bit_tracks_32bit_within_quantization_bound(c):
    """ADAMW-7, ADAMW-8: the first 8-bit step equals the 32-bit step bit for bit (zero state dequantizes to 0); after
    that the difference obeys the recursion of ADAMW-5 with the requantization error Q (ADAMW-6) injected each step:
      D_m' = b1f (D_m + Q_m) + u(b1f(|m8| + |m32|) + 2 a1 |g| + |m8'| + |m32'|) + 6 eta      (likewise v, with g^2)
      D_p' = d D_p + |S| (D_m/(sqrt v8' + E) + |m32'| dsqrt/((sqrt v8'+E)(sqrt v32'+E))) + gamma4(|U8| + |U32|)
             + u(|p8'| + |p32'|)(1 + 1/d)(1 + 2u) + 4 eta     (decay after: p' = (p + U) d)
    """
    b1, b2 = c["betas"]
    lr, eps, wd = c["lr"], c["eps"], c["wd"]
    kw = dict(lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    b1f, b2f = float(f32(b1)), float(f32(b2))
    a1, a2 = float(f32(1) - f32(b1)), float(f32(1) - f32(b2))
    d = float(f32(1) - f32(lr) * f32(wd))
    sm, uv = dynamic_map(signed=True), dynamic_map(signed=False)
    n = c["p0"].size
    p8, state = c["p0"], AdamW8bitState.zeros(n)
    p32, m32, v32 = c["p0"], np.zeros(n, np.float32), np.zeros(n, np.float32)
    Dm = Dv = Dp = m8_unq = v8_unq = np.zeros(n)  # m8_unq, v8_unq: the float32 moments before requantization
    for t, g in enumerate(c["grads"], start=1):
        m8q, v8q = state.dequantize()
        Qm = np.abs(m8q.astype(np.float64) - m8_unq)
        Qv = np.abs(v8q.astype(np.float64) - v8_unq)
        if t > 1:  # the observed requantization error stays inside its ADAMW-6 bound
            assert np.all(Qm <= _roundtrip_bound(m8_unq, state.m_absmax, sm))
            assert np.all(Qv <= _roundtrip_bound(v8_unq, state.v_absmax, uv))
        p8_prev, m32_prev, v32_prev = p8, m32, v32
        p8, state = adamw_step_8bit(p8, g, state, t, **kw)
        p32, m32, v32 = adamw_step(p32, g, m32, v32, t, **kw)
        # the float32 moments the 8-bit step used for its update, before requantization
        _, m8_new, v8_new = adamw_step(p8_prev, g, m8q, v8q, t, **kw)
        m8_unq, v8_unq = m8_new.astype(np.float64), v8_new.astype(np.float64)
        if t == 1:
            assert np.array_equal(p8, p32)
        g64 = np.abs(g.astype(np.float64))
        Dm = b1f * (Dm + Qm) + U * (b1f * (np.abs(m8q) + np.abs(m32_prev)) + 2 * a1 * g64
                                    + np.abs(m8_unq) + np.abs(m32)) + 6 * ETA  # fmt: skip
        Dv = b2f * (Dv + Qv) + U * (b2f * (v8q + v32_prev) + 4 * a2 * g64**2 + v8_unq + v32) + 8 * ETA
        _, c2, S = (float(s) for s in adam_scalars(f32(t), f32(lr), f32(b1), f32(b2)))
        E = float(f32(eps) * f32(c2))
        s8, s32 = np.sqrt(v8_unq), np.sqrt(v32.astype(np.float64))
        with np.errstate(divide="ignore", invalid="ignore"):
            dsqrt = np.minimum(np.sqrt(Dv), np.where(s8 + s32 > 0, Dv / (s8 + s32), np.inf))
        U8, U32 = S * m8_unq / (s8 + E), S * m32.astype(np.float64) / (s32 + E)
        dU = abs(S) * (Dm / (s8 + E) + np.abs(m32) * dsqrt / ((s8 + E) * (s32 + E))) + gamma(4) * (
            np.abs(U8) + np.abs(U32)
        )
        Dp = d * Dp + dU + U * (np.abs(p8) + np.abs(p32)) * (1 + 1 / d) * (1 + 2 * U) + 4 * ETA
        assert np.all(np.abs(m8_unq - m32) <= Dm * (1 + 1e-9)), t
        assert np.all(np.abs(v8_unq - v32) <= Dv * (1 + 1e-9)), t
        assert np.all(np.abs(p8.astype(np.float64) - p32) <= Dp * (1 + 1e-9)), t


def test_adamw6_zero_state_layout():
    """ADAMW-6: zeros(n) is bitsandbytes' zero-filled layout: n codes each, ceil(n/256) absmax, all decoding to 0."""
    s = AdamW8bitState.zeros(257)
    assert s.m_codes.shape == s.v_codes.shape == (257,) and s.m_absmax.shape == s.v_absmax.shape == (2,)
    assert s.m_codes.dtype == np.uint8 and s.m_absmax.dtype == np.float32 and s.blocksize == 256
    m, v = s.dequantize()
    assert not m.any() and not v.any()


# --- clipping -------------------------------------------------------------------------------------------------------


@st.composite
def grad_lists(draw):
    k = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = 10.0 ** draw(st.integers(-3, 3))
    grads = [(rng.standard_normal(draw(st.integers(1, 300))) * scale).astype(np.float32) for _ in range(k)]
    norm = math.sqrt(sum(float(np.sum(gi.astype(np.float64) ** 2)) for gi in grads))
    max_norm = draw(st.sampled_from([0.3, 1.0])) * (norm * draw(st.sampled_from([0.1, 0.5, 1.0, 2.0])) or 1.0)
    return grads, max_norm


@given(grad_lists())
def test_adamw10_clip_grad_norm_matches_torch(case):
    """ADAMW-10: norm and clipped grads vs torch.nn.utils.clip_grad_norm_ (float32, any summation order).

    torch's norm of norms sums n and then k positive terms: relative error <= (n_max + k)/2 u + 4u; ours is one
    rounding (u).  coef = max_norm/(norm + 1e-6): torch rounds the add, reciprocal, product, ours the add and divide,
    so |coef_o - coef_t| <= coef (rel_o + rel_t + 5u); the clipped values differ by |g| (that + 2u)."""
    grads, max_norm = case
    ours, norm = clip_grad_norm(grads, max_norm)
    tg = [torch.nn.Parameter(torch.from_numpy(gi.copy())) for gi in grads]
    for p, gi in zip(tg, grads, strict=True):
        p.grad = torch.from_numpy(gi.copy())
    tnorm = float(torch.nn.utils.clip_grad_norm_(tg, max_norm))
    n_max, k = max(gi.size for gi in grads), len(grads)
    rel_t = (n_max + k) / 2 * U + 4 * U
    exact = math.sqrt(sum(float(np.sum(gi.astype(np.float64) ** 2)) for gi in grads))
    assert abs(float(norm) - exact) <= U * exact * (1 + 1e-9)
    assert abs(float(norm) - tnorm) <= (U + rel_t) * exact
    coef = min(1.0, max_norm / (exact + 1e-6))
    for ours_i, p, gi in zip(ours, tg, grads, strict=True):
        bound = np.abs(gi) * coef * (2 * U + rel_t + 5 * U + 2 * U) + ETA
        assert ours_i.dtype == np.float32 and np.all(np.abs(ours_i - p.grad.numpy()) <= bound)
    clipped_norm = math.sqrt(sum(float(np.sum(o.astype(np.float64) ** 2)) for o in ours))
    assert clipped_norm <= max_norm * (1 + 8 * U) or coef == 1.0


# --- boundary errors ------------------------------------------------------------------------------------------------


def _arrays(n=5):
    z = np.zeros(n, np.float32)
    return np.ones(n, np.float32), np.full(n, 0.5, np.float32), z, z.copy()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(t=0), ValueError, "t must be an integer >= 1"),
        (dict(t=True), ValueError, "t must be an integer"),
        (dict(t=1.0), ValueError, "t must be an integer"),
        (dict(lr=-1e-3), ValueError, "lr must be in"),
        (dict(lr=float("nan")), ValueError, "lr must be in"),
        (dict(betas=(1.0, 0.999)), ValueError, "beta1 must be in"),
        (dict(betas=(0.9, -0.1)), ValueError, "beta2 must be in"),
        (dict(betas=(0.9,)), ValueError, "betas must be a pair"),
        (dict(eps=-1.0), ValueError, "eps must be in"),
        (dict(weight_decay=-0.1), ValueError, "weight_decay must be in"),
        (dict(decay="middle"), ValueError, "decay must be"),
    ],
)
def test_adamw11_rejects_bad_hyperparameters(kwargs, exc, match):
    """ADAMW-11: t >= 1, lr/eps/weight_decay >= 0, betas in [0, 1), decay "after" | "before"."""
    p, g, m, v = _arrays()
    call = {"t": 1, "lr": 1e-3, **kwargs}
    t = call.pop("t")
    with pytest.raises(exc, match=match):
        adamw_step(p, g, m, v, t, **call)


def test_adamw11_rejects_bad_arrays_and_states():
    """ADAMW-11: float32 arrays of one shape; an 8-bit state whose size and layout match p."""
    p, g, m, v = _arrays()
    with pytest.raises(TypeError, match="float32"):
        adamw_step(p.astype(np.float64), g, m, v, 1, lr=1e-3)
    with pytest.raises(ValueError, match="shape"):
        adamw_step(p, g[:4], m, v, 1, lr=1e-3)
    with pytest.raises(TypeError, match="numpy float32 array"):
        adamw_step(p.tolist(), g, m, v, 1, lr=1e-3)
    with pytest.raises(ValueError, match="state holds 6 values but p has 5"):
        adamw_step_8bit(p, g, AdamW8bitState.zeros(6), 1, lr=1e-3)
    with pytest.raises(TypeError, match="AdamW8bitState"):
        adamw_step_8bit(p, g, (m, v), 1, lr=1e-3)
    with pytest.raises(ValueError, match=r"m_absmax must be float32\[1\]"):
        AdamW8bitState(np.zeros(5, np.uint8), np.zeros(2, np.float32), np.zeros(5, np.uint8), np.zeros(1, np.float32))
    with pytest.raises(ValueError, match="positive integer"):
        AdamW8bitState.zeros(0)
    with pytest.raises(TypeError, match="list/tuple"):
        clip_grad_norm(g, 1.0)
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm([g], 0.0)


@pytest.mark.parametrize("where", ["adamw", "adamw8", "clip"])
def test_adamw12_nonfinite_gradient_raises_with_count_and_first_index(where):
    """ADAMW-12: NaN/Inf gradients raise NonFiniteError (a ValueError) naming how many and the first flat index;
    the state is never written (inputs are untouched by construction)."""
    p, g, m, v = _arrays(8)
    g = g.copy()
    g[3], g[6] = np.nan, np.inf
    with pytest.raises(NonFiniteError, match=r"2 non-finite value\(s\).*flat index 3") as info:
        if where == "adamw":
            adamw_step(p, g, m, v, 1, lr=1e-3)
        elif where == "adamw8":
            adamw_step_8bit(p, g, AdamW8bitState.zeros(8), 1, lr=1e-3)
        else:
            clip_grad_norm([np.ones(2, np.float32), g], 1.0)
    assert isinstance(info.value, ValueError)
    assert not m.any() and not v.any()
