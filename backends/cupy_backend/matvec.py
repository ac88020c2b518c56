"""The 4-bit matvec of decoding on the GPU: qlora_ref.matvec.matvec_4bit bit for bit (kernels/matvec_4bit.cu).

    y = matvec_4bit(x, q)                     x [T, in] or [in], T = 1..16, float32 or bf16; q a 2-D [out, in] state
    matvec_4bit(x, q, out=buf)                written into the caller's buffer (torch CUDA tensor or CuPy array)
    launch = bind_matvec_4bit(q, T); launch(x, buf)
                                              the same write for torch tensors x [T, in], buf [T, out], resolved
                                              once: a call reads two addresses and launches (the decode layer's path)

y[t, o] = round_T(((+0 + s_0) + s_1) + ...), s_c the float32 sum in j order of f32(x[t, j] * w[o, j]) over the
row's elements in its c-th quant block, w the float32 decode of BW-7 / DQ-3 (specs/matvec.md MV-2 .. MV-5): the same
order as the spec, so the same bits (tests/backends/test_matvec_gpu.py), not only the MV-8 bound.

Inputs as the rest of the backend takes them (backends/cupy_backend/inputs.py): CuPy arrays or torch CUDA tensors
(zero-copy), bf16 as torch.bfloat16 or uint16 bits; q a DeviceQuantized4bit (a host Quantized4bit is copied to the
device first).  The kernel runs on torch's current stream when a torch tensor is involved, else on CuPy's.  The
non-finite check of x (MV-9) reads one status word back; pass ``flag=`` (a FiniteFlag) to queue it instead, or
``check_finite=False`` when x is known finite.
"""

from __future__ import annotations

import functools

import cupy as cp
import numpy as np

import qlora_ref
from backends.bridge import dtype_name, is_torch, on_torch_stream, torch_stream_getter
from qlora_ref.dtypes import resolve_dtype
from qlora_ref.matvec import MAX_TOKENS, OUT_DTYPES, launch_dtypes

from . import build, launch
from . import offset as device_info
from .finite import FiniteFlag
from .finite import check_finite as _check_finite
from .inputs import input_view
from .quantized import DeviceQuantized4bit, state_args

KERNEL_FILE = "matvec_4bit.cu"
KERNELS = ("v1", "v2", "v3", "v4")
MAX_IN = 2**30  # the kernel's column index is a 32-bit int with room for a block of padding

__all__ = ["bind_matvec_4bit", "matvec_4bit"]


def _x_dtype(x, dtype) -> str:
    """The spec's name of x's dtype, "float32" or "bfloat16" (MV-1); float16 and others refused (MV-9)."""
    if not (is_torch(x) or isinstance(x, cp.ndarray)):
        if isinstance(x, np.ndarray):
            raise TypeError(
                "x is a numpy array; the cupy backend takes CuPy arrays or torch CUDA tensors "
                "(cupy.asarray(x) copies it to the GPU; get_backend('numpy') runs on the CPU)"
            )
        raise TypeError(f"x must be a CuPy array or a torch CUDA tensor, got {type(x).__name__}")
    if is_torch(x) and not x.is_cuda:
        raise TypeError(f"x is a torch tensor on {x.device}; the cupy backend needs a CUDA tensor (use .cuda())")
    name = dtype_name(x)
    if isinstance(x, cp.ndarray) and name in ("uint16", "int16"):
        name = "bfloat16"  # bf16 bits (the backend's convention)
    if dtype is not None and resolve_dtype(dtype, "dtype") != name:
        raise TypeError(f"x has dtype {dtype_name(x)} but dtype={dtype!r} was asked for; cast x first")
    if name == "float16":
        raise TypeError("x must be float32 or bfloat16 (the decode kernel's inputs), got float16; cast it first")
    if name not in ("float32", "bfloat16"):
        raise TypeError(f"x must be float32 or bfloat16 (torch bf16, or uint16 bits), got {dtype_name(x)}")
    return name


def _out_arg(out, shape: tuple[int, ...], out_dtype: str):
    """(kernel argument, keep-alive) for the caller's out buffer after checking it takes y of ``shape``."""
    n = int(np.prod(shape))
    if is_torch(out):
        if not out.is_cuda:
            raise TypeError(f"out is a torch tensor on {out.device}; the cupy backend writes CUDA tensors only")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous (the kernel writes y as one flat [T, out] buffer)")
        name, size, arg = dtype_name(out), out.numel(), np.uint64(out.data_ptr())
    elif isinstance(out, cp.ndarray):
        if not out.flags.c_contiguous:
            raise ValueError("out must be C-contiguous (the kernel writes y as one flat [T, out] buffer)")
        name, size, arg = out.dtype.name, out.size, out
    else:
        raise TypeError(f"out must be a CuPy array or a torch CUDA tensor, got {type(out).__name__}")
    if name in ("uint16", "int16"):
        name = "bfloat16"
    if name != out_dtype:
        raise TypeError(
            f"out has dtype {name} but the result is {out_dtype}; pass out_dtype={name!r} or an out of {out_dtype}"
        )
    if size != n:
        raise ValueError(f"out has {size} elements but y is {list(shape)} ({n}); pass a buffer of y's shape")
    return arg


def _device_of(x) -> int:
    return x.device.index if is_torch(x) else x.device.id


def matvec_4bit(
    x,
    q,
    *,
    dtype: str | None = None,
    out_dtype: str | None = None,
    out=None,
    kernel: str = "v2",
    check_finite: bool = True,
    flag: FiniteFlag | None = None,
    config: launch.MatvecConfig | None = None,
):
    """qlora_ref.matvec.matvec_4bit(x, q) on the GPU, the same bits (kernels/matvec_4bit.cu; no LoRA term).

    x: [T, in] or [in], 1 <= T <= 16, float32 or bfloat16 (torch bf16, or uint16 bits; dtype= names it).  q: a
    2-D [out, in] Quantized4bit (DeviceQuantized4bit; a host one is copied).  out_dtype: "bfloat16" or "float32";
    None: out's dtype if out is given, else "bfloat16".  Returns y [T, out] ([out] for a 1-D x), a new CuPy array
    (bf16 as uint16 bits), or ``out`` after writing y there.  kernel: "v2" (fast) or "v1" (one thread per output,
    the second oracle; also taken when q's packed bytes are not 16-byte aligned): the spec's order and bits; "v3"
    (a warp per four rows, FMA and a lane tree: any order, within MV-8's ``any_order`` bound, not the spec's bits)
    where it can run (`launch.matvec_kernel`), else v2.  config: a v2 launch of explicit
    knobs (`launch.matvec_4bit_v2_layout`; every one gives the same bits), else `launch.matvec_4bit_v2_config`'s.
    """
    if not isinstance(q, qlora_ref.Quantized4bit) or len(q.shape) != 2:
        raise ValueError(f"q must be a 2-D (out, in) Quantized4bit, got {type(q).__name__} {getattr(q, 'shape', '')}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if out is not None and not (is_torch(out) or isinstance(out, cp.ndarray)):
        raise TypeError(f"out must be a CuPy array or a torch CUDA tensor, got {type(out).__name__}")
    if out_dtype is None:  # out's dtype (bf16 bits in a uint16 CuPy array), else the spec's default
        out_dtype = "bfloat16" if out is None or dtype_name(out) in ("uint16", "int16") else dtype_name(out)
    out_dtype = resolve_dtype(out_dtype, "out_dtype")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype!r}")
    x_dtype = _x_dtype(x, dtype)
    out_f, in_f = (int(s) for s in q.shape)
    one_token = len(x.shape) == 1
    x_shape = (1, *x.shape) if one_token else tuple(x.shape)
    if len(x_shape) != 2 or int(x_shape[1]) != in_f:
        raise ValueError(f"x must be [T, {in_f}] or [{in_f}] for q of shape {tuple(q.shape)}, got {tuple(x.shape)}")
    T = int(x_shape[0])
    if not 1 <= T <= MAX_TOKENS:
        raise ValueError(
            f"the 4-bit matvec takes 1..{MAX_TOKENS} tokens, got {T}; more go through dequantize_4bit + a "
            "matrix product"
        )
    if in_f > MAX_IN:
        raise ValueError(f"in = {in_f} is past the kernel's {MAX_IN} columns; split the matrix along in")
    y_shape = (out_f,) if one_token else (T, out_f)
    if config is not None:
        want = launch.matvec_4bit_v2_layout(out_f, in_f, q.blocksize, T, config.lanes, config.window, config.block[0])
        if config != want:
            raise ValueError(f"config {config} does not fit this product; build it with launch.matvec_4bit_v2_layout")
    device = _device_of(x)
    if out is not None and _device_of(out) != device:
        raise ValueError(f"out is on GPU {_device_of(out)} but x on GPU {device}; pass an out on x's GPU")
    if isinstance(q, DeviceQuantized4bit) and q.packed.device.id != device:
        raise ValueError(f"q is on GPU {q.packed.device.id} but x on GPU {device}; move q to x's GPU (to_device)")
    with on_torch_stream(x, out), cp.cuda.Device(device):
        qd = DeviceQuantized4bit.from_host(q)
        if check_finite:
            _check_finite(x, "x", flag=flag)  # MV-9: the spec's NonFiniteError (or queued into flag)
        xv = input_view(x, "x", x_dtype)
        result = None
        if out is None:
            result = cp.empty(y_shape, cp.uint16 if out_dtype == "bfloat16" else cp.float32)
            y_arg = result
        else:
            y_arg = _out_arg(out, y_shape, out_dtype)
        _launch(qd, xv, x_dtype, y_arg, out_dtype, T, kernel, config)
    return out if out is not None else result


def _launch(qd: DeviceQuantized4bit, xv, x_dtype: str, y_arg, out_dtype: str, T: int, kernel: str, config) -> None:
    k, grid, block, head, tail, shared = _resolve(qd, x_dtype, out_dtype, T, kernel, xv.aligned, config)
    flags = (xv.arg, np.int32(x_dtype == "bfloat16"), y_arg, np.int32(out_dtype == "bfloat16"))
    k(grid, block, head + flags + tail, shared_mem=shared)


def _resolve(qd: DeviceQuantized4bit, x_dtype: str, out_dtype: str, T: int, kernel: str, x_aligned: bool, config):
    """(RawKernel, grid, block, args before x, args after y, shared bytes) of one matvec launch: everything but the
    x and y addresses (and their dtype flags), which go between ``head`` and ``tail``."""
    out_f, in_f = qd.shape
    state = state_args(qd)
    log2_bs = np.int32(qd.blocksize.bit_length() - 1)
    dqs = "true" if qd.double_quant else "false"
    kernel = launch.matvec_kernel(kernel, out_f, in_f, qd.blocksize, qd.packed.data.ptr % 16 == 0, x_aligned, T)
    head = (qd.packed, np.int32(out_f), np.int32(in_f), np.int32(T), log2_bs) + state
    if kernel == "v4":
        cpt, threads = launch.matvec_4bit_v4_threads(in_f)
        k = build.kernel(KERNEL_FILE, f"matvec_4bit_v4<{dqs}, {cpt}, {build.MATVEC_V4_DEPTH[cpt]}>")
        sm_count = device_info.current_device()["sm_count"]
        per_sm = _v4_ctas_per_sm(k.kernel.ptr, out_f, threads, sm_count)
        c = launch.matvec_4bit_v4_config(out_f, in_f, sm_count, per_sm)
        return k, c.grid, c.block, head, (), c.shared_bytes
    if kernel == "v3":
        tp = next(t for t in build.MATVEC_TOKENS if t >= T)
        grid, block = launch.matvec_4bit_v3_config(out_f)
        ku = launch.matvec_4bit_v3_chunks(out_f, T, device_info.current_device()["sm_count"])
        return build.kernel(KERNEL_FILE, f"matvec_4bit_v3<{dqs}, {tp}, {ku}>"), grid, block, head, (), 0
    if kernel == "v2":
        c = config or launch.matvec_4bit_v2_config(
            out_f, in_f, qd.blocksize, T, device_info.current_device()["sm_count"]
        )
        k = build.kernel(KERNEL_FILE, f"matvec_4bit_v2<{dqs}, {c.tokens}>")
        head = (qd.packed, np.int64(qd.packed.size)) + head[1:]
        layout = (np.int32(c.period), np.int32(c.classes), np.int32(c.lanes), np.int32(c.window))
        return k, c.grid, c.block, head, layout, c.shared_bytes
    grid, block = launch.matvec_4bit_v1_config(T, out_f)
    return build.kernel(KERNEL_FILE, f"matvec_4bit_v1<{dqs}>"), grid, block, head, (), 0


@functools.lru_cache(maxsize=256)
def _v4_ctas_per_sm(fn_ptr: int, out_f: int, threads: int, sm_count: int) -> int:
    """CTAs of one compiled matvec_4bit_v4 a multiprocessor holds at once (the driver's occupancy), at the shared
    bytes of a one-wave grid: those depend on the grid and the grid on the occupancy, so two rounds settle it (the
    second grid's rows need no more shared memory than the first's, so the occupancy found still holds)."""
    per_sm = 1
    for _ in range(2):
        shared = launch.matvec_4bit_v4_shared(out_f, min(out_f, sm_count * per_sm), threads)
        per_sm = max(1, int(cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(fn_ptr, threads, shared)))
    return per_sm


def bind_matvec_4bit(q, tokens: int, *, x_dtype: str = "bfloat16", out_dtype: str = "bfloat16", kernel: str = "v4"):
    """``matvec_4bit(x, q, out=y, check_finite=False, kernel=kernel)`` for torch CUDA tensors x [tokens, in] of
    ``x_dtype`` and y [tokens, out] of ``out_dtype``, resolved now (q on the device, the kernel compiled and loaded,
    its launch configuration and every argument but the two addresses); ``launch(x, y)`` then reads x's and y's
    addresses and launches on torch's current stream: no allocation, no synchronisation, capturable.

    The caller vouches for x and y (contiguous, on q's GPU, those shapes and dtypes, x finite): the decode layer's
    own tensors.  Only the addresses are looked at per call: an x that is not 16-byte aligned (a view at an odd
    offset) takes the unbound path, which picks the kernel that can read it.  Call with q's device current."""
    if not isinstance(q, qlora_ref.Quantized4bit) or len(q.shape) != 2:
        raise ValueError(f"q must be a 2-D (out, in) Quantized4bit, got {type(q).__name__} {getattr(q, 'shape', '')}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    x_dtype, out_dtype = launch_dtypes(tokens, x_dtype, out_dtype, "any")
    tokens = int(tokens)
    qd = DeviceQuantized4bit.from_host(q)
    device = qd.packed.device.id
    with cp.cuda.Device(device):
        k, grid, block, head, tail, shared = _resolve(qd, x_dtype, out_dtype, tokens, kernel, True, None)
        fn = k.kernel  # the cupy.cuda.Function for this device (compiled and loaded now)
    head = tuple(np.uint64(a.data.ptr) if isinstance(a, cp.ndarray) else a for a in head)
    x_flag, y_flag = np.int32(x_dtype == "bfloat16"), np.int32(out_dtype == "bfloat16")
    stream = torch_stream_getter(device)
    uint64 = np.uint64

    def launch_matvec(x, y) -> None:
        x_ptr = x.data_ptr()
        if x_ptr & 15:  # the bound kernel may need aligned x (v3, v4): the checked path chooses
            matvec_4bit(x, qd, out=y, check_finite=False, kernel=kernel)
            return
        fn(grid, block, (*head, uint64(x_ptr), x_flag, uint64(y.data_ptr()), y_flag, *tail), shared, stream())

    launch_matvec.keep = (qd, k)  # the arrays head's addresses point into stay alive as long as the launch
    return launch_matvec
