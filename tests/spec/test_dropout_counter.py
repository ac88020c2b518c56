"""LORA-8: the counter-based dropout keep mask (qlora_ref.lora.dropout_keep_counter).

An independent oracle (splitmix64 in Python integers, written from the paper's definition) fixes the bits; the rest
checks the properties the GPU step relies on: a pure function of (seed, salt, index), new masks for new seeds or
salts, P(keep) = 1 - p.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qlora_ref.lora import dropout_keep_counter, keep_threshold

MASK = 2**64 - 1


def _oracle(n: int, p: float, seed: int, salt: int) -> list[bool]:
    def mix(z: int) -> int:
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & MASK
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & MASK
        return z ^ (z >> 31)

    key = (seed + salt * 0xD1B54A32D192ED03) & MASK
    t = math.floor(p * 2**53)
    return [(mix((key + (i + 1) * 0x9E3779B97F4A7C15) & MASK) >> 11) >= t for i in range(n)]


@given(
    n=st.integers(1, 300),
    p=st.floats(0.0, 0.95),
    seed=st.integers(-(2**63), 2**63 - 1),
    salt=st.integers(0, 2**32 - 1),
)
def test_bits_equal_the_oracle(n, p, seed, salt):
    got = dropout_keep_counter((n,), p, seed, salt)
    assert got.dtype == np.bool_ and got.tolist() == _oracle(n, p, seed, salt)


def test_shape_is_row_major_over_the_flat_index():
    flat = dropout_keep_counter((24,), 0.5, 7, 3)
    assert (dropout_keep_counter((2, 3, 4), 0.5, 7, 3).ravel() == flat).all()


def test_pure_function_and_new_masks_for_new_seed_or_salt():
    a = dropout_keep_counter((64, 64), 0.3, 11, 5)
    assert (a == dropout_keep_counter((64, 64), 0.3, 11, 5)).all()
    assert (a != dropout_keep_counter((64, 64), 0.3, 12, 5)).mean() > 0.3  # 2p(1-p) = 0.42 expected
    assert (a != dropout_keep_counter((64, 64), 0.3, 11, 6)).mean() > 0.3


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_keep_rate_is_one_minus_p(p):
    n = 1 << 20
    rate = dropout_keep_counter((n,), p, 2026, 1).mean()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)  # 5 sigma


def test_threshold_and_p_zero():
    assert keep_threshold(0.0) == 0 and keep_threshold(0.5) == 2**52
    assert dropout_keep_counter((1000,), 0.0, 3, 4).all()
    with pytest.raises(ValueError, match="dropout probability"):
        dropout_keep_counter((4,), 1.0, 0, 0)
