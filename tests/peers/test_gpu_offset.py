"""DQ-1, DQ-5 on the device: torch.cuda's float32 mean (bitsandbytes' double-quant offset) equals the spec's
`absmax_mean(x, sm_count=<this GPU>)` and the CuPy kernel (backends/cupy_backend/offset.py) bit for bit.

Hundreds of tensors: lengths at and around every threshold of torch's launch (vectorisation at 129, the split at
255 * 512 + 1, each extra CTA, C > W = 512, the grid cap 16 * G * 512, the 256-values cap), the LLaMA shapes' block
counts, random lengths; absmax drawn directly as positive float32 vectors and taken from N(0, 0.02^2) bf16 weights
(blocks of 64); bitsandbytes' own quantize_4bit where it is installed.  Every mismatch is listed with its index,
length, plan and the bits of each side.  One CPU test compiles kernels/absmax_mean.cu with nvcc.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from qlora_ref.double_quant import VECTORIZED_FROM, absmax_mean, double_quantize, torch_reduce_plan

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (22016, 8192), (32000, 8192)]


@pytest.fixture(scope="module")
def device():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    threads = getattr(props, "max_threads_per_multi_processor", None)
    if threads is None:
        cupy = pytest.importorskip("cupy")
        threads = int(cupy.cuda.Device(0).attributes["MaxThreadsPerMultiProcessor"])
    return torch, {"sm_count": int(props.multi_processor_count), "max_threads_per_sm": int(threads)}


def _lengths(dev: dict) -> list[int]:
    """Every threshold of DQ-5's plan on this device, each with its neighbours, the real shapes and random lengths."""
    grid = dev["sm_count"] * (dev["max_threads_per_sm"] // 512)  # G for W = 512
    split = 255 * 512 + 1
    edges = [1, 2, 3, 4, 5, 31, 32, 33, 127, 128, 129, 130, 131, 255, 256, 257, 511, 512, 513, 2047, 2048, 2049]
    edges += [15641, split - 1, split, split + 1, 131072, 131073]
    edges += [20 * 8192, 20 * 8192 + 1]  # C = ceil(ceil(n / 512) / 16) steps from 20 to 21 CTAs
    edges += [16 * 512 * 512, 16 * 512 * 512 + 1]  # C = 512 -> 513 > W (on devices with G > 512)
    edges += [16 * grid * 512 - 1, 16 * grid * 512, 16 * grid * 512 + 1]  # ceil(p / 16) reaches the grid target
    edges += [256 * grid * 512 + 1]  # ceil(p / 256) > G: C grows past the target
    for rows, cols in SHAPES:
        n = rows * cols // 64
        edges += [n, n + 1, n + 2, n + 3]
    rng = np.random.default_rng(2026)
    edges += sorted(int(x) for x in np.exp(rng.uniform(0, np.log(5_000_000), 30)))
    return sorted(set(edges))


def _bits(x) -> str:
    return f"{int(np.float32(x).view(np.uint32)):08x}"


def _check(torch, x, label, dev, cupy_mean, mismatches):
    """Compare torch's mean of the device tensor x with the spec (and the CuPy kernel); record any difference."""
    assert x.is_contiguous() and x.dtype == torch.float32 and x.data_ptr() % 16 == 0, label
    want = x.mean().item()
    host = x.cpu().numpy()
    got = absmax_mean(host, **dev)
    row = {
        "i": len(mismatches["seen"]),
        "case": label,
        "n": host.size,
        "plan": tuple(torch_reduce_plan(host.size, **dev)),
    }
    mismatches["seen"].append(label)
    sides = {"torch": _bits(want), "spec": _bits(got)}
    if cupy_mean is not None:
        sides["cupy"] = _bits(cupy_mean(x).get())
    if len(set(sides.values())) > 1:
        mismatches["bad"].append(row | sides)


def _cupy_mean(dev):
    try:
        import cupy

        from backends.cupy_backend import offset
    except ImportError:
        return None
    return lambda x: offset.absmax_mean(cupy.from_dlpack(x.detach()), **dev)


def _report(mismatches) -> str:
    bad = mismatches["bad"]
    return f"{len(bad)} of {len(mismatches['seen'])} tensors differ:\n" + "\n".join(map(str, bad[:40]))


@pytest.mark.gpu
def test_torch_mean_is_the_spec_offset_at_every_threshold(device):
    """DQ-5: positive float32 vectors (uniform 0.04..0.1, log-normal) of every threshold length, several seeds."""
    torch, dev = device
    g = torch.Generator(device="cuda").manual_seed(0)
    mismatches = {"seen": [], "bad": []}
    cupy_mean = _cupy_mean(dev)
    for n in _lengths(dev):
        for seed in range(2):
            x = 0.04 + 0.06 * torch.rand(n, generator=g, device="cuda", dtype=torch.float32)
            _check(torch, x, f"uniform n={n} seed={seed}", dev, cupy_mean, mismatches)
        x = 0.05 * torch.exp(2.0 * torch.randn(n, generator=g, device="cuda", dtype=torch.float32))
        _check(torch, x, f"lognormal n={n}", dev, cupy_mean, mismatches)
    assert len(mismatches["seen"]) >= 200
    assert not mismatches["bad"], _report(mismatches)


@pytest.mark.gpu
def test_torch_mean_is_the_spec_offset_for_real_bf16_weights(device):
    """DQ-5: the block absmax of N(0, 0.02^2) bf16 weights at the LLaMA shapes (blocks of 64), 6 seeds each."""
    torch, dev = device
    mismatches = {"seen": [], "bad": []}
    cupy_mean = _cupy_mean(dev)
    for rows, cols in SHAPES:
        for seed in range(6):
            g = torch.Generator(device="cuda").manual_seed(1000 * seed + rows % 997)
            w = (torch.randn(rows, cols, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
            absmax = w.view(-1, 64).abs().amax(dim=1).float()  # bitsandbytes' first-level absmax, exactly
            del w
            _check(torch, absmax, f"bf16 {rows}x{cols} seed={seed}", dev, cupy_mean, mismatches)
    assert not mismatches["bad"], _report(mismatches)


@pytest.mark.gpu
def test_torch_vectorizes_from_the_documented_length(device):
    """DQ-5: torch 2.11 reads n > 128 as float4 vectors (VECTORIZED_FROM = 129); later sources say n >= 128.  At
    n = 128 the two trees differ, so this says which one the installed torch runs."""
    torch, dev = device
    g = torch.Generator(device="cuda").manual_seed(128)
    seen = {"129": 0, "128": 0}
    bad = []
    for seed in range(16):
        x = 0.04 + 0.06 * torch.rand(128, generator=g, device="cuda", dtype=torch.float32)
        want, host = _bits(x.mean().item()), x.cpu().numpy()
        for v in (129, 128):
            seen[str(v)] += want == _bits(absmax_mean(host, vectorized_from=v, **dev))
        if want != _bits(absmax_mean(host, vectorized_from=VECTORIZED_FROM, **dev)):
            bad.append((seed, want))
    assert not bad, f"torch {torch.__version__} at n = 128 matches vectorized_from: {seen} of 16; set VECTORIZED_FROM"


@pytest.mark.gpu
def test_bitsandbytes_state_is_the_spec_state_at_real_shapes(device):
    """DQ-1, DQ-2, DQ-5: bitsandbytes' quantize_4bit (NF4, double quantization) on this GPU: offset, nested codes and
    nested absmax equal the spec's double_quantize(absmax, sm_count=<this GPU>), byte for byte."""
    torch, dev = device
    bnb = pytest.importorskip("bitsandbytes.functional")
    bad = []
    for rows, cols in SHAPES:
        for seed in range(3):
            g = torch.Generator(device="cuda").manual_seed(77 + seed)
            w = (torch.randn(rows, cols, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
            absmax = w.view(-1, 64).abs().amax(dim=1).float().cpu().numpy()
            _, state = bnb.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            del w
            q, nested, offset = double_quantize(absmax, sm_count=dev["sm_count"])
            got = {"offset": _bits(offset), "codes": q, "nested": nested.view(np.uint32)}
            want = {
                "offset": _bits(state.offset.item()),
                "codes": state.absmax.cpu().numpy(),
                "nested": state.state2.absmax.cpu().numpy().view(np.uint32),
            }
            for key in got:
                if not np.array_equal(got[key], want[key]):
                    where = np.flatnonzero(np.asarray(got[key] != want[key]).ravel())[:3].tolist()
                    bad.append(((rows, cols), seed, key, where, got["offset"], want["offset"]))
    assert not bad, f"state differs from bitsandbytes ((shape), seed, key, first indices, our/bnb offset): {bad}"


@pytest.mark.gpu
def test_cupy_backend_state_is_bitsandbytes_state_at_real_shapes(device):
    """Issue 12's bar: the CuPy backend's quantize_4bit (NF4, DQ, blocksize 64) of N(0, 0.02^2) bf16 weights equals
    bitsandbytes' on this GPU in every byte of the state (packed codes, absmax codes, nested absmax, offset), on 204
    tensors of the LLaMA shapes up to 22016x8192 and 32000x8192 (34 seeds each), compared on the device."""
    torch, _ = device
    bnb = pytest.importorskip("bitsandbytes.functional")
    from backends import get_backend
    from backends.bridge import cupy_to_torch

    be = get_backend("cupy")
    bad, seen = [], 0
    for rows, cols in SHAPES:
        for seed in range(34):
            g = torch.Generator(device="cuda").manual_seed(1000 * rows + seed)
            w = (torch.randn(rows, cols, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
            packed, state = bnb.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            q = be.quantize_4bit(w)
            del w
            got = {
                "packed": cupy_to_torch(q.packed),
                "absmax": cupy_to_torch(q.absmax_q),
                "nested": cupy_to_torch(q.nested_absmax),
            }
            want = {"packed": packed.reshape(-1), "absmax": state.absmax, "nested": state.state2.absmax}
            for key in got:
                if not torch.equal(got[key].reshape(-1), want[key].reshape(-1)):
                    bad.append(((rows, cols), seed, key))
            if _bits(np.float32(q.offset)) != _bits(state.offset.item()):
                bad.append(((rows, cols), seed, "offset", _bits(np.float32(q.offset)), _bits(state.offset.item())))
            seen += 1
    assert seen >= 200
    assert not bad, f"{len(bad)} differences from bitsandbytes ((shape), seed, part): {bad[:10]}"


@pytest.mark.gpu
def test_cupy_offset_refuses_what_it_cannot_reproduce(device):
    """DQ-5's preconditions at the CuPy boundary: 16-byte aligned float32 vectors, a device SM count."""
    cupy = pytest.importorskip("cupy")
    from backends.cupy_backend import offset

    _, dev = device
    a = cupy.full(1001, 0.5, cupy.float32)
    assert _bits(offset.absmax_mean(a, **dev).get()) == _bits(absmax_mean(np.full(1001, 0.5, np.float32)))
    with pytest.raises(ValueError, match="16-byte aligned"):
        offset.absmax_mean(a[1:], **dev)
    with pytest.raises(TypeError, match="1-d float32"):
        offset.absmax_mean(a.astype(cupy.float64), **dev)
    with pytest.raises(ValueError, match="sm_count is required"):
        offset.absmax_mean(a, None)
    out = cupy.zeros(2, cupy.float32)
    offset.absmax_mean(a, **dev, out=out[1:])
    assert out[0].item() == 0.0 and out[1].item() == 0.5
    assert offset.current_device() == dev


def test_absmax_mean_kernel_compiles_with_nvcc(tmp_path):
    """kernels/absmax_mean.cu compiles for sm_90 with the registry's options (what NVRTC gets: common.cuh inlined)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    from backends.cupy_backend import build

    unit = tmp_path / "absmax_mean.cu"
    unit.write_text(build.source("absmax_mean.cu"))
    cmd = [nvcc, "-arch=sm_90", *build.OPTIONS, "-Xptxas", "-warn-spills", "-c", str(unit), "-o", str(tmp_path / "o")]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "spill" not in run.stderr, run.stderr
