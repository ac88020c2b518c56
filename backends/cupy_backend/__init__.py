"""The CuPy GPU backend: kernels in kernels/*.cu, bit-identical to qlora_ref.

    build.py      compile kernels/*.cu (one registry of name expressions, one module cache; CI compiles the same)
    launch.py     one launch-configuration function per kernel
    inputs.py     what the operations accept (CuPy arrays, torch CUDA tensors), the status read-back
    quantized.py  DeviceQuantized4bit and the codebooks as device constants
    ops.py        the operations, and the lean bound dequantize launch
    finite.py     the non-finite check, at once or deferred into a FiniteFlag
    adamw.py      the AdamW step over many tensors in one launch, and gradient clipping
    paged.py      the optimizer states' arena: CUDA managed memory paged between device and host
    matvec.py     the 4-bit decode matvec y = x · dequantize(q)^T for 1..16 tokens, in the spec's order (MV-4)
    dropout.py    the counter-based dropout keep mask, its seed read from device memory (capturable)

Get it through `backends.get_backend("cupy")`, which checks for CuPy and a GPU first.  Importing this package does
not import CuPy (CI imports `build` to compile the kernels with nvcc on a machine without a GPU).
"""

from __future__ import annotations


class CupyBackend:
    """CUDA backend: the spec's operations as RawKernels, bit-identical to qlora_ref."""

    name = "cupy"
    device = "cuda"

    def __init__(self) -> None:
        from . import adamw, ops  # imports CuPy

        self.ops = ops
        self.adamw = adamw

    def quantize_4bit(self, x, *, quant_type="nf4", blocksize=64, double_quant=True, dtype=None):
        return self.ops.quantize_4bit(
            x, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant, dtype=dtype
        )

    def to_host(self, x):
        return self.ops.to_host(x)

    def to_device(self, x):
        return self.ops.to_device(x)

    def dequantize_4bit(self, q, *, dtype=None, out=None):
        return self.ops.dequantize_4bit(q, dtype=dtype, out=out)

    def bind_dequantize_4bit(self, q, out):
        return self.ops.bind_dequantize_4bit(q, out)

    def quantize_blockwise_8bit(self, x, code, blocksize=256):
        return self.ops.quantize_blockwise_8bit(x, code, blocksize)

    def dequantize_blockwise_8bit(self, codes, absmax, code, blocksize=256, n=None):
        return self.ops.dequantize_blockwise_8bit(codes, absmax, code, blocksize, n)

    def pack_4bit(self, codes, filler=0):
        return self.ops.pack_4bit(codes, filler)

    def unpack_4bit(self, packed, n):
        return self.ops.unpack_4bit(packed, n)

    def dropout_keep(self, shape, p, seed):
        import torch

        g = torch.Generator(device="cuda")
        g.manual_seed(seed)
        return torch.rand(tuple(shape), generator=g, device="cuda") >= p

    def dropout_keep_counter(self, shape, p, seed, salt):
        from .dropout import dropout_keep_counter

        return dropout_keep_counter(shape, p, seed, salt)

    def dropout_apply_counter(self, x, p, seed, salt, dtype):
        from .dropout import dropout_apply_counter

        return dropout_apply_counter(x, p, seed, salt, dtype)

    def dropout_add_counter_(self, acc, d, p, seed, salt):
        from .dropout import dropout_add_counter_

        return dropout_add_counter_(acc, d, p, seed, salt)

    def finite_flag(self):
        return self.ops.FiniteFlag()

    def check_finite(self, x, what="input", *, flag=None):
        self.ops.check_finite(x, what, flag=flag)

    def adamw_states(self, sizes, **options):
        return self.adamw.adamw_states(sizes, **options)

    def adamw_step(self, params, grads, states, index, scalars, *, decay="after", check_finite=True, skip=None):
        self.adamw.adamw_step(params, grads, states, index, scalars, decay=decay, check_finite=check_finite,
                              skip=skip)  # fmt: skip

    def clip_grad_norm_(self, grads, max_norm, *, error_if_nonfinite=True):
        return self.adamw.clip_grad_norm_(grads, max_norm, error_if_nonfinite=error_if_nonfinite)

    def matvec_4bit(self, x, q, *, dtype=None, out_dtype=None, out=None, check_finite=True, order="spec"):
        from qlora_ref.matvec import ORDERS

        from . import matvec  # kernels/matvec_4bit.cu: v2 the spec's order and bits, v3 / v4 any order (MV-8)

        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        kernel = "v2" if order == "spec" else "v4"
        return matvec.matvec_4bit(x, q, dtype=dtype, out_dtype=out_dtype, out=out, check_finite=check_finite,
                                  kernel=kernel)  # fmt: skip

    def bind_matvec_4bit(self, q, tokens, *, x_dtype="bfloat16", out_dtype="bfloat16", order="spec"):
        from qlora_ref.matvec import launch_dtypes

        from . import matvec

        launch_dtypes(tokens, x_dtype, out_dtype, order)
        kernel = "v2" if order == "spec" else "v4"
        return matvec.bind_matvec_4bit(q, tokens, x_dtype=x_dtype, out_dtype=out_dtype, kernel=kernel)


__all__ = ["CupyBackend"]
