"""Codebooks: the 16 levels of each 4-bit data type and the 256-entry 8-bit dynamic maps.

Spec: specs/codebooks.md (rules CB-1 .. CB-6).

NF4 (CB-1).  QLoRA's NormalFloat puts the 16 levels at quantiles of N(0, 1), rescaled to [-1, 1], with an exact zero
and one more positive level than negative ones (7 negative, 0, 8 positive).  The quantiles are taken at evenly spaced
probabilities between ``offset = 0.9677083`` and 0.5:

    positive side:  q_j = Phi^-1(p_j),  p = linspace32(offset, 0.5, 9)[:8]
    negative side: -q_j = -Phi^-1(p_j), p = linspace32(offset, 0.5, 8)[:7]
    table = sort(positive, 0, negative) / Phi^-1(offset)            (float32 division)

``offset`` is bitsandbytes' choice: the mean of the two quantile offsets 1 - 1/(2*15) and 1 - 1/(2*16), which keeps
Phi^-1 finite at the ends.  ``linspace32`` is torch's float32 linspace (rounding rule in `_linspace32`): the table is
derived here with scipy and checked against the 16 float32 values bitsandbytes hard-codes (test CB-1).

FP4 (CB-2) is bitsandbytes' E2M1 variant: bit 3 the sign, bits 0..2 a magnitude code (not monotone in value).
Int4 (CB-3) is the symmetric integer grid k/7, k = -7..7, used for the paper's datatype ablation.
The dynamic maps (CB-4) are bitsandbytes' 8-bit dynamic-exponent tables used for double quantization (signed) and
8-bit optimizer states (signed for m, unsigned for v).
"""

from __future__ import annotations

from functools import cache

import numpy as np

NF4_OFFSET = 0.9677083
QUANT_TYPES = ("nf4", "fp4", "int4")

# CB-2: FP4 magnitude code (3 bits) -> magnitude in units of 1/12 of the largest; bit 3 is the sign.
_FP4_MAGNITUDE_TWELFTHS = {
    0b000: 0.0,
    0b001: 0.0625,
    0b010: 8.0,
    0b011: 12.0,
    0b100: 4.0,
    0b101: 6.0,
    0b110: 2.0,
    0b111: 3.0,
}
# CB-2: FP4 decision thresholds on |y| (float32 literals of bitsandbytes' tree, midpoints in units of 1/12), ascending,
# with the magnitude code chosen when |y| is above each one.
# CB-5: at 0.20833333 (5/24, between magnitudes 1/6 and 1/4) bitsandbytes' CUDA kernel was measured to give the upper
# code at an exact tie (../shared/golden), so that threshold is the float32 just below the literal.
_FP4_LITERALS = np.array([0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333], np.float32)
FP4_UPPER_AT_TIE = ()
FP4_THRESHOLDS = _FP4_LITERALS.copy()
for _i in FP4_UPPER_AT_TIE:
    FP4_THRESHOLDS[_i] = np.nextafter(FP4_THRESHOLDS[_i], np.float32(-np.inf))
FP4_THRESHOLDS.setflags(write=False)
FP4_CODES_ASCENDING = np.array([0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011], np.uint8)

# CB-5: NF4 thresholds where bitsandbytes' CUDA kernel returns the UPPER code at the exact float32 midpoint
# (measured: ../shared/golden, midpoints 0|1, 12|13 and 14|15).  There the threshold is the float32 just below.
NF4_UPPER_AT_TIE = (0, 12, 14)


def _linspace32(start: float, stop: float, n: int) -> np.ndarray:
    """torch.linspace(start, stop, n, dtype=float32), bit for bit.

    step = f32((f32(stop) - f32(start)) / f32(n - 1)); entry i is f32(start + step*i) for i < n//2 and
    f32(stop - step*(n-1-i)) otherwise, each rounded once (computed exactly in float64, then rounded).
    """
    a, b = np.float32(start), np.float32(stop)
    step = np.float32((b - a) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    front = np.float64(a) + np.float64(step) * i
    back = np.float64(b) - np.float64(step) * (n - 1 - i)
    return np.where(i < n // 2, front, back).astype(np.float32)


@cache
def _nf4() -> np.ndarray:
    # The normal quantile function Phi^-1 (scipy.stats.norm.ppf is scipy.special.ndtri; ndtri imported alone, a
    # fraction of scipy.stats' import time).  Of float32 probabilities it is evaluated in float32, as norm.ppf does.
    from scipy.special import ndtri

    pos = ndtri(_linspace32(NF4_OFFSET, 0.5, 9)[:-1]).astype(np.float64)  # 8 positive quantiles
    neg = -ndtri(_linspace32(NF4_OFFSET, 0.5, 8)[:-1]).astype(np.float64)  # 7 negative quantiles
    values = np.sort(np.concatenate([pos, [0.0], neg]).astype(np.float32))
    table = values / values.max()  # float32 / float32
    table.setflags(write=False)
    return table


def nf4_table() -> np.ndarray:
    """The 16 NF4 levels, float32, ascending; nibble value = index (CB-1)."""
    return _nf4().copy()


def fp4_table() -> np.ndarray:
    """bitsandbytes' FP4 levels by nibble value (CB-2): ``sign(bit3) * magnitude[bits 0..2] / 12`` in float32.

    Entry 8 is +0.0 as in bitsandbytes' ``quant_map``; decoding code 8 gives -0.0 (see `dequant_table`).
    """
    mags = np.array([_FP4_MAGNITUDE_TWELFTHS[k] for k in range(8)], np.float32) / np.float32(12.0)
    table = np.concatenate([mags, -mags]).astype(np.float32)
    table[8] = 0.0
    return table


def dequant_table(quant_type: str) -> np.ndarray:
    """The values decoding multiplies by absmax (CB-6): `codebook`, except FP4 code 8 decodes to -0.0.

    bitsandbytes decodes FP4 as ``sign * magnitude``, so the sign bit survives on a zero magnitude.
    """
    table = codebook(quant_type)
    if quant_type == "fp4":
        table[8] = -0.0
    return table


def int4_table() -> np.ndarray:
    """Symmetric Int4 levels k/7 for k = -7..7 at codes 0..14 (CB-3).

    Code 15 repeats 1.0 so the table stays sorted; the threshold rule never produces it (nothing is > 1.0).
    """
    levels = np.arange(-7, 8, dtype=np.float32) / np.float32(7.0)
    return np.concatenate([levels, [np.float32(1.0)]]).astype(np.float32)


def codebook(quant_type: str) -> np.ndarray:
    """The 16-entry table of ``quant_type`` ("nf4", "fp4" or "int4")."""
    tables = {"nf4": nf4_table, "fp4": fp4_table, "int4": int4_table}
    if quant_type not in tables:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    return tables[quant_type]()


def midpoint_thresholds(table: np.ndarray) -> np.ndarray:
    """Float32 midpoints ``(c[i] + c[i+1]) * 0.5`` of a sorted table (CB-5)."""
    table = np.asarray(table, np.float32)
    return ((table[:-1] + table[1:]) * np.float32(0.5)).astype(np.float32)


def nf4_thresholds() -> np.ndarray:
    """The 15 NF4 decision thresholds: code = #{i : y > t[i]} (CB-5).

    t[i] is the float32 midpoint of c[i] and c[i+1], except at i in NF4_UPPER_AT_TIE where bitsandbytes' CUDA kernel
    was measured to give the upper code at the exact midpoint; there t[i] = nextafter(midpoint, -inf).
    """
    t = midpoint_thresholds(nf4_table())
    for i in NF4_UPPER_AT_TIE:
        t[i] = np.nextafter(t[i], np.float32(-np.inf))
    return t


def int4_thresholds() -> np.ndarray:
    """The 14 Int4 decision thresholds (float32 midpoints of codes 0..14; ties go to the lower code) (CB-5)."""
    return midpoint_thresholds(int4_table()[:15])


@cache
def _dynamic_map(signed: bool) -> np.ndarray:
    data: list[np.ndarray] = []
    for i in range(7):  # max_exponent_bits = 7, total_bits = 8
        n = (2**i + 1) if signed else (2 ** (i + 1) + 1)
        b = _linspace32(0.1, 1.0, n)
        means = ((b[:-1] + b[1:]) / np.float32(2.0)).astype(np.float32)
        scale = np.float32(10.0 ** (i - 6))
        data.append(scale * means)
        if signed:
            data.append(-scale * means)
    data.append(np.array([0.0, 1.0], np.float32))
    table = np.sort(np.concatenate(data).astype(np.float32))
    table.setflags(write=False)
    return table


def dynamic_map(signed: bool = True) -> np.ndarray:
    """bitsandbytes' 8-bit dynamic map (``create_dynamic_map(signed, 7, 8)``), float32[256], ascending (CB-4).

    For exponent i = 0..6 the fraction grid is the float32 midpoints of ``linspace32(0.1, 1, n)`` with n = 2^i + 1
    (signed) or 2^(i+1) + 1 (unsigned), scaled by f32(10^(i-6)) in float32; the signed map adds the negatives; 0 and 1
    complete the table.  Signed: zero at index 127, 1.0 at 255, min -0.99296875.  Unsigned: zero at index 0.
    """
    return _dynamic_map(bool(signed)).copy()
