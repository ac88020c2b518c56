"""Compile the kernels in ``kernels/*.cu``: one module per file, compiled by NVRTC once, cached on disk (`cache_dir`).

Compile options are explicit and the same for every file (STYLE habit 5):

- ``-std=c++17``;
- ``--fmad=false``: no multiply-add contraction, so every product and sum is rounded on its own as in the spec;
- ``--prec-div=true``, ``--prec-sqrt=true``, ``--ftz=false``: IEEE division and square root, denormals kept
  (these are NVRTC's defaults; writing them down keeps them from changing under us).  No fast math.  NVRTC gets
  exactly these (`_compile`): CuPy's own compile path would append ``-ftz=true``.

Template variants are named up front (``name_expressions``) and looked up by the same string, e.g.
``quantize_4bit_v2<__nv_bfloat16, 0, 64>``.  ``NAME_EXPRESSIONS`` is also what ``.ci/compile-kernels`` instantiates
when it compiles each file with nvcc for sm_90, so a variant that does not compile fails CI.

Importing this module does not import CuPy: the registry and CI use it on machines without a GPU.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
OPTIONS = ("-std=c++17", "--fmad=false", "--prec-div=true", "--prec-sqrt=true", "--ftz=false")

# dtype name (qlora_ref.dtypes.DTYPES) -> CUDA C++ type
CTYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}


def ctype(dtype) -> str:
    """The C type (CTYPES) of a dtype-like: a numpy or torch dtype, or its name ("bfloat16", torch.bfloat16)."""
    name = str(dtype).removeprefix("torch.")
    if name not in CTYPES:
        raise ValueError(f"no kernel C type for dtype {dtype!r}; the kernels take {sorted(CTYPES)}")
    return CTYPES[name]


BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QT = {"nf4": 0, "int4": 0, "fp4": 1}  # 0: sorted table (code = count), 1: FP4 sign-magnitude
DEQUANT_CHUNKS = (2, 4, 8)  # variants of dequantize_4bit_v2: units (16 output bytes each) in flight per thread
DEQUANT_CHUNKS_DEFAULT = 2  # best in benchmarks/bench_quant.py on an H100 (all variants give the same bits: tested)
FINITE_CHUNKS = 4  # 16-byte vectors in flight per thread in check_finite_v2
MATVEC_TOKENS = (1, 2, 4, 8, 16)  # variants of matvec_4bit_v2: T rounded up to one of these (accumulators per thread)
MATVEC_V3_CHUNKS = {1: 4, 2: 4, 4: 2, 8: 1, 16: 1}  # matvec_4bit_v3: TP -> KU, 32-weight chunks in flight per row
# ... when the grid's warps pass one wave at those KU (launch.matvec_4bit_v3_chunks): fewer registers, more warps
MATVEC_V3_CHUNKS_MANY_ROWS = {1: 1, 2: 2, 4: 2, 8: 1, 16: 1}
MATVEC_V4_DEPTH = {1: 4, 2: 4}  # matvec_4bit_v4: CPT -> D, rows of codes in flight ahead of the row being summed
MATVEC_V4_DEPTHS = {1: (2, 4, 8), 2: (2, 4)}  # the D compiled per CPT (at CPT 2, D 8 spills registers on sm_90)


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
            + [
                f"matvec_4bit_v3<{dq}, {tp}, {ku}>"
                for dq, tp in itertools.product(("false", "true"), MATVEC_TOKENS)
                for ku in sorted({MATVEC_V3_CHUNKS[tp], MATVEC_V3_CHUNKS_MANY_ROWS[tp]})
            ]
            + [
                f"matvec_4bit_v4<{dq}, {cpt}, {d}>"
                for dq, cpt in itertools.product(("false", "true"), MATVEC_V4_DEPTHS)
                for d in MATVEC_V4_DEPTHS[cpt]
            ]
        ),
        "dropout.cu": ("dropout_keep_counter_v1",)  # LORA-8; the mask applied in place of a noise tensor
        + tuple(f"dropout_{op}_v1<{a}, {b}>" for op in ("apply", "add") for a, b in itertools.product(ctypes, ctypes)),
        "rmsnorm.cu": tuple(f"rmsnorm_{d}_v1<{t}>" for d in ("fwd", "bwd") for t in ctypes),  # the decoder's norm
        "swiglu.cu": tuple(f"swiglu_{d}_{v}<{t}>" for d in ("fwd", "bwd") for v in ("v1", "v2") for t in ctypes),
        "rope.cu": tuple(f"rope_v1<{t}>" for t in ctypes),  # the attention's rotary embedding, q and k together
        "cross_entropy.cu": tuple(f"cross_entropy_{d}_v1<{t}>" for d in ("fwd", "bwd") for t in ctypes),  # the LM loss
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


def cache_dir() -> Path:
    """Where compiled kernels are kept between processes: $QLORA_KERNEL_CACHE, else ~/.cache/qlora-ref/kernels."""
    return Path(os.environ.get("QLORA_KERNEL_CACHE") or Path.home() / ".cache" / "qlora-ref" / "kernels")


def cache_key(filename: str, text: str, options: tuple, arch: str, nvrtc_version, names: tuple[str, ...]) -> str:
    """sha256 over everything that changes the compiled code: file, its inlined text, options, arch, NVRTC, names."""
    h = hashlib.sha256()
    for part in (filename, text, "\0".join(options), arch, repr(tuple(nvrtc_version)), "\0".join(names)):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:32]


def _compile(filename: str) -> tuple[Path, dict[str, str]]:
    """(cubin path, name expression -> mangled name): compiled by NVRTC with exactly OPTIONS, or read from the cache.

    Not through ``cupy.RawModule(code=...)``: CuPy appends ``-ftz=true`` to every option list it compiles
    (cupy/cuda/compiler.py ``_compile_with_cache_cuda``), and NVRTC takes the last of two, so our ``--ftz=false``
    would silently be flush-to-zero: subnormal products and sums flushed, unlike the spec (MV-3, MV-8's gradual
    underflow; found by tests/backends/test_matvec_gpu.py on an H200).
    """
    import cupy
    from cupy._core.core import assemble_cupy_compiler_options  # CuPy's include paths, as RawModule adds them
    from cupy.cuda import compiler
    from cupy_backends.cuda.libs import nvrtc

    names = NAME_EXPRESSIONS[filename]
    text = source(filename)
    options = tuple(assemble_cupy_compiler_options(OPTIONS))
    if any(o.lstrip("-") == "ftz=true" for o in options):
        raise RuntimeError(f"kernel options {options} ask for flush-to-zero; the spec keeps denormals")
    arch = cupy.cuda.Device().compute_capability
    key = cache_key(filename, text, options, arch, nvrtc.getVersion(), names)
    cubin, table = cache_dir() / f"{filename}-sm{arch}-{key}.cubin", cache_dir() / f"{filename}-sm{arch}-{key}.json"
    if cubin.is_file() and table.is_file():
        return cubin, json.loads(table.read_text())
    binary, mapping = compiler.compile_using_nvrtc(text, options, arch, filename, names)
    binary = binary.encode() if isinstance(binary, str) else binary  # PTX where NVRTC cannot emit this arch's cubin
    mangled = {name: mapping[name] for name in names}
    cache_dir().mkdir(parents=True, exist_ok=True)
    for path, data in ((cubin, binary), (table, json.dumps(mangled).encode())):  # whole files only (os.replace)
        with tempfile.NamedTemporaryFile(dir=cache_dir(), delete=False) as f:
            f.write(data)
        os.replace(f.name, path)
    return cubin, mangled


@functools.cache
def module(filename: str):
    """(``cupy.RawModule``, name expression -> mangled name) of ``kernels/<filename>``, compiled on first use."""
    import cupy

    if filename not in NAME_EXPRESSIONS:
        raise ValueError(
            f"unknown kernel file {filename!r}: register its name expressions first; known: {sorted(NAME_EXPRESSIONS)}"
        )
    cubin, mangled = _compile(filename)
    return cupy.RawModule(path=str(cubin)), mangled


@functools.cache
def kernel(filename: str, name: str):
    """The ``cupy.RawKernel`` for one name expression of one file."""
    mod, mangled = module(filename)
    if name not in mangled:
        raise ValueError(f"{name!r} is not a name expression of {filename}; known: {list(mangled)}")
    return mod.get_function(mangled[name])


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
