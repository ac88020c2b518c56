"""Launch configurations: one function per kernel of kernels/*.cu, each returning (grid, block).

The kernels' headers say what each thread does; these functions only turn that into counts.  No CuPy here (plain
integers), so the configurations can be read and tested anywhere.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from . import build

THREADS = 256

Config = tuple[tuple[int], tuple[int]]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# --- quantize_4bit.cu -------------------------------------------------------------------------------------------------


def quantize_4bit_v1_config(nblocks: int) -> Config:
    """One thread per quant block."""
    return (ceil_div(nblocks, 128),), (128,)


def quantize_4bit_v2_config(n: int, blocksize: int, itemsize: int) -> Config:
    """256 threads per CTA, E values per thread: two 16-byte loads, or blocksize / 256 at 4096 (quantize_4bit.cu)."""
    values_per_thread = blocksize // 256 if blocksize > 2048 else 2 * (16 // itemsize)
    return (ceil_div(n, THREADS * values_per_thread),), (THREADS,)


# --- dequantize_4bit.cu -----------------------------------------------------------------------------------------------


def dequantize_4bit_v1_config(n: int) -> Config:
    """One thread per output value."""
    return (ceil_div(n, THREADS),), (THREADS,)


def dequantize_4bit_v2_config(n: int, units: int, itemsize: int) -> Config:
    """A thread per `units` units of 16 output bytes (16 / itemsize values each), one more unit slot for the tail."""
    return (ceil_div(n // (16 // itemsize) + 1, THREADS * units),), (THREADS,)


# --- blockwise_8bit.cu ------------------------------------------------------------------------------------------------


def quantize_blockwise_8bit_v1_config(nblocks: int) -> Config:
    """One thread per block."""
    return (ceil_div(nblocks, 128),), (128,)


def quantize_blockwise_8bit_v2_config(nblocks: int) -> Config:
    """One warp per block, 8 blocks per 256-thread CTA."""
    return (ceil_div(nblocks, 8),), (THREADS,)


def dequantize_blockwise_8bit_v1_config(n: int) -> Config:
    return (ceil_div(n, THREADS),), (THREADS,)


def dequantize_blockwise_8bit_v2_config(n: int) -> Config:
    """16 codes per thread."""
    return (ceil_div(n, THREADS * 16),), (THREADS,)


# --- packing.cu -------------------------------------------------------------------------------------------------------


def pack_4bit_v1_config(nbytes: int) -> Config:
    return (ceil_div(nbytes, THREADS),), (THREADS,)


def pack_4bit_v2_config(nbytes: int) -> Config:
    """16 packed bytes per thread."""
    return (ceil_div(nbytes, THREADS * 16),), (THREADS,)


unpack_4bit_v1_config = pack_4bit_v1_config
unpack_4bit_v2_config = pack_4bit_v2_config


# --- check_finite.cu --------------------------------------------------------------------------------------------------


def check_finite_v1_config(n: int) -> Config:
    return (ceil_div(n, THREADS),), (THREADS,)


def check_finite_v2_config(n: int, itemsize: int) -> Config:
    """FINITE_CHUNKS 16-byte vectors per thread, plus one slot for the scalar tail."""
    nvec = n // (16 // itemsize)
    return (ceil_div(nvec + 1, THREADS * build.FINITE_CHUNKS),), (THREADS,)


# --- dropout.cu, swiglu.cu, rope.cu -----------------------------------------------------------------------------------


def grid_stride_config(items: int) -> Config:
    """One thread per item, grid-stride beyond 65,536 CTAs (no kernel's bits depend on the grid)."""
    return (max(1, min(ceil_div(items, THREADS), 65536)),), (THREADS,)


# --- matvec_4bit.cu ---------------------------------------------------------------------------------------------------


class MatvecConfig(NamedTuple):
    """A matvec_4bit_v2 launch: (grid, block) and the kernel's layout arguments (kernels/matvec_4bit.cu header)."""

    grid: tuple[int]
    block: tuple[int]
    tokens: int  # TP: the template's token count, T rounded up to one of build.MATVEC_TOKENS
    lanes: int  # P: segments of one row in flight (lanes per row), a power of two <= 32
    window: int  # PW: block positions per staged x tile, 32 / 64 / 128, <= blocksize
    period: int  # rows o and o + period have the same phase (o * in) % blocksize; a CTA holds rows of one phase
    classes: int  # phase classes with rows, min(period, out): CTA b is class b % classes, group b // classes
    shared_bytes: int  # dynamic shared memory


MATVEC_SHARED_MAX = 48 * 1024  # no opt-in attribute needed
MATVEC_TILE_FLOATS = 8192  # P * PW * TP: the x tile, 32 KiB


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def matvec_kernel(
    kernel: str, out_f: int, in_f: int, blocksize: int, packed_aligned: bool, x_aligned: bool, tokens: int
) -> str:
    """The matvec kernel that runs when ``kernel`` is asked for.  v4 (any order, one token) needs one token,
    MATVEC_V4_MIN_CHUNKS .. MATVEC_V4_MAX_CHUNKS 32-column chunks per row and at most MATVEC_V4_MAX_WEIGHTS weights,
    else v3; v3 (any order) needs whole
    32-weight chunks in one quant block (in % 32 == 0, blocksize >= 32) and 16-byte aligned codes and x, else v2; v2
    needs aligned codes, else v1 (the same bits as v2)."""
    chunks_ok = in_f % 32 == 0 and blocksize >= 32 and packed_aligned and x_aligned
    v4_ok = tokens == 1 and MATVEC_V4_MIN_CHUNKS <= in_f // 32 <= MATVEC_V4_MAX_CHUNKS
    if kernel == "v4" and chunks_ok and v4_ok and out_f * in_f <= MATVEC_V4_MAX_WEIGHTS:
        return "v4"
    if kernel in ("v3", "v4") and chunks_ok:
        return "v3"
    if kernel in ("v2", "v3", "v4") and packed_aligned:
        return "v2"
    return "v1"


MATVEC_V3_ROWS = 4  # kernels/matvec_4bit.cu MV3_ROWS: rows per warp
MATVEC_V3_THREADS = 128  # 4 warps, 16 rows per CTA (the kernel's __launch_bounds__)


def matvec_4bit_v3_config(out_f: int) -> Config:
    """Four rows per warp, four warps per CTA; every lane of a warp reads its rows' chunks (the grid covers out)."""
    return (ceil_div(out_f, MATVEC_V3_ROWS * (MATVEC_V3_THREADS // 32)),), (MATVEC_V3_THREADS,)


MATVEC_V3_WAVE_WARPS = 12  # warps per multiprocessor at MATVEC_V3_CHUNKS (167-211 registers on sm_90: 12 or 8)


def matvec_4bit_v3_chunks(out_f: int, tokens: int, sm_count: int) -> int:
    """KU, the 32-weight chunks a lane keeps in flight per row: build.MATVEC_V3_CHUNKS while the grid's warps (out / 4)
    fit one wave of 12 per multiprocessor, else build.MATVEC_V3_CHUNKS_MANY_ROWS (fewer registers, so all warps are
    resident at once).  Measured on an H200, T = 1, graph replay: 11008x4096 18.5 us at KU 1 vs 20.6 at KU 4, 8192x8192
    26.2 vs 34.4; 4096x4096 11.7 vs 10.0 and 4096x11008 27.7 vs 24.2 (4096 rows: one wave either way)."""
    tp = next(t for t in build.MATVEC_TOKENS if t >= tokens)
    warps = ceil_div(out_f, MATVEC_V3_ROWS)
    table = build.MATVEC_V3_CHUNKS if warps <= MATVEC_V3_WAVE_WARPS * sm_count else build.MATVEC_V3_CHUNKS_MANY_ROWS
    return table[tp]


MATVEC_V4_MAX_THREADS = 512  # kernels/matvec_4bit.cu MV4_MAX_THREADS (its __launch_bounds__)
MATVEC_V4_CPT = (1, 2)  # chunks per thread: x for CPT * 32 columns in registers (build's v4 variants)
MATVEC_V4_MIN_CHUNKS = 64  # in >= 2048: below it a CTA's lanes would mostly idle (v3 serves it)
MATVEC_V4_MAX_CHUNKS = MATVEC_V4_CPT[-1] * MATVEC_V4_MAX_THREADS  # in <= 32768
# Past 11008 x 4096 weights v3 is the faster (H200, T = 1, graph replay, us, v4 vs v3): 4096x4096 8.4 vs 9.8,
# 11008x4096 16.2 vs 18.8, 4096x11008 17.6 vs 24.1; but 8192x8192 35.7 vs 25.6, 32000x4096 68.6 vs 42.2, 8192x22016
# 77.4 vs 63.7 (the many-row grids, where v3's fewer registers keep every warp resident).
MATVEC_V4_MAX_WEIGHTS = 11008 * 4096


class MatvecV4Config(NamedTuple):
    """A matvec_4bit_v4 launch: G CTAs of NT threads, CPT chunks per thread, shared bytes (tables + row sums)."""

    grid: tuple[int]
    block: tuple[int]
    chunks: int  # CPT
    shared_bytes: int


def matvec_4bit_v4_threads(in_f: int) -> tuple[int, int]:
    """(CPT, NT): the fewest chunks per thread whose thread count, rounded up to whole warps, fits
    MATVEC_V4_MAX_THREADS; NT = ceil(chunks / CPT) rounded up to 32."""
    chunks = in_f // 32
    for cpt in MATVEC_V4_CPT:
        threads = 32 * ceil_div(ceil_div(chunks, cpt), 32)
        if threads <= MATVEC_V4_MAX_THREADS:
            return cpt, threads
    raise ValueError(f"in = {in_f} is past matvec_4bit_v4's {32 * MATVEC_V4_MAX_CHUNKS} columns")


def matvec_4bit_v4_shared(out_f: int, ctas: int, threads: int) -> int:
    """Shared bytes: table 16 + code2 256 floats + one float per (row, thread) for the CTA's most rows."""
    return 4 * (272 + ceil_div(out_f, ctas) * threads)


def matvec_4bit_v4_config(out_f: int, in_f: int, sm_count: int, ctas_per_sm: int) -> MatvecV4Config:
    """One wave: G = sm_count * ctas_per_sm CTAs (the occupancy the caller measured for this kernel), fewer if out
    has fewer rows, more where the CTA's row sums would pass MATVEC_SHARED_MAX; CTA b takes rows
    [b * out / G, (b + 1) * out / G)."""
    cpt, threads = matvec_4bit_v4_threads(in_f)
    rows_max = (MATVEC_SHARED_MAX // 4 - 272) // threads
    ctas = max(1, min(out_f, sm_count * max(1, ctas_per_sm)), ceil_div(out_f, rows_max))
    return MatvecV4Config((ctas,), (threads,), cpt, matvec_4bit_v4_shared(out_f, ctas, threads))


def matvec_4bit_v1_config(tokens: int, out_f: int) -> Config:
    """One thread per output (t, o)."""
    return (ceil_div(tokens * out_f, THREADS),), (THREADS,)


def matvec_4bit_v2_shared_floats(threads: int, tokens: int, lanes: int, window: int) -> int:
    """Floats of shared memory: table 16 + code2 256 + yacc (rows * TP, rounded to 4) + max(tile, part)."""
    rows = threads // lanes
    tile = lanes * (window * tokens + 4)
    part = rows * (lanes + 1) * tokens
    return 272 + ceil_div(rows * tokens, 4) * 4 + max(tile, part)


def matvec_4bit_v2_layout(
    out_f: int, in_f: int, blocksize: int, tokens: int, lanes: int, window: int, threads: int
) -> MatvecConfig:
    """The launch of explicit knobs (lanes P, window PW, threads NT): every such launch gives the same bits (tested).

    ValueError for knobs the kernel cannot run: P a power of two <= 32 dividing NT, NT a multiple of 32 in 32..256,
    PW one of 32 / 64 / 128 and <= blocksize, shared memory <= 48 KiB."""
    tp = next((t for t in build.MATVEC_TOKENS if t >= tokens), None)
    shared = 4 * matvec_4bit_v2_shared_floats(threads, tp or 16, lanes, window) if lanes > 0 and threads > 0 else 0
    if (
        tp is None
        or lanes not in (1, 2, 4, 8, 16, 32)
        or threads not in (32, 64, 96, 128, 160, 192, 224, 256)
        or threads % lanes
        or window not in (32, 64, 128)
        or window > blocksize
        or shared > MATVEC_SHARED_MAX
    ):
        raise ValueError(
            f"no matvec_4bit_v2 launch for tokens={tokens}, lanes={lanes}, window={window}, threads={threads} at "
            f"blocksize {blocksize} (shared {shared} B of {MATVEC_SHARED_MAX}); see launch.matvec_4bit_v2_layout"
        )
    period = blocksize // math.gcd(in_f, blocksize)
    classes = min(period, out_f)
    grid = classes * ceil_div(ceil_div(out_f, period), threads // lanes)  # class 0 has the most rows
    return MatvecConfig((grid,), (threads,), tp, lanes, window, period, classes, shared)


def matvec_4bit_v2_config(out_f: int, in_f: int, blocksize: int, tokens: int, sm_count: int) -> MatvecConfig:
    """P lanes per row: enough threads for ~1024 per multiprocessor, at least 8 (P <= 8 distinct lanes read the x tile
    in one shared-memory wavefront), no more than the row's segments; PW the widest window whose tile fits; 256
    threads per CTA, fewer while the shared memory passes 48 KiB or the grid has under two CTAs per multiprocessor."""
    tp = next(t for t in build.MATVEC_TOKENS if t >= tokens)
    g = math.gcd(in_f, blocksize)
    c_max = ceil_div(in_f + blocksize - g, blocksize)  # segments of a row of the largest phase, blocksize - g
    lanes = max(8, _pow2_at_least(ceil_div(sm_count * 1024, out_f)))
    lanes = min(lanes, 32, _pow2_at_least(c_max), max(1, MATVEC_TILE_FLOATS // (32 * tp)))
    window = next((w for w in (128, 64) if w <= blocksize and lanes * w * tp <= MATVEC_TILE_FLOATS), 32)
    threads = THREADS
    period = blocksize // g
    while threads > 64 and (
        4 * matvec_4bit_v2_shared_floats(threads, tp, lanes, window) > MATVEC_SHARED_MAX
        or min(period, out_f) * ceil_div(ceil_div(out_f, period), threads // lanes) < 2 * sm_count
    ):
        threads //= 2
    return matvec_4bit_v2_layout(out_f, in_f, blocksize, tokens, lanes, window, threads)
