"""The spec against bitsandbytes 0.50.2 installed in CI (its CPU backend), and its state-dict format.

bitsandbytes' CPU backend is not its CUDA reference (tests/spec/test_golden.py is).  Where the two differ, every
differing element must fall in one of the classes listed in specs/peers.md; nothing else may differ:

    CPU-1  all-zero block: CPU writes code 7 (NF4) / 0 (FP4) where CUDA writes 0, and for a partial last block it
           stores its clamp 1e-38 as absmax where CUDA stores 0 (BW-6)
    CPU-2  FP4 zero magnitude: CPU picks +0 (code 0) or -0 (code 8) by another rule than CUDA's sign of y (BW-5)
    CPU-3  thresholds and reciprocal: CPU decides on float32 midpoints of the table (CUDA: its own literals, CB-5) with
           an exact reciprocal or a division (CUDA: rcp.approx, BW-3); a code can move to its neighbour when y lies
           within 2 ulp of either decision point
    CPU-4  offset: CPU's float32 mean sums in another order (within the summation error bound) (DQ-1)
    CPU-5  nested codes: CPU's 65,536-bin lookup table picks the neighbouring code near a midpoint (DQ-2)
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import require
from hypothesis import given
from hypothesis import strategies as st

import qlora_ref as Q
from qlora_ref import codebooks as C
from qlora_ref.blockwise import block_absmax, scale_blocks

try:
    import bitsandbytes.functional as F
    import torch

    HAVE_BNB = True
except Exception:  # pragma: no cover - CI installs it; tests below fail there via require()
    HAVE_BNB = False


@pytest.fixture(autouse=True)
def _need_bnb():
    require(HAVE_BNB, "bitsandbytes/torch not installed")


TORCH_DTYPE = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def _tensor_and_numpy(rng, n, dtype, scale, zero_block_at, blocksize):
    x = torch.from_numpy((rng.standard_normal(n) * scale).astype(np.float32))
    if zero_block_at is not None:
        start = min(zero_block_at * blocksize, max(0, n - blocksize))
        x[start : start + blocksize] = 0
    x = x.to(getattr(torch, dtype))
    xn = x.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else x.numpy()
    return x, xn


def _ulp_distance(a, b):
    a, b = np.float32(a), np.float32(b)
    ia, ib = (int(np.array(v, np.float32).view(np.int32)) for v in (a, b))
    ia = ia if ia >= 0 else -(ia & 0x7FFFFFFF)
    ib = ib if ib >= 0 else -(ib & 0x7FFFFFFF)
    return abs(ia - ib)


def _explain_code_difference(quant_type, ours, theirs, y, block_is_zero):
    """Return the CPU-n class that explains one differing 4-bit code, or None."""
    if block_is_zero:
        return "CPU-1" if theirs == (7 if quant_type == "nf4" else 0) else None
    if quant_type == "fp4" and ours & 7 == 0 and theirs & 7 == 0:
        return "CPU-2"
    if quant_type == "nf4":
        lo = min(ours, theirs)
        points = (C.nf4_thresholds()[lo], C.midpoint_thresholds(Q.nf4_table())[lo])
        if abs(int(ours) - int(theirs)) == 1 and min(_ulp_distance(y, t) for t in points) <= 2:
            return "CPU-3"
    else:
        order = list(C.FP4_CODES_ASCENDING)
        magnitudes = np.sort(Q.fp4_table()[:8])
        if (ours & 8) == (theirs & 8):
            a, b = order.index(ours & 7), order.index(theirs & 7)
            points = (C.FP4_THRESHOLDS[min(a, b)], C.midpoint_thresholds(magnitudes)[min(a, b)])
            if abs(a - b) == 1 and min(_ulp_distance(abs(y), t) for t in points) <= 2:
                return "CPU-3"
    return None


@given(
    seed=st.integers(0, 2**32 - 1),
    nblocks=st.integers(1, 40),
    tail=st.integers(0, 63),
    blocksize=st.sampled_from(Q.BLOCKSIZES),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
    double_quant=st.booleans(),
    scale=st.sampled_from([1e-3, 0.02, 1.0, 30.0]),
    zero_block_at=st.one_of(st.none(), st.integers(0, 5)),
)
def test_codes_absmax_and_nested_state_match_bnb_cpu(
    seed, nblocks, tail, blocksize, quant_type, dtype, double_quant, scale, zero_block_at
):
    """BW-2..BW-6, DQ-1, DQ-2 against bnb's CPU backend; every difference is one of CPU-1..CPU-5."""
    rng = np.random.default_rng(seed)
    n = nblocks * blocksize + tail
    x, xn = _tensor_and_numpy(rng, n, dtype, scale, zero_block_at, blocksize)
    packed, state = F.quantize_4bit(x, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)
    q = Q.quantize_4bit(xn, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant, dtype=dtype)

    x32 = Q.bf16_to_f32(xn) if dtype == "bfloat16" else xn.astype(np.float32)
    absmax = block_absmax(x32, blocksize)
    # first-level absmax: exact (bnb keeps it, or it is what double quantization starts from)
    bnb_absmax = state.absmax.numpy() if not double_quant else None
    if bnb_absmax is not None:
        differ = bnb_absmax.view(np.uint32) != q.absmax.view(np.uint32)
        assert np.all((q.absmax[differ] == 0) & (bnb_absmax[differ] == np.float32(1e-38))), "absmax outside CPU-1"

    ours, theirs = q.codes(), Q.unpack_4bit(packed.numpy().ravel(), n)
    y = scale_blocks(x32, absmax, blocksize)[:n]
    zero = np.repeat(absmax == 0, blocksize)[:n]
    unexplained = [
        (int(i), int(ours[i]), int(theirs[i]), float(y[i]))
        for i in np.nonzero(ours != theirs)[0]
        if _explain_code_difference(quant_type, ours[i], theirs[i], y[i], zero[i]) is None
    ]
    assert not unexplained, f"codes differ outside CPU-1..3: {unexplained[:5]}"

    if double_quant:
        cpu_offset = np.float32(state.offset.item())
        assert cpu_offset == np.float32(torch.from_numpy(absmax).mean().item())  # CPU-4: torch's CPU mean
        bound = 2 * absmax.size * np.finfo(np.float32).eps * float(absmax.mean()) + 1e-45
        assert abs(float(cpu_offset) - float(q.offset)) <= bound
        # CPU-5: with the CPU's own offset our 8-bit quantizer must agree except next to a midpoint
        code2 = Q.dynamic_map(signed=True)
        codes2, nested = Q.quantize_blockwise_8bit(absmax - cpu_offset, code2, 256)
        assert np.array_equal(nested.view(np.uint32), state.state2.absmax.numpy().view(np.uint32))
        y2 = scale_blocks(absmax - cpu_offset, nested, 256)[: absmax.size]
        cpu_codes = state.absmax.numpy()
        for i in np.nonzero(codes2 != cpu_codes)[0]:
            a, b = int(codes2[i]), int(cpu_codes[i])
            midpoint = (code2[min(a, b)] + code2[max(a, b)]) / 2
            assert abs(a - b) == 1 and abs(y2[i] - midpoint) < 4e-5, f"nested code {i}: ours {a}, bnb {b}"


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_our_state_dict_loads_in_bnb_and_dequantizes_identically(quant_type, double_quant, dtype):
    """FMT-1..FMT-5: bnb's QuantState.from_dict reads our entries; its as_dict writes the same bytes back;
    bnb's dequantize_4bit gives our values bit for bit (BW-7, DQ-3)."""
    rng = np.random.default_rng(7)
    x, xn = _tensor_and_numpy(rng, 64 * 300 + 17, dtype, 0.02, None, 64)
    q = Q.quantize_4bit(xn, quant_type=quant_type, double_quant=double_quant, dtype=dtype)
    ours = q.to_bnb_state_dict("layer.weight")
    tensors = {k: torch.from_numpy(v.copy()) for k, v in ours.items()}
    packed = tensors.pop("layer.weight")
    qs = F.QuantState.from_dict({k[len("layer.weight.") :]: v for k, v in tensors.items()}, device="cpu")
    back = qs.as_dict(packed=True)
    for key, value in back.items():
        mine = ours[f"layer.weight.{key}"]
        theirs = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, key
        assert np.array_equal(mine.view(np.uint8), theirs.view(np.uint8)), key
    deq_bnb = F.dequantize_4bit(packed, qs)
    deq_ours = Q.dequantize_4bit(q)
    if dtype == "bfloat16":
        deq_ours = Q.bf16_to_f32(deq_ours)
    deq_bnb = deq_bnb.float().numpy()
    deq_bnb, deq_ours = deq_bnb.ravel().astype(np.float32), deq_ours.ravel().astype(np.float32)
    assert np.array_equal(deq_bnb, deq_ours)  # values; the sign of zero may differ only by CPU-2:
    sign_differs = deq_bnb.view(np.uint32) != deq_ours.view(np.uint32)
    assert quant_type == "fp4" or not sign_differs.any()
    assert np.all(q.codes()[sign_differs] == 8)


def test_json_blob_is_bnb_byte_for_byte():
    """FMT-2: same JSON text as bnb for the documented 64x128 bf16 NF4 double-quant example."""
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    _, qs = F.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
    q = Q.quantize_4bit(x.view(torch.int16).numpy().view(np.uint16), dtype="bfloat16")
    blob_key = "weight.quant_state.bitsandbytes__nf4"
    ours = json.loads(bytes(q.to_bnb_state_dict()[blob_key]).decode())
    theirs = json.loads(bytes(qs.as_dict(packed=True)["quant_state.bitsandbytes__nf4"].numpy()).decode())
    assert list(ours) == list(theirs)
    assert {k: v for k, v in ours.items() if k != "nested_offset"} == {
        k: v for k, v in theirs.items() if k != "nested_offset"
    }


def test_bnb_state_dict_loads_into_ours():
    """FMT-5: a state dict bnb wrote (CPU) reads into Quantized4bit and decodes to bnb's values."""
    x = torch.randn(96, 200, generator=torch.Generator().manual_seed(1)) * 0.05
    for quant_type in ("nf4", "fp4"):
        for double_quant in (False, True):
            packed, qs = F.quantize_4bit(x, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
            d = {f"w.{k}": v for k, v in qs.as_dict(packed=True).items()} | {"w": packed}
            q = Q.Quantized4bit.from_bnb_state_dict(d, prefix="w")
            assert q.shape == (96, 200) and q.quant_type == quant_type and q.double_quant == double_quant
            assert np.array_equal(q.packed, packed.numpy().ravel())
            want = F.dequantize_4bit(packed, qs).numpy()
            assert np.array_equal(Q.dequantize_4bit(q), want)


def test_mismatched_state_dict_is_a_clear_error():
    q = Q.quantize_4bit(np.ones(256, np.float32))
    d = q.to_bnb_state_dict()
    d["weight.absmax"] = d["weight.absmax"][:-1]
    with pytest.raises(ValueError, match="absmax_q does not match its data"):
        Q.Quantized4bit.from_bnb_state_dict(d)
