"""The decoder's own kernels (backends/torchlib/fuse.py fuse_kernels; kernels/rmsnorm.cu, swiglu.cu) against
transformers' eager formulas, and a prepared model with them against the same model without.

The bound, from the .cu headers: both compute the same quantities with the same roundings to T, apart from float32
summation order and 1/sqrt (rmsnorm), expf (swiglu); those move the float32 value by a few float32 ulps, which can
flip each T rounding by one unit.  Forward: two roundings to T after the difference, so |ours - ref| <= 2 ulp_T(ref).
Backward: dx = T(g r - x c) subtracts; the error is bounded relative to the row's scale, not each entry:
|ours - ref| <= 4 ulp_T(max |ref|).  float32: relative 1e-5 (the sums' order over a few thousand terms).
RoPE (rope.cu) rounds each product and sum as torch's kernels do: its values equal transformers', forward and
backward (torch.equal), and a prepared model with only it fused ("exact") gives the unfused model's loss and
gradients bit for bit.
The loss (cross_entropy.cu) against transformers' ForCausalLMLoss on logits.float(): both sum V terms exp(z - m) in
[0, 1] in float32 (each within 2u of exact, u = 2^-24) in different orders, so each side's s is within gamma_V + 2u
relative of the exact sum and its log within that absolutely: |lse - lse_ref| <= b = 2 (gamma_V + 2u); the mean
over N rows adds 2 gamma_N + 4u relative.  The gradient g (p - [j = t]), p = exp(z - lse): |dp| <= p (b + 4u), then
one rounding to T on each side: |ours - ref| <= g p (b + 4u) + ulp_T(max(|ours|, |ref|)) (float16's subnormal
spacing 2^-24 as the floor); rows whose target is ignored get exactly 0 on both sides.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_DECODER

from backends.torchlib import prepare_model, qlora_layers
from backends.torchlib.fuse import (
    FusedRMSNorm,
    causal_lm_loss,
    fuse_kernels,
    rms_norm_reference,
    rope,
    rope_reference,
    swiglu,
)

pytestmark = pytest.mark.gpu
MANTISSA = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def ulp(v: torch.Tensor, dtype) -> torch.Tensor:
    """One unit in the last place of dtype at |v| (normal range; 2^-24 floor for float16's subnormals)."""
    a = v.abs().double().clamp_min(2.0**-24)
    return torch.exp2(torch.floor(torch.log2(a)) - MANTISSA[dtype])


def assert_within(ours, ref, dtype, units, *, rowwise=False):
    ours, ref = ours.double(), ref.double()
    scale = ref.abs().amax(-1, keepdim=True) if rowwise else ref
    assert torch.all((ours - ref).abs() <= units * ulp(scale, dtype)), (ours - ref).abs().max().item()


def tiny_llama(*, fuse, checkpointing=False):
    """A tiny random LLaMA (TINY_DECODER) prepared on cupy (r 4, alpha 8, no dropout) with the given fusion and
    gradient checkpointing, random LoRA weights (the same seeds for every call), in train mode."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_DECODER))
    prepare_model(m, backend="cupy", r=4, alpha=8, dropout=0.0, gradient_checkpointing=checkpointing, fuse=fuse)
    torch.manual_seed(1)
    for layer in qlora_layers(m).values():
        layer.reset_lora_parameters("random")
    return m.train()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 576), (7, 4096), (2, 100), (1, 8192)])
def test_rmsnorm_forward_and_backward_are_transformers_within_the_bound(dtype, shape):
    g = torch.Generator(device="cuda").manual_seed(shape[-1])
    x = (torch.randn(shape, generator=g, device="cuda") * 3).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g, device="cuda")).to(dtype)
    dy = torch.randn(shape, generator=g, device="cuda").to(dtype)
    holder = torch.nn.Module()
    holder.weight, holder.variance_epsilon = torch.nn.Parameter(w, requires_grad=False), 1e-5
    norm = FusedRMSNorm(holder)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = norm(xa)
    ref = rms_norm_reference(xb, w, 1e-5)
    y.backward(dy)
    ref.backward(dy)
    assert y.dtype == dtype and y.shape == x.shape and xa.grad.dtype == dtype
    units = 2 if dtype != torch.float32 else 200  # float32: ~1e-5 relative, in ulps
    assert_within(y, ref, dtype, units)
    assert_within(xa.grad, xb.grad, dtype, 4 if dtype != torch.float32 else 400, rowwise=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_forward_and_backward_are_silu_times_up_within_the_bound(dtype):
    g = torch.Generator(device="cuda").manual_seed(1)
    gate = (torch.randn(5, 33, 1536, generator=g, device="cuda") * 4).to(dtype)
    up = torch.randn(5, 33, 1536, generator=g, device="cuda").to(dtype)
    dh = torch.randn(5, 33, 1536, generator=g, device="cuda").to(dtype)
    ga, ua = gate.clone().requires_grad_(), up.clone().requires_grad_()
    gb, ub = gate.clone().requires_grad_(), up.clone().requires_grad_()
    h = swiglu(ga, ua)
    ref = torch.nn.functional.silu(gb) * ub
    h.backward(dh)
    ref.backward(dh)
    units = 2 if dtype != torch.float32 else 8
    assert_within(h, ref, dtype, units)
    assert_within(ua.grad, ub.grad, dtype, units)
    assert_within(ga.grad, gb.grad, dtype, 4 if dtype != torch.float32 else 16, rowwise=True)


def test_prepared_model_runs_the_fused_modules_close_to_the_unfused_one():
    """prepare_model on cupy swaps every norm and MLP (fuse=False: none, same state-dict keys); the loss and the LoRA
    gradients of a tiny LLaMA agree with the unfused model's (bf16 activations: loose, relative 1% / 3%)."""
    fused, plain = tiny_llama(fuse=True), tiny_llama(fuse=False)
    n = TINY_DECODER["num_hidden_layers"]
    assert sum(isinstance(x, FusedRMSNorm) for x in fused.modules()) == 2 * n + 1
    assert sum(isinstance(x, FusedRMSNorm) for x in plain.modules()) == 0
    assert fused.state_dict().keys() == plain.state_dict().keys()
    ids = torch.randint(0, TINY_DECODER["vocab_size"], (2, 24), device="cuda")
    losses, grads = [], []
    for m in (fused, plain):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten().float() for p in m.parameters() if p.requires_grad]))
    assert abs(losses[0] - losses[1]) <= 1e-2 * abs(losses[1])
    assert (grads[0] - grads[1]).norm() <= 3e-2 * grads[1].norm()
    assert fuse_kernels(plain) == {"norms": 2 * n + 1, "mlps": n, "ropes": n, "losses": 1}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, S, Hq, Hk, D, Bc", [(2, 37, 8, 2, 64, 1), (1, 16, 9, 3, 64, 1), (3, 5, 4, 4, 128, 3)])
def test_rope_kernel_gives_transformers_values_forward_and_backward(dtype, B, S, Hq, Hk, D, Bc):
    """q, k as the attention makes them (projections (B, S, H, D) transposed), GQA, cos shared or per batch."""
    g = torch.Generator(device="cuda").manual_seed(S * D)

    def randn(*shape):
        return (torch.randn(shape, generator=g, device="cuda") * 2).to(dtype)

    qp, kp, cos, sin = randn(B, S, Hq, D), randn(B, S, Hk, D), randn(Bc, S, D), randn(Bc, S, D)
    dq, dk = randn(B, Hq, S, D), randn(B, Hk, S, D)
    outs, grads = [], []
    for f in (rope, rope_reference):
        qa, ka = qp.clone().requires_grad_(), kp.clone().requires_grad_()
        qo, ko = f(qa.transpose(1, 2), ka.transpose(1, 2), cos, sin)
        torch.autograd.backward((qo, ko), (dq, dk))
        outs.append((qo, ko))
        grads.append((qa.grad, ka.grad))
    assert outs[0][0].stride() == qp.transpose(1, 2).stride()  # the projection's layout kept: no copy after
    for ours, ref in zip(outs[0] + grads[0], outs[1] + grads[1], strict=True):
        assert ours.dtype == dtype and ours.shape == ref.shape and torch.equal(ours, ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_vector_kernels_give_the_scalar_kernels_bits(dtype):
    """v2 (16-byte vectors, aligned operands) against v1 (the same tensors one element off alignment), with a tail."""
    from backends.cupy_backend.decoder import swiglu_backward, swiglu_forward

    n = 5 * 33 * 1536 + 3
    g = torch.Generator(device="cuda").manual_seed(2)
    raw = [(torch.randn(n + 1, generator=g, device="cuda") * 4).to(dtype) for _ in range(3)]
    off = [t[1:] for t in raw]  # data_ptr not 16-byte aligned: v1
    al = [t.clone() for t in off]  # fresh allocations: v2
    assert all(t.data_ptr() % 16 for t in off) and not any(t.data_ptr() % 16 for t in al)
    assert torch.equal(swiglu_forward(al[0], al[1]), swiglu_forward(off[0], off[1]))
    for a, b in zip(swiglu_backward(*al), swiglu_backward(*off), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_prepared_model_with_exact_fusion_is_the_unfused_model_bit_for_bit(checkpointing):
    """fuse="exact" (the command's default on cupy): RoPE as one kernel; logits, loss and every LoRA gradient equal
    the unfused model's exactly, with and without gradient checkpointing's recompute."""
    exact = tiny_llama(fuse="exact", checkpointing=checkpointing)
    plain = tiny_llama(fuse=False, checkpointing=checkpointing)
    n = TINY_DECODER["num_hidden_layers"]
    assert fuse_kernels(exact, exact=True) == {"norms": 0, "mlps": 0, "ropes": n, "losses": 0}
    ids = torch.randint(0, TINY_DECODER["vocab_size"], (2, 24), device="cuda")
    results = []
    for m in (exact, plain):
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        results.append([out.logits, out.loss] + [p.grad for p in m.parameters() if p.requires_grad])
    assert len(results[0]) == len(results[1]) > 2
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1000, 32000])
def test_cross_entropy_kernel_against_transformers_loss(dtype, V):
    """causal_lm_loss against ForCausalLMLoss on the same logits (the bound in the module docstring): the mean and
    the sum over num_items_in_batch, the logits gradient, ignored rows' zeros; an out-of-range target gives NaN."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    g = torch.Generator(device="cuda").manual_seed(V)
    B, S = 3, 41
    logits = (torch.randn(B, S, V, generator=g, device="cuda") * 3).to(dtype)
    labels = torch.randint(0, V, (B, S), generator=g, device="cuda")
    labels[0, :7] = -100
    labels[2, 20:] = -100
    u, N = 2.0**-24, B * S
    gamma = lambda n: n * u / (1 - n * u)  # noqa: E731
    b = 2 * (gamma(V) + 2 * u)
    for items in (None, torch.tensor(57, device="cuda")):
        outs = []
        for f in (causal_lm_loss, ForCausalLMLoss):
            z = logits.clone().requires_grad_()
            loss = f(z, labels, V, num_items_in_batch=items)
            loss.backward()
            outs.append((loss, z.grad))
        (lo, go), (lr, gr) = outs
        assert lo.dtype == torch.float32 and lo.shape == lr.shape == ()
        assert abs(lo.item() - lr.item()) <= b + (2 * gamma(N) + 4 * u) * abs(lr.item()), (lo.item(), lr.item())
        target = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
        scored = target != -100
        gscale = 1.0 / (int(scored.sum()) if items is None else int(items))
        p = torch.softmax(logits.double(), -1)
        floor = 2.0**-24 if dtype == torch.float16 else 0.0
        bound = gscale * p * (b + 4 * u) + ulp(torch.maximum(go.abs(), gr.abs()), dtype).clamp_min(floor)
        assert go.dtype == dtype and torch.all((go.double() - gr.double()).abs() <= bound)
        assert torch.equal(go[~scored], torch.zeros_like(go[~scored])) and torch.equal(gr[~scored], go[~scored])
    bad = labels.clone()
    bad[1, 5] = V  # the target of row (1, 4): outside [0, V)
    assert causal_lm_loss(logits, bad, V).isnan()
