"""The CuPy GPU backend: kernels in kernels/*.cu (compiled by build.py), Python side in ops.py.

Get it through `backends.get_backend("cupy")`, which checks for CuPy and a GPU first.  Importing this package does
not import CuPy (CI imports `build` to compile the kernels with nvcc on a machine without a GPU).
"""

from __future__ import annotations


class CupyBackend:
    """CUDA backend: the spec's operations as RawKernels, bit-identical to qlora_ref."""

    name = "cupy"
    device = "cuda"

    def __init__(self) -> None:
        from . import ops  # imports CuPy

        self.ops = ops

    def quantize_4bit(self, x, *, quant_type="nf4", blocksize=64, double_quant=True, dtype=None):
        return self.ops.quantize_4bit(
            x, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant, dtype=dtype
        )

    def dequantize_4bit(self, q, *, dtype=None, out=None):
        return self.ops.dequantize_4bit(q, dtype=dtype, out=out)

    def quantize_blockwise_8bit(self, x, code, blocksize=256):
        return self.ops.quantize_blockwise_8bit(x, code, blocksize)

    def dequantize_blockwise_8bit(self, codes, absmax, code, blocksize=256, n=None):
        return self.ops.dequantize_blockwise_8bit(codes, absmax, code, blocksize, n)

    def pack_4bit(self, codes, filler=0):
        return self.ops.pack_4bit(codes, filler)

    def unpack_4bit(self, packed, n):
        return self.ops.unpack_4bit(packed, n)

    def check_finite(self, x, what="input"):
        self.ops.check_finite(x, what)


__all__ = ["CupyBackend"]
