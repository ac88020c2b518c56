"""The operations every backend implements (`backends.get_backend(name)` returns one of these).

Each operation is the ``qlora_ref`` function of the same name, on the backend's arrays: numpy arrays (and torch CPU
tensors) for "numpy", CuPy arrays (and torch CUDA tensors, zero-copy, on torch's current stream) for "cupy".
Results are bit-identical across backends (tests/backends/test_backend_parity.py).  bfloat16 values travel as uint16
bits unless written into a caller's torch bf16 buffer with ``out=``.

The seams every caller uses:
    to_host(x) / to_device(x)          arrays, tensors and Quantized4bit between the host and the backend's device
    dequantize_4bit(q, out=buf)        W_hat written into the caller's buffer (torch tensor or array), checked per call
    launch = bind_dequantize_4bit(q, buf); launch()
                                       the same write, checked and resolved once: each call only launches (CUDA:
                                       on torch's current stream, no allocation, no synchronisation: capturable)
    launch = bind_matvec_4bit(q, T); launch(x, y)
                                       the decode matvec resolved once, for the layer's own tensors (capturable)
    flag = finite_flag(); check_finite(x, flag=flag); flag.raise_if_nonfinite()
                                       non-finite checks queued on the device, read back once per step
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import qlora_ref

from .adamw_state import AdamWStates, StepScalars


@runtime_checkable
class Backend(Protocol):
    name: str  # "numpy" | "cupy"
    device: Literal["cpu", "cuda"]

    def to_host(self, x: Any) -> Any:
        """A host copy: numpy array (bf16 as uint16 bits) for arrays and tensors, the spec's Quantized4bit (numpy
        arrays) for a quantized state.  The numpy backend returns host values as they are (viewed, not copied)."""
        ...

    def to_device(self, x: Any) -> Any:
        """The backend's form of x on its device: a CuPy array / DeviceQuantized4bit for "cupy" (torch CUDA tensors
        viewed, no copy), a numpy array / Quantized4bit for "numpy"."""
        ...

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
        """T(table[code] * absmax) in q.shape (BW-7, DQ-3), one rounding to T.  dtype None: out's dtype if out is
        given, else q.dtype.  ``out``: the caller's buffer, a torch tensor (bf16 / fp16 / fp32) on the backend's
        device or an array of the backend (bf16 as uint16), q.n elements, contiguous; the values are written there
        and ``out`` is returned.  Without out: a new array of q.shape (bf16 as uint16 bits)."""
        ...

    def bind_dequantize_4bit(self, q: qlora_ref.Quantized4bit, out: Any) -> Callable[[], None]:
        """``dequantize_4bit(q, out=out)`` as a function of no arguments, everything checked and resolved now; each
        call writes the same bits into out.  CUDA: only the kernel launch, on torch's current stream (CuPy's for a
        CuPy out), no allocation or synchronisation, so it can be captured in a CUDA graph.  Bound to q's arrays and
        to out: bind again when either is replaced."""
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

    def dropout_keep(self, shape: tuple[int, ...], p: float, seed: int) -> Any:
        """The keep mask (a torch bool tensor on this backend's device) of one dropout draw seeded with ``seed``:
        u >= p, u uniform float32 (LORA-3).  numpy: numpy's PCG64(seed); cupy: torch's Philox on the current GPU."""
        ...

    def dropout_keep_counter(self, shape: tuple[int, ...], p: float, seed: Any, salt: int) -> Any:
        """The keep mask of LORA-8 (a torch bool tensor on this backend's device), a pure function of (seed, salt,
        index): ``seed`` is a one-element int64 tensor on the device (cupy: read by the kernel, so a CUDA graph can
        replay it with a new value), ``salt`` a per-layer int.  Both backends give qlora_ref's bits."""
        ...

    def dropout_apply_counter(self, x: Any, p: float, seed: Any, salt: int, dtype: Any) -> Any:
        """drop(x) = x.to(dtype) * noise, noise = keep.to(dtype) * keep_scale(p) with LORA-8's keep mask of (seed,
        salt) over x's flat positions: a new tensor (cupy: one launch, the mask never stored; the same bits)."""
        ...

    def dropout_add_counter_(self, acc: Any, d: Any, p: float, seed: Any, salt: int) -> Any:
        """acc += d * noise in place (noise in d's dtype, as dropout_apply_counter's), acc and d contiguous and of one
        shape; returns acc (cupy: one launch, the same bits as the two torch ops)."""
        ...

    def finite_flag(self) -> Any:
        """A zeroed non-finite counter on the backend's device, with clear(), count() and raise_if_nonfinite(what)."""
        ...

    def check_finite(self, x: Any, what: str = "input", *, flag: Any = None) -> None:
        """Raise qlora_ref.NonFiniteError (how many, index of the first) if x holds NaN or Inf (BW-9).  With ``flag``
        (from `finite_flag`) nothing is raised or read back: the count of x's non-finite values is added to the
        flag on the device, read once later by ``flag.raise_if_nonfinite()``."""
        ...

    def adamw_states(
        self,
        sizes: Sequence[int],
        *,
        state_bits: int = 32,
        device: int | None = None,
        paged: bool = True,
        placement: str = "device",
        margin_bytes: int | None = None,
        free_memory_fn: Callable[[], int] | None = None,
        chunk: int = 4096,
    ) -> AdamWStates:
        """Zeroed AdamW states for tensors of ``sizes`` values (ADAMW-6 layout when state_bits=8), held where this
        backend computes: numpy arrays ("numpy"; the device-memory options do not apply) or one arena on GPU
        ``device`` ("cupy": CUDA managed memory when paged, kept in host memory for good with placement="host";
        DeviceMemoryError when it does not fit beside margin_bytes).  chunk: elements per CUDA block of the step."""
        ...

    def adamw_step(
        self,
        params: Sequence[Any],
        grads: Sequence[Any],
        states: AdamWStates,
        index: Sequence[int],
        scalars: Sequence[StepScalars],
        *,
        decay: str = "after",
        check_finite: bool | str = True,
        skip: Any = None,
    ) -> None:
        """One AdamW step in place (ADAMW-2, ADAMW-3; 8-bit ADAMW-7, ADAMW-8): params[k] (float32 / bf16 / fp16,
        contiguous) with grads[k] (same dtype) on the states of tensor index[k] under scalars[k]
        (`backends.adamw_state.step_scalars`); each param becomes qlora_ref.adamw.adamw_step(_8bit) of its float32
        values, rounded once to its dtype.  check_finite: NonFiniteError naming the first bad gradient before
        anything is written (ADAMW-12); "deferred": no raise and no host synchronisation, ``skip`` (one int32 on
        the parameters' device) is set to 1 and nothing written when a gradient holds NaN/Inf, else 0; the caller
        reads it later.  Pages the states in first when they are out (may raise DeviceMemoryError)."""
        ...

    def clip_grad_norm_(self, grads: Sequence[Any], max_norm: float, *, error_if_nonfinite: bool = True) -> Any:
        """ADAMW-10 in place: every gradient times min(1, max_norm / (||g||_2 + 1e-6)); returns the float32 norm
        before clipping (numpy float32 / a 0-dim value on the device).  NonFiniteError before anything is scaled;
        error_if_nonfinite=False: no raise (and no host synchronisation), a non-finite norm scales nothing."""
        ...

    def matvec_4bit(
        self,
        x: Any,
        q: qlora_ref.Quantized4bit,
        *,
        dtype: str | None = None,
        out_dtype: str | None = None,
        out: Any = None,
        check_finite: bool = True,
        order: str = "spec",
    ) -> Any:
        """qlora_ref.matvec.matvec_4bit: y = round_T(x · Ŵᵀ) for x [T, in] or [in], T = 1..16, float32 or bf16, in
        the spec's order (MV-1 .. MV-5, MV-9), the same bits on every backend; ``order="any"`` lets the backend sum
        in another order within MV-8's any-order bound (cupy: a faster kernel; numpy: still the spec's order).
        out_dtype "bfloat16" or "float32"; None: out's dtype if out is given, else bfloat16.  ``out``: the
        caller's buffer of y's T * out elements
        (torch tensor or array of the backend, bf16 as torch.bfloat16 or uint16), written and returned.  Without
        out: a new array [T, out] ([out] for a 1-D x), bf16 as uint16 bits.  No LoRA term here.  ``check_finite=False``:
        the caller vouches that x is finite (cupy then reads nothing back, so the call can be captured; numpy's spec
        checks anyway)."""
        ...

    def bind_matvec_4bit(
        self,
        q: qlora_ref.Quantized4bit,
        tokens: int,
        *,
        x_dtype: str = "bfloat16",
        out_dtype: str = "bfloat16",
        order: str = "spec",
    ) -> Callable[[Any, Any], None]:
        """``matvec_4bit(x, q, out=y, check_finite=False, order=order)`` as a function ``launch(x, y)`` of torch
        tensors x [tokens, in] (``x_dtype``) and y [tokens, out] (``out_dtype``) on the backend's device, resolved
        now; each call writes the same bits into y.  The caller vouches for the tensors (contiguous, those shapes and
        dtypes, x finite): nothing is checked per call.  CUDA: the kernel launch on torch's current stream, no
        allocation or synchronisation (capturable).  Bound to q's arrays: bind again when q is replaced."""
        ...
