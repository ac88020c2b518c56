"""DQ-1, DQ-5: the offset in torch's CUDA order with the sum split over several CTAs, checked on the CPU.

The GPU half (torch.mean and bitsandbytes on the device, bit for bit) is tests/peers/test_gpu_offset.py.  Here:
the split changes nothing below its threshold, the vectorised emulation equals a literal CTA-by-CTA, lane-by-lane
transcription of torch's loops (shared-memory and shuffle stages written out), the sum stays within the error bound
of its own tree, the plan follows setReduceConfig's arithmetic, and bad launch inputs are refused.
"""

from __future__ import annotations

import numpy as np
import pytest

from qlora_ref.double_quant import (
    BLOCK_THREADS,
    MAX_32BIT_INDEXED,
    absmax_mean,
    checked_reduce_plan,
    double_quantize,
    torch_reduce_plan,
)

U = 2.0**-24  # float32 unit roundoff
H100 = 132  # SMs of an H100 SXM and of an H200; 2048 threads each (the defaults)
SPLIT_FROM = 255 * BLOCK_THREADS + 1  # first n with ceil(n / 512) >= 256 values per thread: 130,561
REAL = {  # blocks of 64 weights in LLaMA-shaped linears
    "4096x4096": 4096 * 4096 // 64,
    "11008x4096": 11008 * 4096 // 64,
    "8192x8192": 8192 * 8192 // 64,
    "22016x8192": 22016 * 8192 // 64,
    "32000x8192": 32000 * 8192 // 64,
}


def _absmax(n: int, seed: int) -> np.ndarray:
    """Positive float32 values spread like block absmax of N(0, 0.02^2) weights (about 0.04 .. 0.1)."""
    rng = np.random.default_rng(seed)
    return (0.04 + 0.06 * rng.random(n)).astype(np.float32)


def _bits(x) -> int:
    return int(np.float32(x).view(np.uint32))


# --- a literal transcription of torch's kernel (Reduce.cuh), one CTA at a time ---------------------------------------


def _block_x_reduce(x: np.ndarray, warp: int = 32) -> np.float32:
    """block_x_reduce for lane 0: shared memory for offsets W/2 .. warp, then __shfl_down_sync with offsets warp/2 .. 1
    (a lane whose source lane is past the warp keeps its own value)."""
    v = x.astype(np.float32).copy()
    dim_x = v.size
    if dim_x > warp:
        offset = dim_x // 2
        while offset >= warp:
            v[:offset] = v[:offset] + v[offset : 2 * offset]
            offset //= 2
        dim_x = warp
    v = v[:dim_x].copy()
    offset = dim_x >> 1
    while offset > 0:
        src = np.arange(dim_x) + offset
        other = np.where(src < dim_x, v[np.minimum(src, dim_x - 1)], v)
        v = v + other
        offset >>= 1
    return np.float32(v[0])


def _torch_literal(a: np.ndarray, lanes: int, vec: int, ctas: int) -> np.float32:
    """ReduceOp::run for one output: thread_reduce (vectorised or not), block_x_reduce, then global_reduce."""
    n = a.size
    f32 = np.float32
    partials = []
    for c in range(ctas):
        acc = np.zeros((lanes, 4), f32)
        idx = c * lanes + np.arange(lanes)  # input_idx() = lane + cta * W (vectors when vec = 4)
        step = lanes * ctas  # step_input
        if vec == 4:
            while True:  # while (idx * 4 + 3 < end): load a float4, add element i to value_list[i]
                live = idx * 4 + 3 < n
                if not live.any():
                    break
                loads = a[(4 * idx[live])[:, None] + np.arange(4)]
                acc[live] = acc[live] + loads
                idx = idx + step
            tail_start = n - n % 4
            if c == 0:  # should_reduce_tail(): CTA 0 only
                for t in range(n % 4):
                    acc[t, 0] = f32(acc[t, 0] + a[tail_start + t])
        else:
            m = 0
            while True:  # element idx + i * step goes to value_list[i], four at a time
                live = idx < n
                if not live.any():
                    break
                acc[live, m % 4] = acc[live, m % 4] + a[idx[live]]
                idx = idx + step
                m += 1
        lane = ((acc[:, 0] + acc[:, 1]) + acc[:, 2]) + acc[:, 3]
        partials.append(_block_x_reduce(lane))
    if ctas == 1:
        return partials[0]
    value = np.zeros(lanes, f32)  # last CTA: lane t reads partials t, t + W, ... from ident 0
    for t in range(lanes):
        for j in range(t, ctas, lanes):
            value[t] = f32(value[t] + partials[j])
    return _block_x_reduce(value)


def _literal_mean(a: np.ndarray, **kw) -> np.float32:
    lanes, vec, ctas = torch_reduce_plan(a.size, **kw)
    return np.float32(_torch_literal(a, lanes, vec, ctas) * (np.float32(1.0) / np.float32(a.size)))


# --- tests ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 64, 127, 128, 129, 130, 4096, 15641, SPLIT_FROM - 2, SPLIT_FROM - 1])
def test_one_cta_below_the_split_whatever_the_device(n):
    """DQ-5: below 256 values per thread torch keeps one CTA, so every device gives the single-CTA (DQ-1) bits."""
    for sm_count in (1, 8, 108, H100, 1000):
        assert torch_reduce_plan(n, sm_count=sm_count).ctas == 1
    for seed in range(3):
        a = _absmax(n, seed)
        assert _bits(absmax_mean(a, sm_count=H100)) == _bits(absmax_mean(a)), (n, seed)


def test_split_starts_at_256_values_per_thread():
    """DQ-5: n = 255 * 512 + 1 is the first length with ceil(n / 512) = 256: C = ceil(256 / 16) = 16 CTAs."""
    assert torch_reduce_plan(SPLIT_FROM - 1, sm_count=H100).ctas == 1
    assert torch_reduce_plan(SPLIT_FROM, sm_count=H100) == (512, 4, 16)


def test_plan_follows_set_reduce_config():
    """DQ-5's plan at many n: W, vec as in the single CTA; C = max(min(G, ceil(p/16)), ceil(p/256)); after the split
    every thread reads at most 256 values, and C = ceil(p / 16) unless the grid target G caps it."""
    rng = np.random.default_rng(5)
    lengths = list(REAL.values()) + [int(x) for x in rng.integers(1, 6_000_000, 300)] + [2**29]
    for n in lengths:
        for sm_count in (1, 8, 114, H100):
            lanes, vec, ctas = torch_reduce_plan(n, sm_count=sm_count)
            assert vec == (4 if n > 128 else 1) and lanes == min(1 << ((n // vec).bit_length() - 1), 512)
            per_thread = -(-n // lanes)
            grid_target = sm_count * (2048 // lanes)
            if per_thread < 256:
                assert ctas == 1
                continue
            assert ctas == max(min(grid_target, -(-per_thread // 16)), -(-per_thread // 256))
            assert -(-n // (lanes * ctas)) <= 256
            if ctas < grid_target:
                assert -(-per_thread // 16) == ctas


def test_real_shapes_plan():
    """DQ-5 at 132 SMs, as specs/double_quant.md lists it: C = ceil(ceil(n / 512) / 16) up to the cap G = 528."""
    got = {name: torch_reduce_plan(n, sm_count=H100).ctas for name, n in REAL.items()}
    assert got == {"4096x4096": 32, "11008x4096": 86, "8192x8192": 128, "22016x8192": 344, "32000x8192": 500}
    cap_from = 16 * 528 * 512 + 1  # ceil(p / 16) > G from p = 16 G + 1
    assert torch_reduce_plan(cap_from - 1, sm_count=H100).ctas == 528
    assert torch_reduce_plan(cap_from, sm_count=H100).ctas == 528
    assert torch_reduce_plan(cap_from, sm_count=H100 + 1).ctas == 529  # only past the cap does the SM count matter


@pytest.mark.parametrize(
    "n, sm_count",
    [
        (1, H100),
        (5, H100),
        (100, H100),
        (128, H100),
        (129, H100),
        (1001, H100),
        (SPLIT_FROM, H100),
        (200_003, H100),  # n % 4 = 3: the tail on lanes 0..2 of CTA 0
        (262_146, 8),  # a small device: G = 32 caps C below ceil(p / 16) = 33
        (REAL["4096x4096"], H100),
        (REAL["8192x8192"], 114),
        (4_325_377, H100),  # C = 528 > W = 512: lanes 0..15 of the last CTA add two partials
    ],
)
def test_emulation_equals_a_literal_transcription_of_torch(n, sm_count):
    """DQ-5: the vectorised emulation (zero padding, halving folds) equals torch's loops written out one CTA at a time
    (only live lanes add; shared-memory stage then shuffles; the last CTA's strided reads of the partials)."""
    for seed in range(2):
        a = _absmax(n, seed)
        assert _bits(absmax_mean(a, sm_count=sm_count)) == _bits(_literal_mean(a, sm_count=sm_count)), (n, seed)


def test_vectorized_from_128_follows_later_torch():
    """DQ-5: torch 2.11 vectorises from dim0 >= 128 (the default, measured): at n = 128 W = 32 float4 lanes; older
    sources (vectorized_from=129) run 128 scalar lanes there."""
    assert torch_reduce_plan(128) == (32, 4, 1)
    assert torch_reduce_plan(128, vectorized_from=129) == (128, 1, 1)
    for seed in range(4):
        a = _absmax(128, seed)
        want = _literal_mean(a, vectorized_from=128)
        assert _bits(absmax_mean(a, vectorized_from=128)) == _bits(want)


def _tree_depth(n: int, lanes: int, vec: int, ctas: int) -> int:
    """Most roundings on any path from a value to S: its chain, the tail add, 3 combines, the CTA fold, the partials'
    chain and the last fold."""
    chain = -(-(n // vec) // (lanes * ctas)) if vec == 4 else -(-n // (4 * lanes))
    folds = 2 * (lanes.bit_length() - 1)
    return chain + 1 + 3 + folds + (-(-ctas // lanes) if ctas > 1 else 0)


@pytest.mark.parametrize("name", sorted(REAL) + ["cap"])
def test_multi_cta_mean_within_its_tree_bound(name):
    """DQ-1, DQ-5: for values >= 0, |S - sum| <= gamma_d * sum with d the tree's depth (Higham, thm 4.1 for any
    summation tree), and the product with f32(1/n) adds two roundings: |offset - mean| <= ((1 + gamma_d)(1 + u)^2 - 1)
    mean.  The float64 mean of float32 values is exact to ~1e-16 relative, far inside the bound."""
    n = REAL.get(name, 4_325_377)
    plan = torch_reduce_plan(n, sm_count=H100)
    d = _tree_depth(n, *plan)
    gamma = d * U / (1 - d * U)
    bound = (1 + gamma) * (1 + U) ** 2 - 1
    a = _absmax(n, 7)
    mean = float(a.astype(np.float64).sum() / n)
    offset = float(absmax_mean(a, sm_count=H100))
    assert abs(offset - mean) <= bound * mean, (n, plan, offset, mean, bound)


def test_the_split_changes_bits_for_some_inputs():
    """DQ-5 is needed: at 4096x4096 (32 CTAs) the split order and the single-CTA order differ for some inputs."""
    n = REAL["4096x4096"]
    inputs = [_absmax(n, seed) for seed in range(12)]
    differ = sum(_bits(absmax_mean(a, sm_count=H100)) != _bits(absmax_mean(a)) for a in inputs)
    assert differ >= 1


def test_double_quantize_uses_the_devices_offset():
    """DQ-1, DQ-2: double_quantize(sm_count=...) centres on that device's offset and quantizes around it."""
    a = _absmax(REAL["4096x4096"], 3)
    q, nested, offset = double_quantize(a, sm_count=H100)
    assert _bits(offset) == _bits(absmax_mean(a, sm_count=H100))
    q0, nested0, offset0 = double_quantize(a)
    assert _bits(offset0) == _bits(absmax_mean(a))
    if _bits(offset) == _bits(offset0):
        assert np.array_equal(q, q0) and np.array_equal(nested, nested0)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(sm_count=0), "sm_count must be a positive int"),
        (dict(sm_count=True), "sm_count must be a positive int"),
        (dict(sm_count=1.5), "sm_count must be a positive int"),
        (dict(sm_count=H100, max_threads_per_sm=0), "max_threads_per_sm must be a positive int"),
        (dict(vectorized_from=64), "vectorized_from must be 129"),
    ],
)
def test_bad_launch_inputs_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        absmax_mean(_absmax(1000, 0), **kw)


def test_empty_and_too_long_inputs_are_refused():
    with pytest.raises(ValueError, match="at least one absmax value"):
        absmax_mean(np.zeros(0, np.float32))
    kw = dict(max_threads_per_sm=2048, vectorized_from=129)
    assert checked_reduce_plan(MAX_32BIT_INDEXED, sm_count=H100, **kw).ctas == 2**20 // 256  # p / 256 > G
    with pytest.raises(ValueError, match="2\\*\\*29"):
        checked_reduce_plan(MAX_32BIT_INDEXED + 1, sm_count=H100, **kw)
    assert checked_reduce_plan(MAX_32BIT_INDEXED + 1, sm_count=None, **kw).ctas == 1  # the CPU order has no limit


def test_quantize_4bit_takes_the_device_order():
    """DQ-5 through the public API: quantize_4bit(sm_count=...) carries the device order into the state's offset
    (the same offset double_quantize gives); None keeps the one-CTA order."""
    from qlora_ref import quantize_4bit
    from qlora_ref.double_quant import double_quantize

    w = (np.random.default_rng(5).standard_normal((2048, 4096)) * 0.02).astype(np.float32)  # 131,072 blocks: split
    a = np.abs(w.reshape(-1, 64)).max(axis=1).astype(np.float32)
    for sm in (None, H100):
        q = quantize_4bit(w, sm_count=sm)
        assert _bits(q.offset) == _bits(double_quantize(a, sm_count=sm)[2])
