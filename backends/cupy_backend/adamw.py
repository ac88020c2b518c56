"""The CuPy backend's AdamW: every tensor's step in one launch of kernels/adamw.cu, states in one arena (paged.py).

The math and rule IDs are in the kernel file's header (specs/adamw.md ADAMW-2, -3, -6..-8).  The host's part:

    scalars   the spec's float32 expressions per (t, hyperparameters), `backends.adamw_state.step_scalars`
    table     one TensorArgs row per tensor (ARGS_DTYPE): param, grad and state pointers, n, dtype, the scalars
    blocks    (row, chunk) per CUDA block, int32[nblocks, 2], cached by the set of tensors stepped
    launch    adamw32_v2 / adamw8_v2 once over the block table (v1: one plain launch per tensor, the second oracle)

No device-wide synchronisation per parameter (bitsandbytes syncs after every parameter, SPEC-NOTES 1.9); the
non-finite check (ADAMW-12) is one fused reduction and one host sync per step, or, deferred, the same reduction
into an int32 flag that the kernel reads (nonzero: it writes nothing), with no sync at all.  Parameters and
gradients are read in place through their device pointers (what a DLPack view carries; a capsule per tensor per
step would cost ~10 us of host time each).  Any chunk gives the same bits (tested).
"""

from __future__ import annotations

import functools

import cupy
import numpy as np

from qlora_ref.codebooks import dynamic_map
from qlora_ref.dtypes import bf16_to_f32

from ..adamw_state import (
    BLOCKSIZE_8BIT,
    KERNEL_SCALARS,
    STATE_NAMES,
    StepScalars,
    aligned,
    check_state_options,
    nonfinite_error,
    state_layout,
)
from ..bridge import device_ptr, is_torch, to_host
from . import build
from .paged import StateArena, stream_for

THREADS = 256  # adamw8_v2 requires exactly 256 (one thread per element of a 256-block)

# Mirrors `struct TensorArgs` in kernels/adamw.cu (96 bytes, static_assert there).
ARGS_DTYPE = np.dtype(
    [
        ("p", "<u8"), ("g", "<u8"), ("m", "<u8"), ("v", "<u8"), ("m_absmax", "<u8"), ("v_absmax", "<u8"),
        ("n", "<i8"), ("dtype", "<i4"), ("decay_before", "<i4"),
        ("b1", "<f4"), ("one_minus_b1", "<f4"), ("b2", "<f4"), ("one_minus_b2", "<f4"),
        ("step_size", "<f4"), ("eps_c2", "<f4"), ("decay", "<f4"), ("pad", "<f4"),
    ]
)  # fmt: skip
assert ARGS_DTYPE.itemsize == 96


# ---- launch configurations: (grid, block) per kernel -----------------------------------------------------------


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def adamw32_v1_config(n: int) -> tuple[tuple[int], tuple[int]]:
    """One thread per element of one tensor."""
    return (ceil_div(n, THREADS),), (THREADS,)


def adamw32_v2_config(nblocks: int) -> tuple[tuple[int], tuple[int]]:
    """One CUDA block per (tensor, chunk) row of the block table."""
    return (nblocks,), (THREADS,)


def adamw8_v1_config(n: int) -> tuple[tuple[int], tuple[int]]:
    """One thread per 256-block of one tensor."""
    return (ceil_div(ceil_div(n, BLOCKSIZE_8BIT), 128),), (128,)


def adamw8_v2_config(nblocks: int) -> tuple[tuple[int], tuple[int]]:
    """One CUDA block of 256 threads (one per element of a 256-block) per (tensor, chunk) row."""
    return (nblocks,), (THREADS,)


# ---- the states ----------------------------------------------------------------------------------------------------


class DeviceAdamWStates:
    """Every tensor's states in one StateArena (`backends.adamw_state.AdamWStates`); the static half of the table.

    Arena layout: per tensor its arrays in `state_layout` order (m, v; or m_codes, m_absmax, v_codes, v_absmax),
    each 256-byte aligned.
    ``kernel``: "v2" (one fused launch, default) or "v1" (one plain launch per tensor, the second oracle).
    """

    def __init__(self, sizes, state_bits, device_id, *, paged, placement, margin_bytes, free_memory_fn, chunk):
        self.sizes = list(sizes)
        self.state_bits = state_bits
        self.device_id = device_id
        self.chunk = chunk
        self.kernel = "v2"
        self.offsets: list[dict[str, int]] = []
        off = 0
        for n in self.sizes:
            entry = {}
            for name, (dtype, count) in state_layout(n, state_bits).items():
                entry[name] = off
                off += aligned(np.dtype(dtype).itemsize * count)
            self.offsets.append(entry)
        self.nbytes = max(off, 256)
        self.arena = StateArena(self.nbytes, device_id, paged=paged, placement=placement, margin_bytes=margin_bytes,
                                free_memory_fn=free_memory_fn)  # fmt: skip
        m_key, v_key = ("m", "v") if state_bits == 32 else ("m_codes", "v_codes")
        self.static = np.zeros(len(self.sizes), ARGS_DTYPE)  # (tensors,) rows without p, g, dtype and scalars
        for i, (n, o) in enumerate(zip(self.sizes, self.offsets, strict=True)):
            self.static[i]["m"] = self.arena.base + o[m_key]
            self.static[i]["v"] = self.arena.base + o[v_key]
            if state_bits == 8:
                self.static[i]["m_absmax"] = self.arena.base + o["m_absmax"]
                self.static[i]["v_absmax"] = self.arena.base + o["v_absmax"]
            self.static[i]["n"] = n
        with cupy.cuda.Device(device_id):
            if state_bits == 8:
                self.code_m = cupy.asarray(dynamic_map(signed=True))  # (256,)
                self.code_v = cupy.asarray(dynamic_map(signed=False))  # (256,)
        self._blocks_cache: dict[tuple, list] = {}  # key -> [int32 table on the device, its upload event or None]
        self._keep = None  # the last uploaded table, alive until the next step's launch is queued

    # -- paging: the arena's -----------------------------------------------------------------------------------------

    @property
    def pageable(self) -> bool:
        return self.arena.pageable

    @property
    def resident(self) -> bool:
        return self.arena.resident

    def page_in(self) -> None:
        self.arena.page_in()

    def page_out(self, sync: bool = True) -> None:
        self.arena.page_out(sync)

    def location(self) -> str:
        return self.arena.location()

    def free_bytes(self) -> int:
        return self.arena.free_bytes()

    # -- state I/O ------------------------------------------------------------------------------------------------

    def _view(self, i: int, name: str) -> cupy.ndarray:
        dtype, count = state_layout(self.sizes[i], self.state_bits)[name]
        return cupy.ndarray((count,), dtype, memptr=self.arena.mem + self.offsets[i][name])

    def export(self) -> list[dict[str, np.ndarray]]:
        """Copies of every state (device-to-host memcpy: reading managed memory this way does not migrate it)."""
        names = STATE_NAMES[self.state_bits]
        with cupy.cuda.Device(self.device_id):
            stream = stream_for(self.device_id)
            out = [{k: self._view(i, k).get(stream=stream) for k in names} for i in range(len(self.sizes))]
            stream.synchronize()
        return out

    def load(self, arrays: list[dict[str, np.ndarray]]) -> None:
        with cupy.cuda.Device(self.device_id):
            stream = stream_for(self.device_id)
            for i, a in enumerate(arrays):
                for k in STATE_NAMES[self.state_bits]:
                    self._view(i, k).set(np.ascontiguousarray(a[k]), stream=stream)
            stream.synchronize()

    def blocks(self, active: tuple[int, ...]) -> cupy.ndarray:
        """(row in the launch table, chunk index) per CUDA block, int32[nblocks, 2]; cached by the tensors stepped.

        A one-tensor step (PagedAdamW.hook_into_backward: one call per tensor) is cached by its chunk count, which is
        all its rows depend on, so stepping many tensors one by one re-uses a few tables instead of uploading one per
        call; the upload is asynchronous (a blocking copy would synchronise the stream inside backward)."""
        key = ("one", ceil_div(self.sizes[active[0]], self.chunk)) if len(active) == 1 else active
        cached = self._blocks_cache.get(key)
        stream = stream_for(self.device_id)
        if cached is None:
            rows = []
            for k, i in enumerate(active):
                nchunks = ceil_div(self.sizes[i], self.chunk)  # 8-bit: chunk / 256 quantization blocks each
                rows.append(np.stack([np.full(nchunks, k, np.int32), np.arange(nchunks, dtype=np.int32)], axis=1))
            table = np.ascontiguousarray(np.concatenate(rows))  # (nblocks, 2)
            with stream:
                cached = [cupy.asarray(table, blocking=False), cupy.cuda.Event(disable_timing=True)]
                cached[1].record(stream)
            if len(self._blocks_cache) > 16:
                self._blocks_cache = {k: v for k, v in self._blocks_cache.items() if k[0] == "one"}
            self._blocks_cache[key] = cached
        elif cached[1] is not None:  # uploaded on a stream that may not be this one: wait for it on the GPU
            if cached[1].done:
                cached[1] = None
            else:
                stream.wait_event(cached[1])
        return cached[0]


def adamw_states(sizes, *, state_bits=32, device=None, paged=True, placement="device", margin_bytes=None,
                 free_memory_fn=None, chunk=4096) -> DeviceAdamWStates:  # fmt: skip
    """Zeroed states of tensors of `sizes` elements in one arena on GPU `device` (default: CuPy's current)."""
    sizes = check_state_options(sizes, state_bits, paged, placement, chunk)
    device_id = cupy.cuda.runtime.getDevice() if device is None else int(device)
    return DeviceAdamWStates(sizes, state_bits, device_id, paged=paged, placement=placement,
                             margin_bytes=margin_bytes, free_memory_fn=free_memory_fn, chunk=chunk)  # fmt: skip


# ---- the step ------------------------------------------------------------------------------------------------------


def _finite_flags(grads) -> list:
    """0-dim device booleans, every gradient finite, queued without a read-back: fused foreach L1 norms for torch
    tensors (NaN/Inf makes a norm non-finite), a reduction per CuPy array (bf16 as uint16: an all-ones exponent)."""
    torch_grads = [g for g in grads if is_torch(g)]
    flags = []
    if torch_grads:
        import torch

        by_dtype: dict[object, list] = {}
        for g in torch_grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        # one stack per dtype, then one cast: a cast per norm would be a launch per tensor (~450 per 7B x 4 step)
        norms = torch.cat([torch.stack(torch._foreach_norm(gs, 1)).float() for gs in by_dtype.values()])
        flags.append(torch.isfinite(norms).all())
    others = [g for g in grads if not is_torch(g)]
    if others:
        each = [((g & 0x7F80) != 0x7F80).all() if g.dtype == np.uint16 else cupy.isfinite(g).all() for g in others]
        flags.append(cupy.stack(each).all())
    return flags


def all_finite(grads) -> bool:
    """Whether every gradient is finite (`_finite_flags`); one host sync."""
    return all(bool(f) for f in _finite_flags(grads))


def flag_nonfinite(grads, skip) -> None:
    """skip (one int32 on the device) <- 1 if a gradient holds NaN/Inf else 0, queued on the stream, nothing read
    back: the deferred ADAMW-12 check that the kernel's `skip` argument reads.  Gradients and skip of one kind."""
    if len({is_torch(g) for g in grads} | {is_torch(skip)}) != 1:
        raise TypeError("the deferred check takes gradients and skip of one kind: torch tensors or CuPy arrays")
    (ok,) = _finite_flags(grads)
    if is_torch(skip):
        import torch

        skip.copy_(torch.logical_not(ok).to(torch.int32).reshape(skip.shape))
    else:
        skip[...] = cupy.logical_not(ok).astype(cupy.int32)


def _raise_nonfinite(grads, index) -> None:
    """The slow path: name the first gradient with a NaN/Inf (ADAMW-12's message)."""
    for i, g in zip(index, grads, strict=True):
        bits = to_host(g).reshape(-1)
        g32 = bf16_to_f32(bits) if bits.dtype == np.uint16 else bits.astype(np.float32)  # bf16 travels as uint16
        err = nonfinite_error(i, g32)
        if err is not None:
            raise err


_NUMPY_CODES = {np.dtype(np.float32): 0, np.dtype(np.uint16): 1, np.dtype(np.float16): 2}  # TensorArgs.dtype


@functools.cache
def _torch_codes() -> dict:
    import torch

    return {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _torch_numel(x) -> int:
    return x.numel()


def _torch_ptr(x) -> int:
    return x.data_ptr()


def _any_ptr(x) -> int:
    return x.data_ptr() if is_torch(x) else device_ptr(x)


def _array_numel(x) -> int:
    return int(x.size)


def adamw_step(params, grads, states: DeviceAdamWStates, index, scalars, *, decay="after", check_finite=True,
               skip=None) -> None:  # fmt: skip
    """One AdamW step in place for params[k] with grads[k] on states' tensor index[k] under scalars[k] (one launch).

    params and grads: torch CUDA tensors or CuPy arrays (bf16 as uint16), contiguous, a grad of its param's dtype.
    skip: None, or a one-element int32 device tensor / array written earlier on this stream; the kernel reads it and
    writes nothing when it is nonzero (the deferred non-finite check, ADAMW-12: no host synchronisation).
    """
    if not len(params) == len(grads) == len(index) == len(scalars):
        raise ValueError("params, grads, index and scalars must have one entry per tensor")
    if decay not in ("after", "before"):
        raise ValueError(f"decay must be 'after' (bitsandbytes) or 'before' (torch.optim.AdamW), got {decay!r}")
    sizes = states.sizes
    if is_torch(params[0]):  # the hot path (~0.3 us per tensor): torch's own accessors
        by_dtype, numel, ptr = _torch_codes(), _torch_numel, _torch_ptr
    else:
        by_dtype, numel, ptr = _NUMPY_CODES, _array_numel, device_ptr
    codes = [by_dtype.get(p.dtype) for p in params]
    for p, g, i, c in zip(params, grads, index, codes, strict=True):
        if c is None:
            raise TypeError(f"parameter {i} has dtype {p.dtype}; AdamW takes float32, bfloat16 or float16")
        if numel(p) != sizes[i] or numel(g) != sizes[i] or g.dtype != p.dtype:
            raise ValueError(f"parameter {i} and its gradient must both be {p.dtype} with the {sizes[i]} values "
                             "of its state")  # fmt: skip
    if check_finite == "deferred":  # ADAMW-12 on the device: the kernel reads skip
        if skip is None:
            raise ValueError('check_finite="deferred" needs skip, the int32 flag the kernel reads')
        flag_nonfinite(grads, skip)
    elif check_finite and not all_finite(grads):  # ADAMW-12, before anything is written
        _raise_nonfinite(grads, index)
    with cupy.cuda.Device(states.device_id):
        states.page_in()  # may refuse (DeviceMemoryError) before anything is written
        active = tuple(index)
        args = states.static[list(active)]  # (k,) copy of the static rows
        args["p"] = [ptr(p) for p in params]  # in place, read and written through the pointers
        args["g"] = [ptr(g) for g in grads]
        args["dtype"] = codes
        args["decay_before"] = 1 if decay == "before" else 0
        first = scalars[0]
        same = all(s is first for s in scalars)
        for name in KERNEL_SCALARS:
            args[name] = getattr(first, name) if same else [getattr(s, name) for s in scalars]
        stream = stream_for(states.device_id)
        with stream:
            # blocking=False: CuPy stages the bytes in pinned memory it keeps until the copy ran, and does not wait
            # for the stream (its default blocking=True synchronises it: the host would wait for the whole backward)
            table = cupy.asarray(args.view(np.uint8), blocking=False)
            _launch(states, table, active, np.uint64(0 if skip is None else _any_ptr(skip)))
        states._keep = table


def _launch(states: DeviceAdamWStates, table: cupy.ndarray, active: tuple[int, ...], skip: np.uint64) -> None:
    name = f"adamw{states.state_bits}_{states.kernel}"
    kern = build.kernel("adamw.cu", name)
    if states.kernel == "v1":
        config = adamw32_v1_config if states.state_bits == 32 else adamw8_v1_config
        for k, i in enumerate(active):
            grid, block = config(states.sizes[i])
            extra = () if states.state_bits == 32 else (states.code_m, states.code_v)
            kern(grid, block, (table, np.int32(k), *extra, skip))
        return
    blocks = states.blocks(active)
    if states.state_bits == 32:
        grid, block = adamw32_v2_config(int(blocks.shape[0]))
        kern(grid, block, (table, blocks, np.int64(states.chunk), skip))
    else:
        grid, block = adamw8_v2_config(int(blocks.shape[0]))
        qpc = np.int32(states.chunk // BLOCKSIZE_8BIT)
        kern(grid, block, (table, blocks, qpc, states.code_m, states.code_v, skip))


# ---- gradient clipping ---------------------------------------------------------------------------------------------


def clip_grad_norm_(grads, max_norm: float, *, error_if_nonfinite: bool = True):
    """ADAMW-10 in place on the device: float64 sums of squares, one float32 norm, every gradient times min(coef, 1).

    Returns the float32 norm as a 0-dim torch tensor on the gradients' device (no host sync but the finite check;
    error_if_nonfinite=False: none at all, not even a host-to-device copy; a non-finite norm makes coef 1, so nothing
    is scaled).
    The reductions are torch's fused multi-tensor ones (on torch's current stream; CuPy gradients are viewed as torch
    tensors, bf16 from uint16 bits), a handful of launches whatever the number of tensors:

        n_i   = sqrt(sum_j g_ij^2)            per tensor, squares and sums in float64 (_foreach_norm, dtype float64)
        total = f32(sqrt(sum_i n_i^2))        float64, one rounding to float32
        g_i  *= min(coef, 1)                  _foreach_mul_ by the 0-dim coef, float32, rounded once to g's dtype

    n_i^2 carries two float64 roundings more than the spec's sum (relative 2^-52), far below half a float32 ulp:
    within 1 ulp of the spec's norm, 3 ulp on the gradients (backends/torchlib/clip.py).
    """
    import torch

    from qlora_ref.adamw import CLIP_EPS
    from qlora_ref.checks import NonFiniteError

    from ..bridge import cupy_to_torch

    grads = [g if is_torch(g) else cupy_to_torch(g, "bfloat16" if g.dtype == np.uint16 else None) for g in grads]
    device = grads[0].device
    by_dtype: dict[object, list] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    norms = [n for gs in by_dtype.values() for n in torch._foreach_norm(gs, 2, dtype=torch.float64)]
    total_norm = torch.linalg.vector_norm(torch.stack(norms)).to(torch.float32)
    if error_if_nonfinite and not bool(torch.isfinite(total_norm)):
        raise NonFiniteError(
            f"the gradients' global norm is {total_norm.item()} (NaN/Inf in a gradient); nothing was scaled"
        )
    # the constants as device fills, not torch.tensor(x, device=cuda): that is a pageable host-to-device copy, which
    # waits for the stream to drain (the whole backward) before the host can issue the optimizer and the next step
    denom = total_norm + torch.full((), CLIP_EPS, dtype=torch.float32, device=device)
    coef = torch.div(torch.full((), max_norm, dtype=torch.float32, device=device), denom)
    coef = torch.clamp(coef, max=1.0)
    if not error_if_nonfinite:  # NaN/Inf somewhere: scale by 1, leave the refusal to the optimizer's check
        coef = torch.where(torch.isfinite(total_norm), coef, torch.ones_like(coef))
    for gs in by_dtype.values():
        torch._foreach_mul_(gs, coef)  # float32 product, one rounding to g's dtype
    return total_norm


__all__ = ["ARGS_DTYPE", "DeviceAdamWStates", "StepScalars", "adamw_states", "adamw_step", "clip_grad_norm_"]
