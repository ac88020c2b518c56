"""PagedAdamW (backends/torchlib/optim.py) against the spec (qlora_ref.adamw) and against torch.optim.AdamW.

Agreement classes and their tolerances (STYLE 11):

- PagedAdamW vs the spec, CPU and GPU, 32-bit and 8-bit states: EXACT (0 ULP) on p, m, v / codes, absmax, every
  step.  CPU calls the spec.  GPU receives the spec's own host-computed float32 scalars (adam_scalars) and does only
  correctly rounded mul/add/div/sqrt per element with --fmad=false: no powf or sqrtf approximation is left to differ.
- PagedAdamW(decay="before") vs torch.optim.AdamW: a derived per-step bound (TORCH_BOUND below), teacher-forced from
  the same (p, g, m, v, t) each step, because torch rearranges the algebra and keeps its scalars in float64.
- clip_grad_norm_: CPU exact; GPU total_norm within 1 ulp, gradients within 3 ulp (derived in backends/torchlib/clip).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from backends import get_backend
from backends.torchlib import DeviceMemoryError, PagedAdamW, clip_grad_norm_, step_scalars
from qlora_ref import adamw as spec
from qlora_ref import bf16_to_f32, f32_to_bf16
from qlora_ref.checks import NonFiniteError

U = 2.0**-24  # float32 unit roundoff
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# ---- strategies (bounded; partial 256-blocks, single elements, all-zero gradients) ----------------------------------

sizes = st.lists(st.integers(1, 1100), min_size=1, max_size=3)
hyper = st.fixed_dictionaries(
    {
        "lr": st.floats(1e-5, 1e-1),
        "betas": st.tuples(st.floats(0.0, 0.99), st.floats(0.9, 0.9999)),
        "eps": st.sampled_from([1e-8, 1e-6, 1e-3]),
        "weight_decay": st.sampled_from([0.0, 0.01, 0.3]),
    }
)


def _round(x32: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as stored in dtype (bf16: round to nearest even, by the spec's helper)."""
    return bf16_to_f32(f32_to_bf16(x32)) if dtype == "bfloat16" else x32


def _grads(rng: np.random.Generator, sizes: list[int], steps: int, scale: float, dtype: str) -> list[list[np.ndarray]]:
    out = []
    for _ in range(steps):
        gs = [_round((rng.standard_normal(n) * scale).astype(np.float32), dtype) for n in sizes]
        gs[0][: min(300, gs[0].size)] = 0.0  # an all-zero 256-block: absmax 0, 1/0 = inf, NaN -> code 0
        out.append(gs)
    return out


def _spec_run(p0, grads, kw, bits, decay, dtype):
    """The spec, step by step: (params after each step, final states)."""
    ps = [p.copy() for p in p0]
    states = [
        (np.zeros(p.size, np.float32), np.zeros(p.size, np.float32))
        if bits == 32
        else spec.AdamW8bitState.zeros(p.size)
        for p in p0
    ]
    history = []
    for t, gs in enumerate(grads, start=1):
        for k, g in enumerate(gs):
            if bits == 32:
                p_new, m, v = spec.adamw_step(ps[k], g, *states[k], t, decay=decay, **kw)
                states[k] = (m, v)
            else:
                p_new, states[k] = spec.adamw_step_8bit(ps[k], g, states[k], t, decay=decay, **kw)
            ps[k] = _round(p_new, dtype)
        history.append([p.copy() for p in ps])
    return history, states


def _torch_params(p0, dtype, device):
    return [torch.nn.Parameter(torch.from_numpy(p.copy()).to(device=device, dtype=DTYPES[dtype])) for p in p0]


def _ours_run(p0, grads, kw, bits, decay, dtype, device, **opt_kw):
    params = _torch_params(p0, dtype, device)
    opt = PagedAdamW(params, decay=decay, state_bits=bits, **kw, **opt_kw)
    history = []
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = torch.from_numpy(g).to(device=device, dtype=p.dtype)
        opt.step()
        history.append([p.detach().float().cpu().numpy().copy() for p in params])
    return history, opt


def _assert_states_equal(opt, states, bits, where):
    sd = opt.state_dict()["state"]
    for k, s in enumerate(states):
        if bits == 32:
            pairs = (("m", s[0]), ("v", s[1]))
        else:
            pairs = (("m_codes", s.m_codes), ("m_absmax", s.m_absmax), ("v_codes", s.v_codes), ("v_absmax", s.v_absmax))
        for name, ref in pairs:
            got = sd[k][name].numpy()
            if not np.array_equal(got, ref):
                bad = int(np.flatnonzero(got != ref)[0])
                raise AssertionError(f"{where}: state {name} of param {k} differs at {bad}: {got[bad]} vs {ref[bad]}")


def _check_spec_parity(n_list, kw, bits, decay, dtype, steps, scale, seed, device, **opt_kw):
    rng = np.random.default_rng(seed)
    p0 = [_round(rng.standard_normal(n).astype(np.float32), dtype) for n in n_list]
    grads = _grads(rng, n_list, steps, scale, dtype)
    ref_hist, ref_states = _spec_run(p0, grads, kw, bits, decay, dtype)
    hist, opt = _ours_run(p0, grads, kw, bits, decay, dtype, device, **opt_kw)
    call = f"_check_spec_parity({n_list}, {kw}, {bits}, {decay!r}, {dtype!r}, {steps}, {scale}, {seed}, {device!r})"
    for t, (got, ref) in enumerate(zip(hist, ref_hist, strict=True), start=1):
        for k, (a, b) in enumerate(zip(got, ref, strict=True)):
            if not np.array_equal(a.view(np.uint32), b.view(np.uint32)):
                bad = int(np.flatnonzero(a.view(np.uint32) != b.view(np.uint32))[0])
                raise AssertionError(f"step {t}, param {k}, index {bad}: {a[bad]!r} vs spec {b[bad]!r}\nrepro: {call}")
    _assert_states_equal(opt, ref_states, bits, call)
    return opt


parity_cases = dict(
    n_list=sizes,
    kw=hyper,
    bits=st.sampled_from([32, 8]),
    decay=st.sampled_from(["after", "before"]),
    dtype=st.sampled_from(["float32", "bfloat16"]),
    steps=st.integers(1, 6),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    seed=st.integers(0, 2**31),
)


# ---- CPU: the fallback is the spec ---------------------------------------------------------------------------------


@given(**parity_cases)
def test_cpu_matches_spec_bit_for_bit(n_list, kw, bits, decay, dtype, steps, scale, seed):
    _check_spec_parity(n_list, kw, bits, decay, dtype, steps, scale, seed, "cpu")


def test_cpu_many_steps_both_state_widths():
    for bits in (32, 8):
        _check_spec_parity([4097, 3], dict(lr=1e-3, weight_decay=0.01), bits, "after", "float32", 40, 1.0, 7, "cpu")


# ---- torch.optim.AdamW parity (decay="before") --------------------------------------------------------------------

# TORCH_BOUND (per element, one step from identical float32 (p, g, m, v, t); first order in u = 2^-24, each
# coefficient rounded up).  Let m*, v*, c1, c2 and U* = (lr*c2/c1) * m* / (sqrt(v*) + eps*c2) be the exact-math values
# (float64 here), p* = p*(1-lr*wd) - ... the exact update.  Each implementation lands within E of p*, so the two
# differ by at most 2E:
#   decay factor (one rounding of lr*wd, of 1-lr*wd, of the product)          3u|p|
#   final add                                                                 u|p*|
#   m: spec b1f*m + (1-b1f)*g with |1-b1f - (1-b1)| <= u*b1; torch lerp       dm = 4u(|m| + |g|)
#   v: spec (1-b2f)*(g*g) off by u*b2*g^2 plus 3 roundings; torch addcmul     dv = 4u(v + g^2)
#   c1 = 1-b1^t: b1 rounded (t ulp through the power), pow 1-2 ulp, then
#        cancellation by 1/c1                                                  r1 = ((t+3) b1^t / c1 + 2)u
#   c2 = sqrt(1-b2^t): the same for b2, halved by the sqrt                    r2 = ((t+3) b2^t / (2(1-b2^t)) + 2)u
#   update |U*| * (r1 + 2*r2 + 8u + dv/(2v*)) + (lr*c2/c1) * dm / (sqrt(v*) + eps*c2)
# The (1-b)/b amplifications are why this is not a few ulps of p: with b2 = 0.999 at t = 1 the bias correction of
# float32 inputs alone is ~2000u relative, i.e. ~1e-4 of the update size.


def _torch_bound(p, g, m, v, t, lr, b1, b2, eps, wd):
    p, g, m, v = (a.astype(np.float64) for a in (p, g, m, v))
    m_star = b1 * m + (1 - b1) * g
    v_star = b2 * v + (1 - b2) * g * g
    c1, c2 = 1 - b1**t, np.sqrt(1 - b2**t)
    den = np.sqrt(v_star) + eps * c2
    with np.errstate(divide="ignore", invalid="ignore"):
        u_star = (lr * c2 / c1) * m_star / den
        dm = 4 * U * (np.abs(m) + np.abs(g))
        dv = 4 * U * (v + g * g)
        rel_v = np.where(v_star > 0, dv / (2 * v_star), 0.0)
        m_term = np.where(den > 0, (lr * c2 / c1) * dm / den, 0.0)
    r1 = ((t + 3) * b1**t / c1 + 2) * U
    r2 = ((t + 3) * b2**t / (2 * (1 - b2**t)) + 2) * U
    p_star = p * (1 - lr * wd) - u_star
    e = 3 * U * np.abs(p) + U * np.abs(p_star) + np.abs(u_star) * (r1 + 2 * r2 + 8 * U + rel_v) + m_term
    return 2 * e, 2 * dm, 2 * dv


def _check_torch_parity(n, lr, betas, eps, wd, steps, seed, device, **torch_kw):
    """Teacher-forced: every step both optimizers start from our (p, m, v, t); compare p, m, v with TORCH_BOUND."""
    rng = np.random.default_rng(seed)
    p_ours = torch.nn.Parameter(torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(device))
    p_torch = torch.nn.Parameter(p_ours.detach().clone())
    ours = PagedAdamW([p_ours], lr=lr, betas=betas, eps=eps, weight_decay=wd, decay="before")
    ref = torch.optim.AdamW([p_torch], lr=lr, betas=betas, eps=eps, weight_decay=wd, **torch_kw)
    call = f"_check_torch_parity({n}, {lr}, {betas}, {eps}, {wd}, {steps}, {seed}, {device!r}, **{torch_kw})"
    worst_ulp = 0
    for t in range(1, steps + 1):
        g = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(device)
        before = ours.state_dict()["state"][0]
        p0 = p_ours.detach().cpu().numpy().copy()
        with torch.no_grad():
            p_torch.copy_(p_ours)
        if t > 1:  # torch's state from ours
            ref.state[p_torch]["exp_avg"].copy_(before["m"].to(device))
            ref.state[p_torch]["exp_avg_sq"].copy_(before["v"].to(device))
            ref.state[p_torch]["step"].fill_(t - 1)
        p_ours.grad, p_torch.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        after = ours.state_dict()["state"][0]
        bp, bm, bv = _torch_bound(p0, g.cpu().numpy(), before["m"].numpy(), before["v"].numpy(), t, lr, *betas, eps, wd)
        for name, a, b, bound in (
            ("p", p_ours.detach().cpu().numpy(), p_torch.detach().cpu().numpy(), bp),
            ("m", after["m"].numpy(), ref.state[p_torch]["exp_avg"].cpu().numpy(), bm),
            ("v", after["v"].numpy(), ref.state[p_torch]["exp_avg_sq"].cpu().numpy(), bv),
        ):
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            bad = np.flatnonzero(diff > bound)
            if bad.size:
                i = int(bad[0])
                raise AssertionError(
                    f"step {t}: {name}[{i}] ours {a[i]!r} torch {b[i]!r} |diff| {diff[i]:.3e} > bound {bound[i]:.3e}"
                    f"\nrepro: {call}"
                )
            if name == "p":
                ulps = diff / np.spacing(np.abs(b).astype(np.float32)).astype(np.float64)
                worst_ulp = max(worst_ulp, float(ulps.max()))
    return worst_ulp


@given(
    n=st.integers(1, 600),
    lr=st.floats(1e-5, 1e-1),
    betas=st.tuples(st.floats(0.0, 0.99), st.floats(0.9, 0.9999)),
    eps=st.sampled_from([1e-8, 1e-6]),
    wd=st.sampled_from([0.0, 0.01, 0.3]),
    steps=st.integers(1, 8),
    seed=st.integers(0, 2**31),
)
def test_cpu_torch_adamw_parity_within_derived_bound(n, lr, betas, eps, wd, steps, seed):
    _check_torch_parity(n, lr, betas, eps, wd, steps, seed, "cpu", foreach=False)


def test_torch_bound_is_not_vacuous():
    """The bound is a small fraction of the update (a few ulps of p): a wrong bias correction or lr would exceed it."""
    rng = np.random.default_rng(0)
    p, g, m, v = (rng.standard_normal(1000).astype(np.float32) for _ in range(4))
    v = np.abs(v)
    bp, _, _ = _torch_bound(p, g, m, v, 100, 1e-3, 0.9, 0.999, 1e-8, 0.0)
    update = 1e-3 * np.abs(0.9 * m + 0.1 * g) / np.sqrt(0.999 * v + 0.001 * g * g)
    assert np.median(bp / update) < 1e-3
    assert np.quantile(bp / update, 0.99) < 0.05


# ---- save / resume, mismatched states, boundary errors -------------------------------------------------------------


def _save_resume(device, bits, dtype="float32"):
    rng = np.random.default_rng(3)
    sizes = [700, 5, 256]
    p0 = [_round(rng.standard_normal(n).astype(np.float32), dtype) for n in sizes]
    grads = _grads(rng, sizes, 10, 1.0, dtype)
    kw = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    straight, _ = _ours_run(p0, grads, kw, bits, "after", dtype, device)
    first, opt = _ours_run(p0, grads[:6], kw, bits, "after", dtype, device)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    del opt
    params = _torch_params(first[-1], dtype, device)
    resumed = PagedAdamW(params, lr=5.0, decay="after", state_bits=bits)  # lr comes back from the state dict
    resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    assert resumed.param_groups[0]["lr"] == kw["lr"]
    for gs in grads[6:]:
        for p, g in zip(params, gs, strict=True):
            p.grad = torch.from_numpy(g).to(device=device, dtype=p.dtype)
        resumed.step()
    for k, p in enumerate(params):
        assert np.array_equal(p.detach().float().cpu().numpy().view(np.uint32), straight[-1][k].view(np.uint32)), k


@pytest.mark.parametrize("bits", [32, 8])
def test_cpu_save_resume_identical(bits):
    _save_resume("cpu", bits)


def test_mismatched_state_raises():
    a = [torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(3, 4))]
    opt = PagedAdamW(a, lr=1e-3)
    a[0].grad, a[1].grad = torch.randn(10), torch.randn(3, 4)
    opt.step()
    sd = opt.state_dict()
    other = PagedAdamW([torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(13))], lr=1e-3)
    with pytest.raises(ValueError, match="state 'm' of parameter 1"):
        other.load_state_dict(sd)
    with pytest.raises(ValueError, match="state_bits"):
        PagedAdamW([torch.nn.Parameter(p.detach().clone()) for p in a], state_bits=8).load_state_dict(sd)
    with pytest.raises(ValueError, match="decay"):
        PagedAdamW([torch.nn.Parameter(p.detach().clone()) for p in a], decay="before").load_state_dict(sd)
    with pytest.raises(ValueError, match="this optimizer 1"):
        PagedAdamW([torch.nn.Parameter(torch.randn(10))]).load_state_dict(sd)
    with pytest.raises(ValueError, match="torch.optim.AdamW"):
        opt.load_state_dict(torch.optim.AdamW(a).state_dict())
    before = opt.state_dict()
    with pytest.raises(ValueError):
        other.load_state_dict(sd)  # failed loads write nothing
    assert all(torch.equal(before["state"][0][k], opt.state_dict()["state"][0][k]) for k in ("m", "v"))


def test_nonfinite_gradient_raises_and_writes_nothing():
    a = [torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(5))]
    opt = PagedAdamW(a, lr=1e-3)
    before = [p.detach().clone() for p in a]
    a[0].grad = torch.randn(10)
    a[1].grad = torch.tensor([0.0, 1.0, float("nan"), 2.0, float("inf")])
    with pytest.raises(NonFiniteError, match="parameter 1 has 2 non-finite"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(a, before, strict=True))
    assert all(opt.state[p]["step"] == 0 for p in a)


# ---- the deferred check (ADAMW-12 without a host synchronisation) --------------------------------------------------

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _bits_u32(params) -> list[np.ndarray]:
    return [p.detach().float().cpu().numpy().view(np.uint32).copy() for p in params]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [32, 8])
def test_deferred_check_skips_the_nonfinite_step_and_raises_at_the_next(device, bits):
    """A NaN/Inf step under check_finite="deferred" writes nothing and does not raise; the next step() raises
    NonFiniteError with its counts undone; then training continues with the bits of a run that never saw it."""
    rng = np.random.default_rng(8)
    sizes = [700, 5, 256]
    p0 = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    grads = _grads(rng, sizes, 4, 1.0, "float32")
    kw = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    straight, _ = _ours_run(p0, grads, kw, bits, "after", "float32", device)
    deferred, _ = _ours_run(p0, grads, kw, bits, "after", "float32", device, check_finite="deferred")
    assert all(
        np.array_equal(a, b) for h1, h2 in zip(straight, deferred, strict=True) for a, b in zip(h1, h2, strict=True)
    )

    params = _torch_params(p0, "float32", device)
    opt = PagedAdamW(params, decay="after", state_bits=bits, check_finite="deferred", **kw)

    def feed(gs):
        for p, g in zip(params, gs, strict=True):
            p.grad = torch.from_numpy(g).to(device)

    feed(grads[0])
    opt.step()
    after_one, states_one = _bits_u32(params), opt.state_dict()["state"]
    bad = [g.copy() for g in grads[1]]
    bad[1][2], bad[2][0] = np.nan, np.inf
    feed(bad)
    opt.step()  # queued: nothing raised, nothing written
    assert [opt.state[p]["step"] for p in params] == [2, 2, 2]
    with pytest.raises(NonFiniteError, match="updated nothing"):
        opt.raise_if_nonfinite()
    assert [opt.state[p]["step"] for p in params] == [1, 1, 1]  # undone
    assert all(np.array_equal(a, b) for a, b in zip(_bits_u32(params), after_one, strict=True))
    for k, entry in opt.state_dict()["state"].items():
        assert all(torch.equal(entry[name], states_one[k][name]) for name in entry if name != "step"), k
    opt.raise_if_nonfinite()  # read once: the error is not raised twice
    for gs in grads[1:]:
        feed(gs)
        opt.step()
    assert all(np.array_equal(a.view(np.uint32), b) for a, b in zip(straight[-1], _bits_u32(params), strict=True))

    feed(bad)
    opt.step()
    with pytest.raises(NonFiniteError, match="updated nothing"):
        opt.step()  # the next step reads the flag first and writes nothing either
    with pytest.raises(NonFiniteError):
        feed(bad)
        opt.step()
        opt.state_dict()  # a checkpoint never records a step that did not happen


@pytest.mark.parametrize("device", DEVICES)
def test_clip_without_error_leaves_nonfinite_gradients_unscaled(device):
    rng = np.random.default_rng(2)
    gs = [rng.standard_normal(n).astype(np.float32) * 3 for n in (100, 7, 1000)]
    gs[1][3] = np.nan
    params = [torch.nn.Parameter(torch.zeros(g.size, device=device)) for g in gs]
    for p, g in zip(params, gs, strict=True):
        p.grad = torch.from_numpy(g.copy()).to(device)
    with pytest.raises(NonFiniteError):
        clip_grad_norm_(params, 0.3)
    norm = clip_grad_norm_(params, 0.3, error_if_nonfinite=False)
    assert not np.isfinite(norm.item())
    for p, g in zip(params, gs, strict=True):
        assert np.array_equal(p.grad.cpu().numpy(), g, equal_nan=True)
    finite = [np.nan_to_num(g) for g in gs]
    for p, g in zip(params, finite, strict=True):
        p.grad = torch.from_numpy(g.copy()).to(device)
    norm = clip_grad_norm_(params, 0.3, error_if_nonfinite=False)
    ref, ref_norm = spec.clip_grad_norm(finite, 0.3)
    assert abs(norm.item() - ref_norm) <= (0 if device == "cpu" else np.spacing(ref_norm))
    for p, r in zip(params, ref, strict=True):
        tol = 0 if device == "cpu" else 3 * np.spacing(np.abs(r))
        assert np.all(np.abs(p.grad.cpu().numpy() - r) <= tol)


def test_boundary_errors():
    p = torch.nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match="decay"):
        PagedAdamW([p], decay="middle")
    with pytest.raises(ValueError, match="state_bits"):
        PagedAdamW([p], state_bits=16)
    with pytest.raises(ValueError, match="deferred"):
        PagedAdamW([p], check_finite="later")
    with pytest.raises(ValueError, match="betas"):
        PagedAdamW([p], betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="dtype"):
        PagedAdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))])
    with pytest.raises(ValueError, match="add_param_group"):
        PagedAdamW([p]).add_param_group({"params": [torch.nn.Parameter(torch.randn(2))]})
    q = torch.nn.Parameter(torch.randn(4, 3))
    opt = PagedAdamW([q])
    q.grad = torch.randn(3, 4).t()
    with pytest.raises(ValueError, match="gradient of parameter 0 is not contiguous"):
        opt.step()


def test_cpu_clip_matches_spec():
    rng = np.random.default_rng(1)
    gs = [rng.standard_normal(n).astype(np.float32) * 3 for n in (100, 7, 1000)]
    params = [torch.nn.Parameter(torch.zeros(g.size)) for g in gs]
    for p, g in zip(params, gs, strict=True):
        p.grad = torch.from_numpy(g.copy())
    norm = clip_grad_norm_(params, 0.3)
    ref, ref_norm = spec.clip_grad_norm(gs, 0.3)
    assert norm.item() == ref_norm
    for p, r in zip(params, ref, strict=True):
        assert np.array_equal(p.grad.numpy(), r)


# ---- GPU -----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@settings(deadline=None)
@given(**parity_cases)
def test_gpu_matches_spec_bit_for_bit(n_list, kw, bits, decay, dtype, steps, scale, seed):
    _check_spec_parity(n_list, kw, bits, decay, dtype, steps, scale, seed, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("chunk", [1024, 4096, 65536])
def test_gpu_every_chunk_gives_the_same_bits(bits, chunk):
    _check_spec_parity(
        [70_000, 1, 4097], dict(lr=1e-3, weight_decay=0.01), bits, "after", "float32", 12, 1.0, 5, "cuda", chunk=chunk
    )


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_v1_kernel_agrees_with_spec(bits, dtype):
    """The v1 kernels (plain, one launch per tensor) are a second oracle for the fused v2 ones: both equal the spec."""
    opt = _check_spec_parity([3000, 17, 257], dict(lr=1e-3, weight_decay=0.01), bits, "after", dtype, 5, 1.0, 11,
                             "cuda", chunk=1024)  # fmt: skip
    assert opt._states.kernel == "v2"
    rng = np.random.default_rng(11)
    p0 = [_round(rng.standard_normal(n).astype(np.float32), dtype) for n in (3000, 17, 257)]
    grads = _grads(rng, [3000, 17, 257], 5, 1.0, dtype)
    ref, ref_states = _spec_run(p0, grads, dict(lr=1e-3, weight_decay=0.01), bits, "after", dtype)
    params = _torch_params(p0, dtype, "cuda")
    opt = PagedAdamW(params, lr=1e-3, weight_decay=0.01, state_bits=bits)
    opt._states.kernel = "v1"
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = torch.from_numpy(g).to(device="cuda", dtype=p.dtype)
        opt.step()
    for p, r in zip(params, ref[-1], strict=True):
        assert np.array_equal(p.detach().float().cpu().numpy().view(np.uint32), r.view(np.uint32))
    _assert_states_equal(opt, ref_states, bits, "v1")


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [32, 8])
def test_gpu_page_out_page_in_bit_identical(bits):
    """ADAMW-9: paging moves bytes, never values: states paged out and in are unchanged, and the run equals the
    unpaged one bit for bit."""
    n = 16 << 20  # 16M params: 128 MB of 32-bit state
    rng = np.random.default_rng(2)
    p0 = [rng.standard_normal(n).astype(np.float32)]
    grads = [[rng.standard_normal(n).astype(np.float32)] for _ in range(3)]
    kw = dict(lr=1e-3)
    straight, _ = _ours_run(p0, grads, kw, bits, "after", "float32", "cuda", page_threshold_bytes=0)
    params = _torch_params(p0, "float32", "cuda")
    opt = PagedAdamW(params, state_bits=bits, page_threshold_bytes=0, **kw)
    for t, gs in enumerate(grads):
        params[0].grad = torch.from_numpy(gs[0]).cuda()
        opt.step()
        if t == 1:
            before = opt.state_dict()["state"][0]
            assert opt.state_location() == "device"
            opt.page_out()
            assert not opt.resident and opt.state_location() == "host"
            paged = opt.state_dict()["state"][0]  # read while on the host
            opt.page_in()
            assert opt.resident and opt.state_location() == "device"
            after = opt.state_dict()["state"][0]
            for k in before:
                if k != "step":
                    assert torch.equal(before[k], paged[k]) and torch.equal(before[k], after[k]), k
    assert np.array_equal(params[0].detach().cpu().numpy(), straight[-1][0])


@pytest.mark.gpu
def test_gpu_automatic_page_out_under_threshold_and_refusal():
    p = torch.nn.Parameter(torch.randn(1 << 20, device="cuda"))
    budget = {"free": 1 << 40}
    opt = PagedAdamW([p], page_threshold_bytes=64 << 20, margin_bytes=1 << 20, free_memory_fn=lambda: budget["free"])
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.resident  # plenty free: stays
    budget["free"] = 32 << 20
    opt.step()
    assert not opt.resident  # under the threshold after the step: paged out
    budget["free"] = 4 << 20  # less than the 8 MiB of state + margin: page-in refuses
    with pytest.raises(DeviceMemoryError, match="page in"):
        opt.step()
    with pytest.raises(DeviceMemoryError, match="allocate"):
        PagedAdamW([p], free_memory_fn=lambda: 1 << 20)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [32, 8])
def test_gpu_save_resume_identical(bits):
    _save_resume("cuda", bits)
    _save_resume("cuda", bits, "bfloat16")


@pytest.mark.gpu
def test_gpu_state_dict_loads_on_cpu_and_back():
    """A GPU checkpoint resumes on the CPU fallback with the same bits (same format, same math)."""
    rng = np.random.default_rng(9)
    p0 = [rng.standard_normal(1000).astype(np.float32)]
    grads = _grads(rng, [1000], 8, 1.0, "float32")
    kw = dict(lr=1e-3, weight_decay=0.01)
    gpu_hist, _ = _ours_run(p0, grads, kw, 8, "after", "float32", "cuda")
    first, opt = _ours_run(p0, grads[:4], kw, 8, "after", "float32", "cuda")
    params = _torch_params(first[-1], "float32", "cpu")
    cpu = PagedAdamW(params, state_bits=8, **kw)
    cpu.load_state_dict(opt.state_dict())
    for gs in grads[4:]:
        params[0].grad = torch.from_numpy(gs[0])
        cpu.step()
    assert np.array_equal(params[0].detach().numpy(), gpu_hist[-1][0])


@pytest.mark.gpu
@pytest.mark.parametrize("torch_kw", [dict(foreach=False), dict(fused=True)])
def test_gpu_torch_adamw_parity_within_derived_bound(torch_kw):
    for seed, (lr, betas, wd) in enumerate(
        [(1e-3, (0.9, 0.999), 0.0), (2e-4, (0.9, 0.999), 0.01), (1e-2, (0.5, 0.9), 0.3)]
    ):
        _check_torch_parity(5000, lr, betas, 1e-8, wd, 20, seed, "cuda", **torch_kw)


@pytest.mark.gpu
def test_gpu_clip_within_bound():
    rng = np.random.default_rng(4)
    gs = [rng.standard_normal(n).astype(np.float32) * 3 for n in (100_000, 7, 4096)]
    params = [torch.nn.Parameter(torch.zeros(g.size, device="cuda")) for g in gs]
    for p, g in zip(params, gs, strict=True):
        p.grad = torch.from_numpy(g.copy()).cuda()
    norm = clip_grad_norm_(params, 0.3).item()
    ref, ref_norm = spec.clip_grad_norm(gs, 0.3)
    assert abs(norm - ref_norm) <= np.spacing(ref_norm)
    for p, r in zip(params, ref, strict=True):
        got = p.grad.cpu().numpy()
        assert np.all(np.abs(got - r) <= 3 * np.spacing(np.abs(r)))


@pytest.mark.gpu
def test_gpu_clip_without_error_check_captures_into_a_graph():
    """error_if_nonfinite=False issues no host synchronisation and no host-to-device copy (either is refused inside a
    stream capture), so the clip captures into a CUDA graph; a replay scales exactly as the eager call does."""
    rng = np.random.default_rng(5)
    gs = [torch.from_numpy(rng.standard_normal(n).astype(np.float32) * 3).cuda() for n in (100_000, 7, 4096)]
    gs.append(gs[0][:2048].to(torch.bfloat16))  # a second dtype: one _foreach_norm per dtype

    def params_with(grads):
        ps = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, g in zip(ps, grads, strict=True):
            p.grad = g.clone()
        return ps

    eager = params_with(gs)
    want = clip_grad_norm_(eager, 0.3, error_if_nonfinite=False)
    captured = params_with(gs)
    clip_grad_norm_(captured, 0.3, error_if_nonfinite=False)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        norm = clip_grad_norm_(captured, 0.3, error_if_nonfinite=False)
    for p, g in zip(captured, gs, strict=True):
        p.grad.copy_(g)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(norm, want)
    for p, q in zip(captured, eager, strict=True):
        assert torch.equal(p.grad, q.grad)


# ---- stepping inside backward; host placement -------------------------------------------------------------------


def _tiny_net(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(48, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8)).to(device)
    return net, torch.randn(5, 48, generator=g).to(device)


@pytest.mark.gpu
@pytest.mark.parametrize("paged", [False, True])
def test_gpu_unchecked_clip_and_deferred_step_leave_the_stream_running(paged):
    """The training loop's clip (error_if_nonfinite=False) and optimizer step (check_finite="deferred") never wait
    for the GPU: issued behind a ~1 s torch.cuda._sleep they return while the stream is still busy (any stream or
    device synchronisation, or a pageable host-to-device copy, would have drained it first), and the parameters come
    out as from the same calls on an idle stream."""

    def run(busy: bool):
        torch.manual_seed(0)
        net, x = _tiny_net("cuda")
        params = list(net.parameters())
        opt = PagedAdamW(params, lr=1e-2, paged=paged, check_finite="deferred")
        still_busy = None
        for step in range(2):  # the first step allocates the states (that may wait); the second is the hot path
            net(x).square().mean().backward()
            if busy and step == 1:
                torch.cuda.synchronize()
                torch.cuda._sleep(1 << 31)
            clip_grad_norm_(params, 0.1, error_if_nonfinite=False)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if busy and step == 1:
                still_busy = not torch.cuda.current_stream().query()
        torch.cuda.synchronize()
        return still_busy, [p.detach().clone() for p in params]

    busy, got = run(True)
    _, want = run(False)
    assert busy, "the clip or the optimizer step waited for the stream to drain"
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def _run_hooked(device, hooked: bool, steps: int = 3, **opt_kw):
    torch.manual_seed(0)
    net, x = _tiny_net(device)
    opt = PagedAdamW(list(net.parameters()), lr=1e-2, weight_decay=0.1, **opt_kw)
    if hooked:
        opt.hook_into_backward()
    for _ in range(steps):
        loss = net(x).square().mean()
        loss.backward()
        if hooked:
            assert all(p.grad is None for p in net.parameters()), "the hooks must free every gradient"
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return [p.detach().cpu().clone() for p in net.parameters()], opt


def test_cpu_hook_into_backward_equals_backward_then_step():
    plain, _ = _run_hooked("cpu", False)
    hooked, opt = _run_hooked("cpu", True)
    for a, b in zip(plain, hooked, strict=True):
        assert torch.equal(a, b)
    assert all(opt.state[p]["step"] == 3 for p in opt._params)


def test_placement_boundary_errors():
    p = [torch.nn.Parameter(torch.zeros(4))]
    with pytest.raises(ValueError, match="placement"):
        PagedAdamW(p, placement="disk")
    with pytest.raises(ValueError, match="paged=True"):
        PagedAdamW(p, placement="host", paged=False)


def test_backend_is_chosen_by_the_parameters_device():
    """No device branch in the front: the backend whose placement is the tensors' device does the step."""
    assert PagedAdamW([torch.nn.Parameter(torch.zeros(3))]).backend.name == "numpy"
    meta = [torch.nn.Parameter(torch.zeros(3, device="meta"))]
    with pytest.raises(ValueError, match="no backend computes on meta"):
        PagedAdamW(meta)
    with pytest.raises(ValueError, match="numpy backend computes on cpu"):
        PagedAdamW(meta, backend="numpy")


# ---- the backend op itself (Backend.adamw_states / adamw_step), on the backends' own arrays ----------------------


def _backend_run(be, p0, grads, kw, bits, decay, dtype, to_array, to_host):
    """p0 and grads (float32 values of dtype) through be.adamw_step on arrays made by to_array; (params, states)."""
    states = be.adamw_states([p.size for p in p0], state_bits=bits)
    bits16 = dtype == "bfloat16"
    params = [to_array(f32_to_bf16(p) if bits16 else p.copy()) for p in p0]
    index = list(range(len(p0)))
    for t, gs in enumerate(grads, start=1):
        s = step_scalars(t, **{"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, **kw})
        be.adamw_step(params, [to_array(f32_to_bf16(g) if bits16 else g) for g in gs], states, index, [s] * len(p0),
                      decay=decay)  # fmt: skip
    out = [to_host(p) for p in params]
    return [bf16_to_f32(p) if bits16 else p for p in out], states.export()


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_numpy_backend_adamw_step_is_the_spec(bits, dtype):
    """numpy arrays (bf16 as uint16 bits) through get_backend("numpy").adamw_step: the spec's bits, p and states."""
    rng = np.random.default_rng(21)
    sizes = [300, 1, 513]
    p0 = [_round(rng.standard_normal(n).astype(np.float32), dtype) for n in sizes]
    grads = _grads(rng, sizes, 4, 1.0, dtype)
    kw = dict(lr=1e-2, weight_decay=0.1)
    ref, ref_states = _spec_run(p0, grads, kw, bits, "before", dtype)
    got, states = _backend_run(get_backend("numpy"), p0, grads, kw, bits, "before", dtype, np.asarray, np.asarray)
    for a, b in zip(got, ref[-1], strict=True):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    for s, r in zip(states, ref_states, strict=True):
        refs = {"m": r[0], "v": r[1]} if bits == 32 else {k: getattr(r, k) for k in s}
        assert all(np.array_equal(s[k], refs[k]) for k in s)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_cupy_backend_adamw_step_on_cupy_arrays_equals_numpy_backend(bits, dtype):
    """CuPy arrays (no torch tensors) through get_backend("cupy").adamw_step: the numpy backend's bits."""
    import cupy

    rng = np.random.default_rng(22)
    sizes = [5000, 3, 256]
    p0 = [_round(rng.standard_normal(n).astype(np.float32), dtype) for n in sizes]
    grads = _grads(rng, sizes, 4, 1.0, dtype)
    kw = dict(lr=1e-3, weight_decay=0.01)
    ref, ref_states = _backend_run(get_backend("numpy"), p0, grads, kw, bits, "after", dtype, np.asarray, np.asarray)
    got, states = _backend_run(get_backend("cupy"), p0, grads, kw, bits, "after", dtype, cupy.asarray, cupy.asnumpy)
    for a, b in zip(got, ref, strict=True):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    for s, r in zip(states, ref_states, strict=True):
        assert all(np.array_equal(s[k], r[k]) for k in s)
    be = get_backend("cupy")
    states = be.adamw_states([4], state_bits=bits)
    p = cupy.asarray(f32_to_bf16(np.ones(4, np.float32)) if dtype == "bfloat16" else np.ones(4, np.float32))
    bad = np.array([0.0, np.inf, 1.0, np.nan], np.float32)
    g = cupy.asarray(f32_to_bf16(bad) if dtype == "bfloat16" else bad)
    before = p.copy()
    with pytest.raises(NonFiniteError, match="parameter 0 has 2 non-finite"):  # bf16 bits checked as bf16, not ints
        be.adamw_step([p], [g], states, [0], [step_scalars(1, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)])
    assert bool((p == before).all()) and all(not a.any() for a in states.export()[0].values())  # nothing written


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [32, 8])
def test_gpu_host_placement_matches_spec_and_takes_no_device_memory(bits):
    """ADAMW-9: states kept in host memory give the spec's bits and take no device memory."""
    import cupy

    _check_spec_parity([1100, 300, 5], dict(lr=1e-3, weight_decay=0.01), bits, "after", "bfloat16", 3, 1.0, 7, "cuda",
                       placement="host")  # fmt: skip
    n = 64 << 20  # 64M float32 params: 512 MB of 32-bit state
    params = [torch.nn.Parameter(torch.zeros(n, device="cuda"))]
    pool = cupy.get_default_memory_pool()  # device memory is read device-wide: empty both caches at both reads
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    pool.free_all_blocks()
    free0 = cupy.cuda.runtime.memGetInfo()[0]
    opt = PagedAdamW(params, state_bits=bits, placement="host", check_finite=False)
    for _ in range(2):
        params[0].grad = torch.ones(n, device="cuda")
        opt.step()
        params[0].grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    pool.free_all_blocks()
    free1 = cupy.cuda.runtime.memGetInfo()[0]
    assert opt.state_location() == "host" and not opt.resident
    assert free0 - free1 < opt.state_bytes // 4, f"{(free0 - free1) / 2**20:.0f} MiB of device memory taken"
    lr = opt.param_groups[0]["lr"]
    got = float(params[0].detach()[:1024].mean())  # Adam on a constant gradient moves lr per step (m/sqrt(v) = 1)
    assert abs(got + 2 * lr) < (1e-7 if bits == 32 else 2e-5), (got, lr)


@pytest.mark.gpu
def test_gpu_hook_into_backward_equals_backward_then_step():
    plain, _ = _run_hooked("cuda", False)
    hooked, _ = _run_hooked("cuda", True, placement="host")
    for a, b in zip(plain, hooked, strict=True):
        assert torch.equal(a, b)
