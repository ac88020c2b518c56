"""Compile the kernels in ``kernels/*.cu``: one ``cupy.RawModule`` per file, built once per process and cached.

Compile options are explicit and the same for every file (STYLE habit 5):

- ``-std=c++17``;
- ``--fmad=false``: no multiply-add contraction, so every product and sum is rounded on its own as in the spec;
- ``--prec-div=true``, ``--prec-sqrt=true``, ``--ftz=false``: IEEE division and square root, denormals kept
  (these are NVRTC's defaults; writing them down keeps them from changing under us).  No fast math.

Template variants are named up front (``name_expressions``) and looked up by the same string, e.g.
``quantize_4bit_v2<__nv_bfloat16, 0, 64>``.  ``NAME_EXPRESSIONS`` is also what ``.ci/compile-kernels`` instantiates
when it compiles each file with nvcc for sm_90, so a variant that does not compile fails CI.

Importing this module does not import CuPy: the registry and CI use it on machines without a GPU.
"""

from __future__ import annotations

import functools
import itertools
import sys
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
OPTIONS = ("-std=c++17", "--fmad=false", "--prec-div=true", "--prec-sqrt=true", "--ftz=false")

# dtype name (qlora_ref.dtypes.DTYPES) -> CUDA C++ type
CTYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QT = {"nf4": 0, "int4": 0, "fp4": 1}  # 0: sorted table (code = count), 1: FP4 sign-magnitude
DEQUANT_CHUNKS = (2, 4, 8)  # variants of dequantize_4bit_v2: units (16 output bytes each) in flight per thread
DEQUANT_CHUNKS_DEFAULT = 2  # best in benchmarks/bench_quant.py on an H100 (all variants give the same bits: tested)
FINITE_CHUNKS = 4  # 16-byte vectors in flight per thread in check_finite_v2
MATVEC_TOKENS = (1, 2, 4, 8, 16)  # variants of matvec_4bit_v2: T rounded up to one of these (accumulators per thread)


def _names() -> dict[str, tuple[str, ...]]:
    ctypes = tuple(CTYPES.values())
    return {
        "quantize_4bit.cu": tuple(
            [f"quantize_4bit_v1<{t}, {q}>" for t, q in itertools.product(ctypes, (0, 1))]
            + [f"quantize_4bit_v2<{t}, {q}, {b}>" for t, q, b in itertools.product(ctypes, (0, 1), BLOCKSIZES)]
        ),
        "dequantize_4bit.cu": tuple(
            [f"dequantize_4bit_v1<{t}, {dq}>" for t, dq in itertools.product(ctypes, ("false", "true"))]
            + [
                f"dequantize_4bit_v2<{t}, {dq}, {ch}>"
                for t, dq, ch in itertools.product(ctypes, ("false", "true"), DEQUANT_CHUNKS)
            ]
        ),
        "blockwise_8bit.cu": (
            "quantize_blockwise_8bit_v1<false>",
            "quantize_blockwise_8bit_v1<true>",
            "quantize_blockwise_8bit_v2<false>",
            "quantize_blockwise_8bit_v2<true>",
            "dequantize_blockwise_8bit_v1",
            "dequantize_blockwise_8bit_v2",
        ),
        "absmax_mean.cu": ("absmax_mean_partials_v1", "absmax_mean_combine_v1"),  # DQ-1 / DQ-5, torch's order
        "packing.cu": ("pack_4bit_v1", "pack_4bit_v2", "unpack_4bit_v1", "unpack_4bit_v2"),
        "check_finite.cu": tuple(
            [f"check_finite_v1<{t}>" for t in ctypes] + [f"check_finite_v2<{t}, {FINITE_CHUNKS}>" for t in ctypes]
        ),
        "adamw.cu": ("adamw32_v1", "adamw32_v2", "adamw8_v1", "adamw8_v2"),  # dtype is per tensor, at run time
        "matvec_4bit.cu": tuple(  # x and y dtypes are flags read at run time (staging and the final store only)
            [f"matvec_4bit_v1<{dq}>" for dq in ("false", "true")]
            + [f"matvec_4bit_v2<{dq}, {tp}>" for dq, tp in itertools.product(("false", "true"), MATVEC_TOKENS)]
        ),
        "dropout.cu": ("dropout_keep_counter_v1",),  # LORA-8
    }


NAME_EXPRESSIONS: dict[str, tuple[str, ...]] = _names()


def register(filename: str, names: tuple[str, ...]) -> None:
    """Declare the name expressions of another ``kernels/*.cu`` file (its owner calls this at import)."""
    if not (KERNEL_DIR / filename).is_file():
        raise ValueError(f"no kernel file {KERNEL_DIR / filename}")
    NAME_EXPRESSIONS[filename] = tuple(names)


def source(filename: str) -> str:
    """The file's text with ``#include "common.cuh"`` inlined (NVRTC gets one self-contained string)."""
    text = (KERNEL_DIR / filename).read_text()
    common = (KERNEL_DIR / "common.cuh").read_text().replace("#pragma once\n", "")
    return text.replace('#include "common.cuh"', common)


@functools.cache
def module(filename: str):
    """The compiled ``cupy.RawModule`` of ``kernels/<filename>`` (compiled on first use, then cached)."""
    import cupy

    if filename not in NAME_EXPRESSIONS:
        raise ValueError(
            f"unknown kernel file {filename!r}: register its name expressions first; known: {sorted(NAME_EXPRESSIONS)}"
        )
    mod = cupy.RawModule(code=source(filename), options=OPTIONS, name_expressions=NAME_EXPRESSIONS[filename])
    mod.compile()
    return mod


@functools.cache
def kernel(filename: str, name: str):
    """The ``cupy.RawKernel`` for one name expression of one file."""
    return module(filename).get_function(name)


def instantiation_unit(filename: str) -> str:
    """C++ text that includes ``filename`` and forces every name expression to be instantiated (for nvcc -c)."""
    refs = ",\n    ".join(f"(const void*)&{name}" for name in NAME_EXPRESSIONS[filename])
    head = f'#include "{KERNEL_DIR / filename}"\n'
    return head + f"__attribute__((used)) static const void* qlora_ref_kernels[] = {{\n    {refs}}};\n"


if __name__ == "__main__":  # python -m backends.cupy_backend.build FILE.cu  -> instantiation unit on stdout
    if len(sys.argv) == 2:
        sys.stdout.write(instantiation_unit(sys.argv[1]))
    else:
        print("\n".join(NAME_EXPRESSIONS))
