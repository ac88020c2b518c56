"""Launch configurations: one function per kernel of kernels/*.cu, each returning (grid, block).

The kernels' headers say what each thread does; these functions only turn that into counts.  No CuPy here (plain
integers), so the configurations can be read and tested anywhere.
"""

from __future__ import annotations

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
