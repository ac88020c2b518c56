"""The one torch <-> array bridge: torch tensors, CuPy arrays and numpy arrays seen as each other, zero-copy.

Every module that meets a torch tensor at a backend boundary goes through here (the backends, the torch library's
optimizer and export).  The conventions:

- bfloat16 travels as its uint16 bit pattern (the spec's convention, qlora_ref.dtypes): a torch bf16 tensor is
  viewed as int16 and handed over as uint16; uint16 arrays come back to torch as bfloat16 when asked.
- Device memory crosses through DLPack (``cupy.from_dlpack`` / ``torch.from_dlpack``): same memory, no copy.
- Kernels queued for torch tensors run on torch's current CUDA stream, seen by CuPy as an ``ExternalStream``; one
  cache keyed by the raw stream pointer holds those views (`cupy_stream`).

Importing this module imports neither torch nor CuPy: each function imports what it needs when called, so the numpy
backend and CI (no GPU, maybe no torch) can import it.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np

DTYPE_NAMES = ("float32", "float16", "bfloat16")

_STREAMS: dict[int, object] = {}  # raw cudaStream_t -> cupy.cuda.ExternalStream


# --- what a value is -------------------------------------------------------------------------------------------------


def is_torch(x) -> bool:
    """True for a torch tensor (checked by type, without importing torch)."""
    return type(x).__module__.startswith("torch") and hasattr(x, "data_ptr") and hasattr(x, "is_cuda")


def is_cupy(x) -> bool:
    """True for a CuPy ndarray (checked by type, without importing CuPy)."""
    return type(x).__module__.startswith("cupy") and hasattr(x, "data") and hasattr(x, "get")


def dtype_name(x) -> str:
    """The dtype's name without a library prefix: "bfloat16", "float32", "uint8", ... (torch, CuPy or numpy)."""
    return str(x.dtype).removeprefix("torch.")


def device_ptr(x) -> int:
    """The device (or host) address of the first element of a torch tensor, CuPy array or numpy array."""
    if is_torch(x):
        return x.data_ptr()
    if is_cupy(x):
        return x.data.ptr
    return np.asarray(x).ctypes.data


# --- streams ---------------------------------------------------------------------------------------------------------


def torch_stream_ptr(device_index: int) -> int:
    """The raw cudaStream_t of torch's current stream on a device (torch's cheap private accessor where it exists)."""
    import torch

    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return int(raw(device_index))
    return torch.cuda.current_stream(device_index).cuda_stream


def cupy_stream(ptr: int, device_id: int | None = None):
    """The cached CuPy view of the CUDA stream ``ptr`` (the same stream: no synchronisation between torch and CuPy).

    One cache for the process, keyed by the stream pointer (a pointer names one stream on one device).
    """
    stream = _STREAMS.get(ptr)
    if stream is None:
        import cupy

        with warnings.catch_warnings():  # CuPy 14 prefers Stream.from_external(obj), which needs more than a pointer
            warnings.simplefilter("ignore", DeprecationWarning)
            stream = cupy.cuda.ExternalStream(ptr) if device_id is None else cupy.cuda.ExternalStream(ptr, device_id)
        _STREAMS[ptr] = stream
    return stream


def torch_stream_getter(device_index: int):
    """A function of no arguments giving torch's current stream on ``device_index`` as a cached CuPy stream.

    Everything is resolved once (torch's raw accessor, the cache); each call costs one raw-pointer read and one dict
    lookup, so the lean launch paths can ask for the stream at every launch (CUDA-graph capture swaps torch's
    current stream, and the launch must follow it).
    """
    import torch

    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    streams = _STREAMS
    if raw is None:

        def pointer() -> int:
            return torch.cuda.current_stream(device_index).cuda_stream
    else:

        def pointer() -> int:
            return raw(device_index)

    def stream():
        ptr = pointer()
        cached = streams.get(ptr)
        return cached if cached is not None else cupy_stream(ptr, device_index)

    return stream


def current_stream(device_index: int):
    """torch's current stream on ``device_index`` as a cached CuPy stream."""
    return cupy_stream(torch_stream_ptr(device_index), device_index)


@contextlib.contextmanager
def on_torch_stream(*arrays):
    """Within the block, CuPy launches go to torch's current stream on the device of the first torch CUDA tensor
    among ``arrays`` (None entries skipped); without one, CuPy's own current stream and device stay."""
    tensor = next((a for a in arrays if a is not None and is_torch(a) and a.is_cuda), None)
    if tensor is None:
        yield
        return
    import cupy

    index = tensor.device.index
    stream = current_stream(index)
    if cupy.cuda.runtime.getDevice() != index:
        with cupy.cuda.Device(index), stream:
            yield
    else:
        with stream:
            yield


# --- torch <-> CuPy / numpy ------------------------------------------------------------------------------------------


def torch_to_cupy(t):
    """A CuPy view of a torch CUDA tensor (DLPack, no copy; made contiguous first); bfloat16 as uint16 bits."""
    import cupy
    import torch

    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return cupy.from_dlpack(t.view(torch.int16)).view(cupy.uint16)
    return cupy.from_dlpack(t)


def cupy_to_torch(a, dtype: str | None = None):
    """A torch view of a CuPy array (DLPack, no copy).  ``dtype="bfloat16"`` reads uint16/int16 bits as bf16."""
    import torch

    if dtype == "bfloat16":
        if a.dtype.name not in ("uint16", "int16"):
            raise TypeError(f"bfloat16 comes from uint16 bits, got a {a.dtype} array")
        return torch.from_dlpack(a.view("int16")).view(torch.bfloat16)
    if dtype is not None and dtype != a.dtype.name:
        raise TypeError(f"dtype={dtype!r} but the array is {a.dtype}; cast it first")
    return torch.from_dlpack(a)


def torch_to_numpy(t) -> np.ndarray:
    """A numpy view of a torch CPU tensor (no copy; made contiguous first if needed); bfloat16 as uint16 bits."""
    import torch

    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def numpy_to_torch(a: np.ndarray, dtype: str | None = None):
    """A torch CPU view of a numpy array (no copy).  ``dtype="bfloat16"`` reads uint16/int16 bits as bf16."""
    import torch

    a = np.ascontiguousarray(a)
    if dtype == "bfloat16":
        if a.dtype not in (np.uint16, np.int16):
            raise TypeError(f"bfloat16 comes from uint16 bits, got a {a.dtype} array")
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


# --- host / device ---------------------------------------------------------------------------------------------------


def to_host(x) -> np.ndarray:
    """A numpy array holding x's values: numpy as is, CuPy copied down, torch (any device) copied down or viewed on
    the CPU; bfloat16 as uint16 bits."""
    if isinstance(x, np.ndarray):
        return x
    if is_cupy(x):
        return x.get()
    if is_torch(x):
        return torch_to_numpy(x.detach().cpu())
    if np.isscalar(x):
        return np.asarray(x)
    raise TypeError(f"to_host takes a numpy array, CuPy array or torch tensor, got {type(x).__name__}")


def to_device(x, device_id: int | None = None):
    """A CuPy array on the GPU holding x's values: torch CUDA tensors viewed (no copy), numpy arrays and torch CPU
    tensors copied up to ``device_id`` (default: CuPy's current device); bfloat16 as uint16 bits."""
    import cupy

    if is_cupy(x):
        return x
    if is_torch(x):
        if x.is_cuda:
            return torch_to_cupy(x)
        x = torch_to_numpy(x)
    if isinstance(x, np.ndarray) or np.isscalar(x):
        if device_id is None:
            return cupy.asarray(x)
        with cupy.cuda.Device(device_id):
            return cupy.asarray(x)
    raise TypeError(f"to_device takes a numpy array, CuPy array or torch tensor, got {type(x).__name__}")


_GETTERS: dict[int, object] = {}


def torch_stream(device):
    """torch's current stream on ``device`` (a torch.device) as a cached CuPy stream: ``torch_stream_getter``'s
    function, made once per device index, called."""
    index = device.index
    getter = _GETTERS.get(index)
    if getter is None:
        getter = _GETTERS[index] = torch_stream_getter(index)
    return getter()
