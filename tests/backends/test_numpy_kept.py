"""What the numpy backend keeps to save CPU time, without changing a bit of any result.

- DequantCache: a bound dequantize launch decodes once, then copies its values.  The frozen base never changes, so
  every launch after the first must write the spec's bits again (also after the buffer was overwritten in between, as
  the layers' shared scratch buffer is), the copies stay within the budget, and a copy is given back to the budget
  when its launch is gone.
- KeepMemo: a forward's dropout mask, served again to the backward's redraw (then dropped): the same bits as a fresh
  draw, within its budget, oldest dropped first.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

import qlora_ref
from backends import get_backend
from backends import numpy_backend as nb


@pytest.fixture
def cache(monkeypatch):
    c = nb.DequantCache(budget_bytes=1 << 30)
    monkeypatch.setattr(nb, "DEQUANT_CACHE", c)
    return c


def _q(shape=(48, 96), seed=0, **kw):
    W = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return qlora_ref.quantize_4bit(W, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [True, False])
def test_every_launch_writes_the_spec_bits(cache, dtype, double_quant):
    q = _q(double_quant=double_quant)
    out = torch.empty(q.shape, dtype=dtype)
    want = torch.empty_like(out)
    get_backend("numpy").dequantize_4bit(q, out=want)  # the unbound path decodes every time
    launch = get_backend("numpy").bind_dequantize_4bit(q, out)
    for fill in (float("nan"), 0.0, 7.0):
        out.fill_(fill)  # another layer wrote the shared buffer in between
        launch()
        assert torch.equal(out.view(torch.int16 if out.element_size() == 2 else torch.int32),
                           want.view(torch.int16 if want.element_size() == 2 else torch.int32))  # fmt: skip
    assert cache.used_bytes == q.n * out.element_size()


def test_the_budget_bounds_what_is_kept_and_a_gone_launch_gives_it_back(cache):
    be = get_backend("numpy")
    q1, q2 = _q(seed=1), _q(seed=2)
    cache.budget_bytes = q1.n * 4  # room for one float32 W_hat
    out1, out2 = torch.empty(q1.shape), torch.empty(q2.shape)
    l1, l2 = be.bind_dequantize_4bit(q1, out1), be.bind_dequantize_4bit(q2, out2)
    l1()
    l2()  # no room: decoded each time, still right
    assert cache.used_bytes == q1.n * 4
    out2.zero_()
    l2()
    assert np.array_equal(out2.numpy(), qlora_ref.dequantize_4bit(q2, "float32").reshape(q2.shape))
    del l1
    gc.collect()
    assert cache.used_bytes == 0
    l3 = be.bind_dequantize_4bit(q2, out2)
    l3()
    assert cache.used_bytes == q2.n * 4


def test_a_zero_budget_keeps_nothing(cache):
    cache.budget_bytes = 0
    q = _q()
    out = torch.empty(q.shape)
    launch = get_backend("numpy").bind_dequantize_4bit(q, out)
    launch()
    launch()
    assert cache.used_bytes == 0
    assert np.array_equal(out.numpy(), qlora_ref.dequantize_4bit(q, "float32").reshape(q.shape))


def test_default_budget_is_a_quarter_of_memory_at_most_4_gib():
    b = nb.DequantCache().budget_bytes
    assert 0 <= b <= 4 << 30


# --- KeepMemo ------------------------------------------------------------------------------------------------------


@pytest.fixture
def memo(monkeypatch):
    m = nb.KeepMemo(budget_bytes=1 << 20)
    monkeypatch.setattr(nb, "KEEP_MEMO", m)
    return m


def _fresh(shape, p, seed):
    return torch.from_numpy(np.random.default_rng(seed).random(shape, dtype=np.float32) >= np.float32(p))


def test_a_redraw_is_served_once_with_the_draws_bits(memo):
    be = get_backend("numpy")
    first = be.dropout_keep((40, 30), 0.1, 12345)
    assert torch.equal(first, _fresh((40, 30), 0.1, 12345)) and memo.used_bytes == 1200
    again = be.dropout_keep((40, 30), 0.1, 12345)  # the backward's redraw: the kept mask, then given up
    assert again is first and memo.used_bytes == 0
    third = be.dropout_keep((40, 30), 0.1, 12345)  # a third call (checkpoint recompute) draws afresh: same bits
    assert third is not first and torch.equal(third, first)
    other = be.dropout_keep((40, 30), 0.2, 12345)  # p, shape and seed are all the key
    assert torch.equal(other, _fresh((40, 30), 0.2, 12345))


def test_the_oldest_masks_go_first_beyond_the_budget(memo):
    be = get_backend("numpy")
    memo.budget_bytes = 2500
    for seed in range(3):
        be.dropout_keep((10, 100), 0.5, seed)  # 1000 bytes each: the first no longer fits
    assert memo.used_bytes == 2000
    assert memo.pop(((10, 100), 0.5, 0)) is None
    assert torch.equal(memo.pop(((10, 100), 0.5, 2)), _fresh((10, 100), 0.5, 2))
    memo.budget_bytes = 0
    be.dropout_keep((3, 3), 0.5, 9)
    assert memo.pop(((3, 3), 0.5, 9)) is None
