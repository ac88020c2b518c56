"""The operations every backend implements (`backends.get_backend(name)` returns one of these).

Each operation is the ``qlora_ref`` function of the same name, on the backend's arrays: numpy arrays (and torch CPU
tensors) for "numpy", CuPy arrays (and torch CUDA tensors, zero-copy, on torch's current stream) for "cupy".
Results are bit-identical across backends (tests/backends/test_backend_parity.py).  bfloat16 values travel as uint16
bits unless written into a caller's torch bf16 buffer with ``out=``.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, runtime_checkable

import qlora_ref


@runtime_checkable
class Backend(Protocol):
    name: str  # "numpy" | "cupy"
    device: Literal["cpu", "cuda"]

    def quantize_4bit(
        self,
        x: Any,
        *,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        dtype: str | None = None,
    ) -> qlora_ref.Quantized4bit:
        """Blockwise 4-bit quantization (BW-1..BW-9, PK-1..PK-2, DQ-1..DQ-2); arrays of the result live here."""
        ...

    def dequantize_4bit(self, q: qlora_ref.Quantized4bit, *, dtype: str | None = None, out: Any = None) -> Any:
        """T(table[code] * absmax) in q.shape (BW-7, DQ-3).  dtype None: out's dtype if out is given, else q.dtype.
        With ``out`` (an array or torch tensor of n elements) the values are written there and ``out`` is returned."""
        ...

    def quantize_blockwise_8bit(self, x: Any, code: Any, blocksize: int = 256) -> tuple[Any, Any]:
        """(codes uint8[n], absmax float32[nblocks]) with bitsandbytes' dynamic-map binary search (DQ-2)."""
        ...

    def dequantize_blockwise_8bit(
        self, codes: Any, absmax: Any, code: Any, blocksize: int = 256, n: int | None = None
    ) -> Any:
        """code[q] * absmax[i // blocksize], float32 (DQ-3)."""
        ...

    def pack_4bit(self, codes: Any, filler: int = 0) -> Any:
        """[a, b, c] -> [ab, c<filler>], first element in the high nibble (PK-1, PK-2)."""
        ...

    def unpack_4bit(self, packed: Any, n: int) -> Any:
        """The first n 4-bit codes of packed bytes (PK-3)."""
        ...

    def check_finite(self, x: Any, what: str = "input") -> None:
        """Raise qlora_ref.NonFiniteError (how many, index of the first) if x holds NaN or Inf (BW-9)."""
        ...
