"""Codebooks (specs/codebooks.md): the derived tables equal bitsandbytes' float32 constants bit for bit."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

import qlora_ref as Q
from qlora_ref import codebooks as C

NF4_HEX = (
    "bf800000 bf3239b1 bf066b30 beca32a0 be91a24d be3d353f bdba7871 00000000 "
    "3da2faff 3e24cae3 3e7c04dd 3ead033a 3ee1a4b8 3f1007ab 3f3913b3 3f800000"
)
FP4_HEX = (
    "00000000 3baaaaab 3f2aaaab 3f800000 3eaaaaab 3f000000 3e2aaaab 3e800000 "
    "00000000 bbaaaaab bf2aaaab bf800000 beaaaaab bf000000 be2aaaab be800000"
)


def _hex(s):
    return np.array([int(h, 16) for h in s.split()], np.uint32)


def test_nf4_derived_from_normal_quantiles_matches_bnb():
    """CB-1: the scipy derivation reproduces the 16 hard-coded float32 values; 7 negative, exact 0, 8 positive."""
    t = Q.nf4_table()
    assert np.array_equal(t.view(np.uint32), _hex(NF4_HEX))
    assert (t < 0).sum() == 7 and (t == 0).sum() == 1 and (t > 0).sum() == 8
    assert np.all(np.diff(t) > 0) and t[0] == -1 and t[-1] == 1


def test_fp4_table_matches_bnb_and_decodes_code8_as_negative_zero():
    """CB-2, CB-6: bnb's quant_map (+0 at index 8); decoding code 8 gives -0.0."""
    assert np.array_equal(Q.fp4_table().view(np.uint32), _hex(FP4_HEX))
    d = C.dequant_table("fp4")
    assert d[8] == 0 and np.signbit(d[8])


def test_int4_is_symmetric():
    """CB-3: k/7 for k = -7..7; code 15 is a sorted duplicate of 1.0."""
    t = Q.int4_table()
    assert np.array_equal(t[:15], -t[:15][::-1]) and t[7] == 0 and t[15] == t[14] == 1


@pytest.mark.parametrize(
    "signed, sha",
    [
        (True, "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c"),
        (False, "305f002cc11278fb769d13b25b9fd0c7c83c8402c40a878fe086f4039fde6398"),
    ],
)
def test_dynamic_maps_match_bnb_sha256(signed, sha):
    """CB-4: both 8-bit dynamic maps, bit for bit."""
    m = Q.dynamic_map(signed)
    assert m.shape == (256,) and np.all(np.diff(m) >= 0)
    assert hashlib.sha256(m.astype("<f4").tobytes()).hexdigest() == sha
    if signed:
        assert m[127] == 0 and m[255] == 1


def test_nf4_thresholds_are_midpoints_except_measured_ties():
    """CB-5: float32 midpoints; at 0|1, 12|13, 14|15 one float32 lower (upper code wins the exact tie)."""
    mid = C.midpoint_thresholds(Q.nf4_table())
    t = Q.nf4_thresholds()
    for i in range(15):
        want = np.nextafter(mid[i], np.float32(-np.inf)) if i in C.NF4_UPPER_AT_TIE else mid[i]
        assert t[i] == want


def test_linspace32_matches_torch():
    """CB-1's helper reproduces torch.linspace(float32) bit for bit (the naive form is off by an ulp)."""
    torch = pytest.importorskip("torch")
    for a, b, n in [(0.9677083, 0.5, 9), (0.9677083, 0.5, 8), (0.1, 1.0, 65), (0.1, 1.0, 129)]:
        want = torch.linspace(a, b, n, dtype=torch.float32).numpy()
        assert np.array_equal(C._linspace32(a, b, n).view(np.uint32), want.view(np.uint32))


def test_unknown_quant_type_is_a_clear_error():
    with pytest.raises(ValueError, match="quant_type must be one of"):
        Q.codebook("nf3")


def test_nf4_table_is_the_derivation_through_scipy_stats_norm_ppf_bit_for_bit():
    """_nf4 calls scipy.special.ndtri (lighter to import); scipy.stats.norm.ppf of the same float32 probabilities,
    the paper's Phi^-1, gives the same table."""
    from scipy.stats import norm

    pos = norm.ppf(C._linspace32(C.NF4_OFFSET, 0.5, 9)[:-1])
    neg = -norm.ppf(C._linspace32(C.NF4_OFFSET, 0.5, 8)[:-1])
    values = np.sort(np.concatenate([pos, [0.0], neg]).astype(np.float32))
    assert np.array_equal((values / values.max()).view(np.uint32), Q.nf4_table().view(np.uint32))
