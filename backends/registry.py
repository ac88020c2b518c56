"""`get_backend("numpy" | "cupy")`: one instance per name, created on first use; `placement`: where its tensors live.

The cupy backend needs CuPy and a CUDA GPU; asking for it without them raises `BackendUnavailableError` that says
what to install.  The numpy backend always works (it is the spec, `qlora_ref`, behind the backend interface).
"""

from __future__ import annotations

import functools

from .protocol import Backend

BACKENDS = ("numpy", "cupy")  # the names the CLI offers (choices=BACKENDS)
# backend -> (device, compute dtype): CPU computes in float32 (torch's CPU bf16 GEMM is slow), CUDA in bfloat16
PLACEMENTS = {"numpy": ("cpu", "float32"), "cupy": ("cuda", "bfloat16")}
INSTALL_HINT = (
    "install the GPU extra: pip install 'qlora-ref[gpu]' (CuPy for CUDA 13, cupy-cuda13x) or "
    "pip install 'qlora-ref[gpu-cuda12]' (cupy-cuda12x), matching your NVIDIA driver's CUDA version"
)


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (missing package or no GPU)."""


@functools.cache
def get_backend(name: str = "numpy") -> Backend:
    """The backend called ``name``: "numpy" (CPU, the spec itself) or "cupy" (CUDA kernels, same bits)."""
    if name == "numpy":
        from .numpy_backend import NumpyBackend

        return NumpyBackend()
    if name == "cupy":
        try:
            import cupy
        except ImportError as exc:
            raise BackendUnavailableError(
                f"the cupy backend needs CuPy, which is not installed: {INSTALL_HINT}"
            ) from exc
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # CUDA driver missing or broken: CuPy raises its own runtime error types
            raise BackendUnavailableError(
                f"the cupy backend needs a CUDA GPU, but CUDA could not be initialised ({exc}); check the NVIDIA "
                f"driver, or use get_backend('numpy'). If CuPy does not match your CUDA version: {INSTALL_HINT}"
            ) from exc
        if count == 0:
            raise BackendUnavailableError(
                "the cupy backend needs a CUDA GPU and none is visible; use get_backend('numpy')"
            )
        from .cupy_backend import CupyBackend

        return CupyBackend()
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")


def placement(backend: str | Backend) -> tuple[str, str]:
    """(device, compute dtype) for a backend name or object: ("cpu", "float32") for numpy, ("cuda", "bfloat16") for
    cupy.  The one place that decides it; a name needs no GPU (nothing is imported)."""
    name = backend if isinstance(backend, str) else getattr(backend, "name", None)
    if name in PLACEMENTS:
        return PLACEMENTS[name]
    device = getattr(backend, "device", None)
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS} or pass a Backend object")
    return device, ("bfloat16" if device == "cuda" else "float32")


def available_backends() -> tuple[str, ...]:
    """The backends that can run on this machine (always "numpy"; "cupy" with CuPy and a GPU)."""
    names = []
    for name in BACKENDS:
        try:
            get_backend(name)
        except BackendUnavailableError:
            continue
        names.append(name)
    return tuple(names)
