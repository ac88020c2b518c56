"""Backends for qlora_ref's operations: "numpy" (the spec itself, CPU) and "cupy" (CUDA kernels, same bits).

from backends import get_backend
be = get_backend("cupy")
q = be.quantize_4bit(weight_bf16_cuda)           # NF4, blocksize 64, double quantization
w = be.dequantize_4bit(q, out=scratch_bf16)      # one launch, written into a torch buffer
launch = be.bind_dequantize_4bit(q, scratch_bf16)  # the same, resolved once: launch() only launches
device, compute_dtype = placement("cupy")         # ("cuda", "bfloat16"); numpy: ("cpu", "float32")
"""

from .protocol import Backend
from .registry import BACKENDS, BackendUnavailableError, available_backends, get_backend, placement

__all__ = ["BACKENDS", "Backend", "BackendUnavailableError", "available_backends", "get_backend", "placement"]
