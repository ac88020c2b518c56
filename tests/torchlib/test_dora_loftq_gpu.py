"""DoRA and LoftQ on backend="cupy" (specs/dora.md, specs/loftq.md, specs/memory.md MEM-16) against the CPU (numpy
backend): DoRALinear's forward and backward, a DoRA model's training and loss curve, LoftQ's base and adapter, a
DoRA adapter saved and loaded on the GPU, and the ledger's DoRA temporaries against the CUDA allocator.

Same kernels, compared bit for bit: quantization (the 4-bit bytes), dequantization (W_hat), and so LoftQ's round-1
base (its target is the weight itself).  Different code (cuBLAS and CUDA reductions vs the CPU's), compared within:

u = 2^-24 (float32), u_bf = 2^-8 (bfloat16), gamma_k = k u / (1 - k u).  DoRALinear (DORA-4, DORA-5) is built of
dot products (x W^T, x A^T, u B^T, the sums over tokens), n = ||W + s B A||_row and products with g = m / n.  A dot
product of K terms carries at most gamma_K times the same sum over |terms| (Higham 3.1), and a chain adds the k of
its links; n's relative error is at most gamma_k rho with rho = || |W| + s |B| |A| ||_row / n >= 1 (the entries of V
in float32 vs their abs-graph), and it reaches every output through g once, plus the product's own rounding.  So each
side's error is at most (gamma_K (2 + rho) + b u_bf) * G, G the abs-graph (the same formulas on |x|, |W|, |A|, |B|,
|m| / n, |dy|), K = in + r + T + out + 16 (every sum on the longest chain, dX's and dA's, plus a few single
roundings), b the bf16 roundings on a chain (0 in float32; 3 in bf16: a GEMM's output, gy cast to bf16, dX cast
back); two sides differ by twice that.  TF32 and cuBLAS's reduced-precision bf16 reductions are off.

Loss curves: as tests/torchlib/test_gpu_train.py (|loss_gpu - loss_cpu| <= 1e-3 loss_cpu per step, its derivation).
LoftQ's adapter: specs/loftq.md's table (s B A within 16 eps32 max|B A| at T = 1; T = 2 error within 1e-3 relative).
Logits across devices after loading an adapter: 1e-4 of their scale, as test_model_export's GPU prepare test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_DECODER

from backends.torchlib import (
    DoRALinear,
    PagedAdamW,
    adapter_prepare_kwargs,
    load_peft_adapter,
    loftq_state,
    prepare_model,
    qlora_layers,
    save_peft_adapter,
    trainable_parameters,
)
from backends.torchlib import ledger as impl
from qlora_ref import quantize_4bit
from qlora_ref.loftq import reconstruction_error

transformers = pytest.importorskip("transformers")
GPU, DEVICE = "cupy", "cuda"
EPS32 = float(np.finfo(np.float32).eps)
U32, U_BF16 = 2.0**-24, 2.0**-8
IDS = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(5))
IN, OUT, R, T = 192, 64, 8, 16


def gamma(k: int, u: float = U32) -> float:
    return k * u / (1 - k * u)


def host_q(q):
    return q.to_host() if hasattr(q, "to_host") else q


def assert_same_4bit(a, b, what=""):
    """The spec's arrays of two 4-bit states, byte for byte (the same quantization kernel's output)."""
    a, b = host_q(a), host_q(b)
    assert (a.shape, a.quant_type, a.blocksize) == (b.shape, b.quant_type, b.blocksize), what
    for name in ("packed", "absmax", "absmax_q", "nested_absmax", "offset"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), (what, name)
        if x is not None:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{what} {name}")


@pytest.fixture
def exact_matmul():
    """IEEE float32 GEMMs (no TF32) and float32 accumulation for bf16 GEMMs, restored afterwards."""
    m = torch.backends.cuda.matmul
    saved = (m.allow_tf32, m.allow_bf16_reduced_precision_reduction)
    m.allow_tf32, m.allow_bf16_reduced_precision_reduction = False, False
    yield
    m.allow_tf32, m.allow_bf16_reduced_precision_reduction = saved


def tiny_llama(seed):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_DECODER))


def copy_adapter(src, dst):
    """A, B and the magnitude of every layer of ``src`` into the same layer of ``dst`` (either device)."""
    with torch.no_grad():
        for a, b in zip(qlora_layers(src).values(), qlora_layers(dst).values(), strict=True):
            for name in ("lora_A", "lora_B", "lora_magnitude_vector"):
                getattr(b, name).copy_(getattr(a, name))


# --- DoRALinear ----------------------------------------------------------------------------------------------------


def layer_pair(compute, seed=0):
    """The same DoRALinear on the CPU (numpy backend) and the GPU: one nn.Linear quantized by each backend, random
    A, B (B != 0) and m != n drawn on the CPU and copied to the GPU."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(IN, OUT, bias=True)
    kw = dict(r=R, alpha=16, compute_dtype=compute, lora_dtype="float32")
    cpu = DoRALinear.from_linear(lin, backend="numpy", **kw)
    cpu.reset_lora_parameters("random")
    with torch.no_grad():
        cpu.lora_magnitude_vector.mul_(torch.empty(OUT).uniform_(0.5, 1.5))
    gpu = DoRALinear.from_linear(lin, backend=GPU, **kw)
    with torch.no_grad():
        for name in ("lora_A", "lora_B", "lora_magnitude_vector"):
            getattr(gpu, name).copy_(getattr(cpu, name))
    return cpu, gpu


def abs_graphs(layer, x, dy):
    """G for y, dx, dA, dB, dm (module docstring), float64, and rho's largest value; from the CPU layer's values."""
    d = torch.float64
    W = layer.dequantized().to(d)  # (out, in), the compute dtype's W_hat
    A, B, m, s = (
        layer.lora_A.detach().to(d),
        layer.lora_B.detach().to(d),
        layer.lora_magnitude_vector.detach(),
        layer.scaling,
    )
    n = torch.linalg.vector_norm(W + s * B @ A, dim=1)  # (out,)
    rho = torch.linalg.vector_norm(W.abs() + s * B.abs() @ A.abs(), dim=1) / n  # (out,)
    g = m.to(d).abs() / n  # (out,)
    xa, Wa, Aa, Ba, dya = x.to(d).abs(), W.abs(), A.abs(), B.abs(), dy.to(d).abs()
    Ua = xa @ Aa.T  # (T, r)
    Za = xa @ Wa.T + s * Ua @ Ba.T  # (T, out)
    GYa = g * dya  # (T, out)
    DUa = s * GYa @ Ba  # (T, r)
    graphs = {
        "y": g * Za + layer.bias.to(d).abs(),
        "dx": GYa @ Wa + DUa @ Aa,
        "dA": DUa.T @ xa,
        "dB": s * GYa.T @ Ua,
        "dm": (dya * Za).sum(0) / n,
    }
    return graphs, rho.max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_gpu_dora_layer_matches_cpu(compute, exact_matmul):
    """DORA-2 .. DORA-5 on cupy: the 4-bit bytes and W_hat are the CPU's bit for bit; y, dx, dA, dB, dm equal the
    CPU layer's within 2 (gamma_K (2 + rho) + b u_bf) of the abs-graph (module docstring)."""
    cpu, gpu = layer_pair(compute)
    assert_same_4bit(cpu.q, gpu.q, "from_linear")
    assert torch.equal(gpu.dequantized().cpu(), cpu.dequantized())
    dt = getattr(torch, compute)
    torch.manual_seed(1)
    x = torch.randn(T, IN).to(dt)
    dy = torch.randn(T, OUT).to(dt)
    got = {}
    for name, layer, dev in (("cpu", cpu, "cpu"), ("gpu", gpu, DEVICE)):
        xi = x.to(dev, copy=True).requires_grad_(True)
        y = layer(xi)
        y.backward(dy.to(dev))
        got[name] = {"y": y.detach(), "dx": xi.grad, "dA": layer.lora_A.grad, "dB": layer.lora_B.grad,
                     "dm": layer.lora_magnitude_vector.grad}  # fmt: skip
    graphs, rho = abs_graphs(cpu, x, dy)
    K = IN + R + T + OUT + 16
    rel = 2 * (gamma(K) * (2 + rho) + (3 * U_BF16 if compute == "bfloat16" else 0.0))
    for key, G in graphs.items():
        a, b = got["cpu"][key].double(), got["gpu"][key].double().cpu()
        err, bound = (a - b).abs(), rel * G
        worst = (err - bound).argmax()
        assert (err <= bound).all(), (
            f"{key} ({compute}): |gpu - cpu| = {err.flatten()[worst]:.3e} > bound {bound.flatten()[worst]:.3e} "
            f"at flat index {worst}; rho = {rho:.3f}, K = {K}"
        )
        assert G.max() > 0  # the term is exercised


# --- a DoRA model: training, and the loss curve against the CPU's -----------------------------------------------


def train(model, device, steps, lr):
    opt = PagedAdamW(trainable_parameters(model), lr=lr)
    ids = IDS.to(device)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.gpu
def test_gpu_dora_model_trains_with_the_gpu_defaults():
    """DORA-5 on cupy with the GPU defaults (bf16 compute, float32 LoRA, dropout, checkpointing): 8 AdamW steps at
    lr 1e-2 on one batch give finite losses that drop by more than 0.1 nats, and every magnitude moves."""
    model = tiny_llama(seed=7)
    prepare_model(model, backend=GPU, r=4, alpha=8, dropout=0.05, use_dora=True)
    model.train()
    layers = qlora_layers(model)
    assert all(isinstance(m, DoRALinear) and m.lora_magnitude_vector.device.type == DEVICE for m in layers.values())
    start = {n: m.lora_magnitude_vector.detach().clone() for n, m in layers.items()}
    losses = train(model, DEVICE, steps=8, lr=1e-2)
    assert all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0] - 0.1, losses  # a CPU run of this recipe (float32 / bf16) drops by ~0.5
    for name, m in layers.items():
        assert not torch.equal(m.lora_magnitude_vector.detach(), start[name]), name


@pytest.mark.gpu
def test_gpu_dora_loss_curve_matches_cpu(exact_matmul):
    """STYLE 16 for DoRA: the same tiny DoRA model (same 4-bit bytes, same random A, B, m) trained 5 steps in float32
    on the numpy backend and on cupy: the losses agree within 1e-3 relative at every step (test_gpu_train.py)."""
    kw = dict(r=4, alpha=8, dropout=0.0, use_dora=True, compute_dtype="float32", gradient_checkpointing=False)
    cpu, gpu = tiny_llama(seed=3), tiny_llama(seed=3)
    prepare_model(cpu, backend="numpy", **kw)
    prepare_model(gpu, backend=GPU, **kw)
    torch.manual_seed(4)
    for m in qlora_layers(cpu).values():
        m.reset_lora_parameters("random")
        with torch.no_grad():
            m.lora_magnitude_vector.mul_(torch.empty_like(m.lora_magnitude_vector).uniform_(0.8, 1.2))
    copy_adapter(cpu, gpu)
    for (name, a), b in zip(qlora_layers(cpu).items(), qlora_layers(gpu).values(), strict=True):
        assert_same_4bit(a.q, b.q, name)
    want = train(cpu.train(), "cpu", steps=5, lr=1e-3)
    got = train(gpu.train(), DEVICE, steps=5, lr=1e-3)
    assert want[-1] < want[0]
    for step, (a, b) in enumerate(zip(want, got, strict=True)):
        assert abs(a - b) <= 1e-3 * abs(a), f"step {step}: cpu {a}, gpu {b} (bound 1e-3 relative)"


# --- LoftQ -----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_loftq_state_matches_cpu():
    """LOFTQ-2 .. LOFTQ-5 on cupy: round 1's base is the CPU's byte for byte, s B A within 16 eps32 max|B A| of the
    CPU's (cuSOLVER's float64 SVD vs LAPACK's, then one float32 rounding of each factor), the error below plain NF4's;
    after T = 2 the error is the CPU's within 1e-3 relative (specs/loftq.md: measured, a few codes may differ)."""
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((64, 128)) * 0.05).astype(np.float32)
    s = 2.0
    plain = reconstruction_error(W, quantize_4bit(W))
    errors = {}
    for iters in (1, 2):
        states = {
            be: loftq_state(torch.from_numpy(W), backend=be, r=8, scaling=s, iters=iters) for be in ("numpy", GPU)
        }
        (qc, Ac, Bc), (qg, Ag, Bg) = states["numpy"], states[GPU]
        assert Ag.device.type == Bg.device.type == DEVICE
        Ag, Bg = Ag.cpu(), Bg.cpu()
        if iters == 1:
            assert_same_4bit(qc, qg, "LoftQ T=1")
            BAc, BAg = Bc.double() @ Ac.double(), Bg.double() @ Ag.double()
            assert (BAg - BAc).abs().max().item() <= 16 * EPS32 * BAc.abs().max().item()
        errors[iters] = [reconstruction_error(W, host_q(q), A.numpy(), B.numpy(), s) for q, A, B in
                         ((qc, Ac, Bc), (qg, Ag, Bg))]  # fmt: skip
        assert errors[iters][1] < plain, (iters, errors[iters], plain)
    assert errors[1][1] == pytest.approx(errors[1][0], rel=1e-5)
    assert errors[2][1] == pytest.approx(errors[2][0], rel=1e-3)


@pytest.mark.gpu
def test_gpu_prepare_loftq_dora_matches_cpu(exact_matmul):
    """LOFTQ-3, DORA-3 on cupy: prepare_model(init="loftq", use_dora=True) gives every layer the CPU's base bytes,
    s B A within LoftQ's bound, a magnitude within the norm's bound of the CPU's, and an error below plain NF4's."""
    ref = tiny_llama(seed=1)
    originals = {k: v.clone() for k, v in ref.state_dict().items()}
    kw = dict(r=4, alpha=8, init="loftq", use_dora=True, compute_dtype="float32")
    cpu, gpu = tiny_llama(seed=1), tiny_llama(seed=1)
    prepare_model(cpu, backend="numpy", **kw)
    prepare_model(gpu, backend=GPU, **kw)
    assert gpu.qlora_config.init == "loftq" and gpu.qlora_config.use_dora
    for (name, a), b in zip(qlora_layers(cpu).items(), qlora_layers(gpu).values(), strict=True):
        assert_same_4bit(a.q, b.q, name)
        Ag, Bg, mg = (t.detach().cpu() for t in (b.lora_A, b.lora_B, b.lora_magnitude_vector))
        Ac, Bc, mc = (t.detach() for t in (a.lora_A, a.lora_B, a.lora_magnitude_vector))
        BAc, BAg = Bc.double() @ Ac.double(), Bg.double() @ Ag.double()
        bound_BA = 16 * EPS32 * BAc.abs().max().item()
        assert (BAg - BAc).abs().max().item() <= bound_BA, name
        # m = ||W_hat + s B A||_row: the adapters' difference moves it by at most s ||dBA_row|| <= s sqrt(in) bound_BA,
        # and each side's float32 norm carries gamma_{in + r + 2} || |W| + s |B| |A| ||_row
        W = a.dequantize_weight(torch.float64)
        Vabs = torch.linalg.vector_norm(W.abs() + a.scaling * Bc.double().abs() @ Ac.double().abs(), dim=1)
        bound_m = a.scaling * a.in_features**0.5 * bound_BA + 2 * gamma(a.in_features + a.r + 2) * Vabs
        assert ((mg.double() - mc.double()).abs() <= bound_m).all(), name
        Wo = originals[f"{name}.weight"].numpy()
        e = reconstruction_error(Wo, host_q(b.q), Ag.numpy(), Bg.numpy(), b.scaling)
        assert e < reconstruction_error(Wo, quantize_4bit(Wo)), name


# --- a DoRA adapter saved and loaded on the GPU ------------------------------------------------------------------


def logits(model, device):
    with torch.no_grad():
        return model(input_ids=IDS.to(device)).logits.float().cpu()


@pytest.mark.gpu
def test_gpu_dora_adapter_round_trips(tmp_path, exact_matmul):
    """DORA-3 on cupy: a trained-looking DoRA adapter saved from a GPU model loads into a fresh GPU model prepared
    from the adapter's settings with the same tensors and logits bit for bit, and into a CPU model with the same
    tensors and logits within 1e-4 of their scale."""
    model = tiny_llama(seed=4)
    prepare_model(model, backend=GPU, r=4, alpha=8, use_dora=True, compute_dtype="float32")
    torch.manual_seed(6)
    for m in qlora_layers(model).values():
        m.reset_lora_parameters("random")
        with torch.no_grad():
            m.lora_magnitude_vector.mul_(torch.empty_like(m.lora_magnitude_vector).uniform_(0.5, 1.5))
    model.eval()
    want = logits(model, DEVICE)
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny-llama")
    kw = {k: v for k, v in adapter_prepare_kwargs(tmp_path / "adapter").items() if k != "target"}
    assert kw["use_dora"] is True
    for backend, device in ((GPU, DEVICE), ("numpy", "cpu")):
        fresh = tiny_llama(seed=4)
        prepare_model(fresh, backend=backend, compute_dtype="float32", **kw)
        load_peft_adapter(fresh.eval(), tmp_path / "adapter")
        for (name, a), b in zip(qlora_layers(model).items(), qlora_layers(fresh).values(), strict=True):
            assert isinstance(b, DoRALinear) and b.device.type == device, name
            assert_same_4bit(a.q, b.q, name)
            for part in ("lora_A", "lora_B", "lora_magnitude_vector"):
                assert torch.equal(getattr(a, part).detach().cpu(), getattr(b, part).detach().cpu()), (name, part)
        got = logits(fresh, device)
        if device == DEVICE:
            assert torch.equal(got, want)
        else:
            assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()


# --- MEM-16 on the GPU: the ledger's DoRA temporaries against the CUDA allocator ---------------------------------


@pytest.mark.gpu
def test_gpu_dora_temporaries_match_the_ledger():
    """MEM-16 on cupy (bf16 compute, float32 LoRA: D = 1): the peak of allocated device memory over a DoRALinear's
    forward, and over its backward, above what was allocated before, is at least dora_layer_scratch's count (those
    tensors exist at once) and at most that plus what MEM-16 leaves out: (T, in) and (T, r) temporaries (at most
    four float32 copies of each at a time), the (out,) vectors, and 512 B of rounding per allocation (1 MiB)."""
    T_, in_f, out_f = 2048, 64, 8192  # (T, out) terms dominate: 64 MiB each in float32
    torch.manual_seed(0)
    layer = DoRALinear.from_linear(torch.nn.Linear(in_f, out_f, bias=False), backend=GPU, r=4, alpha=8)
    layer.reset_lora_parameters("random")
    assert layer.compute_dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    x = torch.randn(T_, in_f, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(T_, out_f, device=DEVICE, dtype=torch.bfloat16)
    layer(x).backward(dy)  # warm-up: kernels, cuBLAS workspace, the shared scratch
    want = impl.dora_layer_scratch(T_, in_f, out_f, compute_dtype="bfloat16", lora_dtype="float32", dropout=0.0)
    slack = 4 * 4 * T_ * (in_f + 4) + 4 * 4 * out_f + 2**20

    def peak_above_start(fn):
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start, out

    for p in (x, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector):
        p.grad = None
    fw, y = peak_above_start(lambda: layer(x))
    bw, _ = peak_above_start(lambda: y.backward(dy))
    assert want["forward"] <= fw <= want["forward"] + slack, (fw, want, slack)
    # Measured on an H200 (2026-12-02): the backward's allocator peak is one float32 (T, out) tensor above MEM-16's
    # count (336,134,656 B vs 268,435,456 B here): CUDA's sum over dim 0 of the (T, out) product dY * z allocates two
    # (T, out) float32 buffers of its own while it runs (traced op by op; specs/memory.md MEM-16 says so); the bound
    # allows exactly that one tensor more.
    unattributed = 4 * T_ * out_f
    assert want["backward"] <= bw <= want["backward"] + unattributed + slack, (bw, want, slack)
