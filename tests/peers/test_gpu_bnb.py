"""The CuPy backend against bitsandbytes' CUDA kernels on the same GPU, byte for byte (gpu marker).

bitsandbytes 0.50.2 is the peer (SPEC-NOTES §1): its ``quantize_4bit`` / ``dequantize_4bit`` run on the device and our
kernels must give identical packed bytes, absmax (plain) or nested state (double quantization), and identical
dequantized values, both from our state and from bitsandbytes' own state.  Skipped without CuPy/CUDA or bitsandbytes.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

DTYPES = ("float32", "float16", "bfloat16")
SHAPES = [(64, 128), (257, 129), (1000, 1001), (4096, 1024)]  # odd sizes, partial blocks, > 256 nested blocks


@pytest.fixture(scope="module")
def bnb():
    pytest.importorskip("cupy")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return pytest.importorskip("bitsandbytes.functional")


def _inputs(torch, shape, dtype, kind, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(shape, generator=g, device="cuda", dtype=torch.float32) * 0.02
    if kind == "zero_blocks":
        w.view(-1)[:4096] = 0.0
    elif kind == "heavy":
        w = w * torch.exp(torch.randn(shape, generator=g, device="cuda") * 3)
    elif kind == "midpoints":  # exact NF4 thresholds with a power-of-two absmax in every block of 64
        import qlora_ref

        t = torch.tensor(qlora_ref.nf4_thresholds(), device="cuda")
        idx = torch.randint(0, t.numel(), shape, generator=g, device="cuda")
        w = t[idx] * 0.25
        w.view(-1)[::64] = 0.25
    if dtype == "float16":  # stay finite in float16 (the heavy tails overflow it; we refuse inf, bnb does not)
        w = w.clamp(-60000.0, 60000.0)
    return w.to(getattr(torch, dtype))


def _bits(t):
    import torch

    t = t.detach().contiguous()
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()]).cpu().numpy()


def _from_bnb_state(packed, state, shape, dtype):
    """bitsandbytes' QuantState as our device state (zero-copy views of its tensors)."""
    import cupy

    from backends.cupy_backend.ops import DeviceQuantized4bit

    common = dict(
        packed=cupy.from_dlpack(packed.reshape(-1)),
        shape=shape,
        dtype=dtype,
        quant_type=state.quant_type,
        blocksize=state.blocksize,
    )
    if state.nested:
        return DeviceQuantized4bit(
            absmax_q=cupy.from_dlpack(state.absmax),
            offset=np.float32(state.offset.item()),
            nested_absmax=cupy.from_dlpack(state.state2.absmax),
            **common,
        )
    return DeviceQuantized4bit(absmax=cupy.from_dlpack(state.absmax), **common)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("kind", ["normal", "zero_blocks", "heavy", "midpoints"])
def test_same_bytes_as_bitsandbytes(bnb, dtype, quant_type, double_quant, blocksize, kind):
    """Packed bytes and plain absmax identical; our dequantization of bitsandbytes' own state identical to its
    dequantization; with double quantization, the nested state and our end-to-end result identical wherever the
    offset agrees (see test_double_quant_offset_matches_bitsandbytes for where it does not)."""
    import torch

    from backends import get_backend

    be = get_backend("cupy")
    for i, shape in enumerate(SHAPES):
        w = _inputs(torch, shape, dtype, kind, seed=blocksize * 10 + i)
        packed, state = bnb.quantize_4bit(
            w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
        )
        q = be.quantize_4bit(w, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
        where = f"{shape} {dtype} {quant_type} bs={blocksize} dq={double_quant} {kind}"
        assert np.array_equal(q.packed.get(), _bits(packed).ravel()), f"packed bytes differ: {where}"
        want = bnb.dequantize_4bit(packed, state)  # bitsandbytes' own state, its kernel
        out = torch.empty(shape, dtype=getattr(torch, dtype), device="cuda")
        be.dequantize_4bit(_from_bnb_state(packed, state, shape, dtype), out=out)
        assert np.array_equal(_bits(out), _bits(want)), f"our dequantization of bnb's state differs: {where}"
        same_offset = not double_quant or np.float32(q.offset).view(np.int32) == _bits(state.offset.reshape(1))[0]
        if double_quant and same_offset:
            assert np.array_equal(q.absmax_q.get(), _bits(state.absmax)), f"absmax codes: {where}"
            assert np.array_equal(q.nested_absmax.get().view(np.int32), _bits(state.state2.absmax)), where
        if not double_quant:
            assert np.array_equal(q.absmax.get().view(np.int32), _bits(state.absmax)), f"absmax: {where}"
        if same_offset:
            be.dequantize_4bit(q, out=out)
            assert np.array_equal(_bits(out), _bits(want)), f"dequantized values differ: {where}"


def test_double_quant_offset_matches_bitsandbytes(bnb):
    """DQ-1, DQ-5: our offset equals bitsandbytes' absmax.mean() bit for bit, in one CTA and where torch splits the
    sum over several CTAs (the CuPy backend follows this device's launch plan)."""
    import torch

    from backends import get_backend

    be = get_backend("cupy")
    bad = []
    for i, shape in enumerate([(257, 129), (1000, 1001), (4096, 1024), (333, 64 * 77)]):
        for blocksize in (32, 64, 256):
            w = _inputs(torch, shape, "float32", "normal", seed=blocksize * 10 + i)
            _, state = bnb.quantize_4bit(w, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
            q = be.quantize_4bit(w, blocksize=blocksize)
            ulps = abs(int(np.float32(q.offset).view(np.int32)) - int(_bits(state.offset.reshape(1))[0]))
            if ulps:
                bad.append((shape, blocksize, q.nblocks, ulps))
    assert not bad, f"offset differs from bitsandbytes (shape, blocksize, nblocks, ulps): {bad}"
