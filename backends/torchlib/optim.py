"""PagedAdamW: the spec's AdamW with optimizer states in CUDA managed memory and one fused kernel launch per step.

Math (qlora_ref.adamw, CONTRACT "AdamW spec", SPEC-NOTES 1.11), float32, one op at a time, scalars cast to float32:

    m = b1*m + (1-b1)*g                    v = b2*v + (1-b2)*(g*g)
    c1 = 1 - b1**t                         c2 = sqrt(1 - b2**t)            step_size = -lr*c2/c1
    p = p + step_size * (m / (sqrt(v) + eps*c2))
    decay="after"  (default, bitsandbytes):        then p = p*(1 - lr*wd)
    decay="before" (torch.optim.AdamW placement):  p = p*(1 - lr*wd) first

state_bits=8 keeps m, v as the spec's 8-bit blockwise states (AdamW8bitState: 256-value blocks, signed dynamic map
for m, unsigned for v; SPEC-NOTES 1.10), for every parameter whatever its size.

Two code paths, one API:

- CPU tensors: states are numpy arrays and each step calls ``qlora_ref.adamw.adamw_step`` / ``adamw_step_8bit``
  per parameter; the result is bit-identical to the spec by construction.
- CUDA tensors: all states of the optimizer live in one arena (CUDA managed memory when ``paged=True``, a torch
  device buffer otherwise).  ``step()`` prefetches the arena to the GPU on the current torch stream, computes the
  per-tensor float32 scalars on the host with the spec's own expressions, and launches ONE kernel
  (``kernels/adamw.cu``: ``adamw32_multi`` / ``adamw8_multi``) over a table of (param, grad, state) pointers and a
  table of (tensor, chunk) work items.  No device-wide synchronisation per parameter (bitsandbytes syncs after
  every parameter, SPEC-NOTES 1.9).  With the scalars precomputed, the kernel only multiplies, adds, divides and
  takes square roots, all correctly rounded under ``--fmad=false`` (no fast math): bit-identical to the spec, 0 ULP.

Paging (SPEC-NOTES 1.9; GPU-NOTES "managed memory"): ``page_out()`` migrates the arena to host memory with
``cudaMemPrefetchAsync`` (a ``cudaMemLocation`` on CUDA 13), ``page_in()`` brings it back; ``step()`` pages in when
needed and, after the update, pages out by itself when free device memory falls under ``page_threshold_bytes``.
Safety: the arena is allocated, and paged in, only when ``cudaMemGetInfo`` shows its size plus a margin free;
otherwise a ``DeviceMemoryError`` says how much was needed and how much was free (never oversubscribe the card).

Host placement (``placement="host"``): the arena stays in host memory for good — managed memory advised
``cudaMemAdviseSetPreferredLocation`` = host and ``cudaMemAdviseSetAccessedBy`` = the GPU, zeroed by the CPU — and the
fused kernel reads and writes m, v across the bus through the GPU's mapping (8 bytes read + 8 written per parameter
per step for 32-bit states).  No device memory is ever taken by the states: this is what lets a 65B-shaped model's
6.4 GB of AdamW state sit beside 34 GB of 4-bit weights under a 38 GB budget (benchmarks/bench_memory.py).

Stepping inside backward (``hook_into_backward()``): each parameter is stepped, and its gradient freed, as soon as
autograd has accumulated it (``register_post_accumulate_grad_hook``), so the LoRA gradients never coexist on the
device.  The update is the same AdamW (same bits); what is given up is a global gradient-norm clip (the norm is not
known until every gradient exists) and gradient accumulation over micro-batches.

Gradients and parameters are read in place through their device pointers (``tensor.data_ptr()``, the same zero-copy
pointer a DLPack view carries; one DLPack capsule per tensor per step would cost ~10 us of host time each).
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from qlora_ref import adamw as spec
from qlora_ref.checks import NonFiniteError
from qlora_ref.codebooks import dynamic_map

BLOCKSIZE_8BIT = 256  # AD-4: 8-bit state blocks (bitsandbytes' blockwise optimizers)
STATE_DICT_FORMAT = "qlora_ref.PagedAdamW/1"
_ALIGN = 256  # bytes; every state array in the arena starts on this boundary
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_STRIDED = torch.strided
_THREADS = 256  # both fused kernels; adamw8_multi requires exactly 256 (one thread per element of a 256-block)

# Mirrors `struct TensorArgs` in kernels/adamw.cu (96 bytes, static_assert there).
_ARGS_DTYPE = np.dtype(
    [
        ("p", "<u8"), ("g", "<u8"), ("m", "<u8"), ("v", "<u8"), ("m_absmax", "<u8"), ("v_absmax", "<u8"),
        ("n", "<i8"), ("dtype", "<i4"), ("decay_before", "<i4"),
        ("b1", "<f4"), ("one_minus_b1", "<f4"), ("b2", "<f4"), ("one_minus_b2", "<f4"),
        ("step_size", "<f4"), ("eps_c2", "<f4"), ("decay", "<f4"), ("pad", "<f4"),
    ]
)  # fmt: skip
assert _ARGS_DTYPE.itemsize == 96


class DeviceMemoryError(RuntimeError):
    """Not enough free device memory to allocate or page in the optimizer states (we refuse to oversubscribe)."""


# ---- the scalars of one step (host side, float32, the spec's expressions) --------------------------------------


@dataclass(frozen=True)
class StepScalars:
    """The float32 scalars one AdamW step uses (AD-2): what the kernel receives instead of computing powf itself."""

    b1: np.float32
    one_minus_b1: np.float32
    b2: np.float32
    one_minus_b2: np.float32
    step_size: np.float32  # -lr*c2/c1
    eps_c2: np.float32  # eps*c2
    decay: np.float32  # 1 - lr*wd


def step_scalars(t: int, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> StepScalars:
    """The step's float32 scalars by the spec's own expressions (ADAMW-2, `qlora_ref.adamw.adam_scalars`)."""
    if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= 2**24:
        raise ValueError(f"step t must be an integer in [1, 2**24] (exact in float32), got {t!r}")
    f = np.float32
    lr32, b1, b2, eps32, wd32 = f(lr), f(betas[0]), f(betas[1]), f(eps), f(weight_decay)
    one = f(1.0)
    _, c2, step_size = spec.adam_scalars(f(t), lr32, b1, b2)
    return StepScalars(
        b1=b1,
        one_minus_b1=f(one - b1),
        b2=b2,
        one_minus_b2=f(one - b2),
        step_size=f(step_size),
        eps_c2=f(eps32 * c2),
        decay=f(one - lr32 * wd32),
    )


# ---- the optimizer ---------------------------------------------------------------------------------------------


class PagedAdamW(torch.optim.Optimizer):
    """AdamW (qlora_ref.adamw) over torch parameters, states paged between GPU and host, one fused launch per step.

    Args:
        params: parameters or param groups (all on one device: CPU, or one CUDA device).
        lr, betas, eps, weight_decay: as torch.optim.AdamW (defaults: QLoRA's lr 2e-4, weight decay 0).
        decay: "after" (bitsandbytes, default) or "before" (torch.optim.AdamW) — where p*(1-lr*wd) goes.
        state_bits: 32 (float32 m, v) or 8 (the spec's 256-block dynamic-map states).
        paged: CUDA only — states in managed memory that can be paged to the host (False: plain device memory).
        placement: CUDA only — "device" (states prefetched to the GPU for each step, paged out under pressure) or
            "host" (states stay in host memory; the kernel reaches them across the bus; never any device memory).
        page_threshold_bytes: after each step, page the states out when free device memory is below this (0: never).
        margin_bytes: free device memory kept untouched when allocating / paging in (default max(256 MiB, 2%)).
        free_memory_fn: returns free device bytes (default cudaMemGetInfo); the allocation check also always
            consults cudaMemGetInfo itself.
        chunk: elements per CUDA block in the fused kernel (a multiple of 1024); any value gives the same bits.
        check_finite: raise NonFiniteError before writing anything when a gradient holds NaN/Inf (ADAMW-12, as the
            spec does); on CUDA this is one fused check and one host sync per step.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        decay: str = "after",
        state_bits: int = 32,
        paged: bool = True,
        placement: str = "device",
        page_threshold_bytes: int = 256 << 20,
        margin_bytes: int | None = None,
        free_memory_fn: Callable[[], int] | None = None,
        chunk: int = 4096,
        check_finite: bool = True,
    ):
        _check_hyper(lr, betas, eps, weight_decay)
        if decay not in ("after", "before"):
            raise ValueError(f"decay must be 'after' (bitsandbytes) or 'before' (torch.optim.AdamW), got {decay!r}")
        if state_bits not in (32, 8):
            raise ValueError(f"state_bits must be 32 or 8, got {state_bits!r}")
        if not isinstance(chunk, int) or chunk <= 0 or chunk % 1024:
            raise ValueError(f"chunk must be a positive multiple of 1024 elements, got {chunk!r}")
        if placement not in ("device", "host"):
            raise ValueError(f"placement must be 'device' or 'host', got {placement!r}")
        if placement == "host" and not paged:
            raise ValueError("placement='host' keeps the states in managed memory: it needs paged=True")
        if page_threshold_bytes < 0:
            raise ValueError(f"page_threshold_bytes must be >= 0, got {page_threshold_bytes}")
        self.decay = decay
        self.state_bits = state_bits
        self.paged = bool(paged)
        self.placement = placement
        self.page_threshold_bytes = int(page_threshold_bytes)
        self.check_finite = bool(check_finite)
        self._built = False
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self._params = [p for g in self.param_groups for p in g["params"]]
        self._index = {id(p): i for i, p in enumerate(self._params)}
        if len(self._index) != len(self._params):
            raise ValueError("a parameter appears more than once in the param groups")
        device = _common_device(self._params)
        for i, p in enumerate(self._params):
            self.state[p]["step"] = 0
            _check_param(i, p)
        if device.type == "cpu":
            self._impl = _HostStates(self._params, state_bits)
        else:
            self._impl = _CudaStates(
                self._params, device, state_bits, self.paged, chunk, margin_bytes, free_memory_fn, placement
            )
        self._built = True

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_built", False):
            raise ValueError(
                "PagedAdamW allocates all optimizer states at construction (one arena); "
                "build a new optimizer with every param group instead of add_param_group()"
            )
        super().add_param_group(param_group)

    # -- paging ---------------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self._impl.device

    @property
    def state_bytes(self) -> int:
        """Bytes of optimizer state (the arena, alignment included)."""
        return self._impl.nbytes

    @property
    def resident(self) -> bool:
        """True when the states are on the GPU (always True on CPU: host memory is where they live)."""
        return self._impl.resident

    def page_out(self, sync: bool = True) -> None:
        """Migrate the states to host memory (managed memory only); with sync, the device memory is free on return."""
        self._impl.page_out(sync)

    def page_in(self) -> None:
        """Prefetch the states to the GPU on the current stream (refuses if free memory is short: DeviceMemoryError)."""
        self._impl.page_in()

    def state_location(self) -> str:
        """Where the driver last prefetched the states: "host" or "device" ("device" for unpaged, "host" on CPU).

        Note: on CUDA 13 / driver 580 cudaMemGetInfo does not report the device memory of paged-out managed states
        as free (the driver keeps the chunks until something else claims them), so this attribute, not the free
        memory, is what shows a page-out happened.
        """
        return self._impl.location()

    def maybe_page_out(self) -> bool:
        """Page out when free device memory is below page_threshold_bytes; returns whether it did."""
        if self.page_threshold_bytes and self._impl.pageable and self._impl.resident:
            if self._impl.free_bytes() < self.page_threshold_bytes:
                self._impl.page_out(True)
                return True
        return False

    def hook_into_backward(self) -> list:
        """Step each parameter the moment its gradient is accumulated, then free that gradient (module docstring).

        Call once; afterwards ``loss.backward()`` performs the optimizer step (do not call ``step()`` or clip).
        Returns the hook handles (``handle.remove()`` undoes it).  The result equals ``backward(); step()``
        parameter for parameter.
        """

        def hook(p: torch.Tensor) -> None:
            self.step()  # only p has a gradient at this moment: every earlier one was freed by its own hook
            p.grad = None

        return [p.register_post_accumulate_grad_hook(hook) for p in self._params]

    # -- the step -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One AdamW step (AD-2 / AD-4) for every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        todo = []  # (index, param, group) of every parameter with a gradient
        for group in self.param_groups:
            _check_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"])
            for p in group["params"]:
                g = p.grad
                if g is not None:
                    i = self._index[id(p)]
                    # torch itself refuses a .grad of another shape, dtype or device on assignment; what it allows
                    # and the kernel cannot take (non-contiguous, sparse, a param swapped to another dtype) goes to
                    # the full check.  This keeps the per-step host cost at ~0.5 us per tensor.
                    if g.layout is not _STRIDED or not g.is_contiguous() or p.dtype not in _DTYPE_CODE:
                        _check_grad(i, p)
                    todo.append((i, p, group))
        if not todo:
            return loss
        if self.check_finite:
            self._impl.check_finite([(i, p.grad) for i, p, _ in todo])  # ADAMW-12, before anything is written
        self._impl.page_in()  # may refuse (DeviceMemoryError) before any step count moves
        work = []  # (index, param, grad, t, scalars, group)
        cache: dict[tuple[int, int], StepScalars] = {}
        for i, p, group in todo:
            st = self.state[p]
            t = st["step"] + 1
            key = (id(group), t)
            if key not in cache:
                cache[key] = step_scalars(
                    t, lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"]
                )
            st["step"] = t
            work.append((i, p, p.grad, t, cache[key], group))
        self._impl.step(work, self.decay)
        self.maybe_page_out()
        return loss

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """{"state": {i: {"step", states as CPU tensors}}, "param_groups": [...], "config": {...}}.

        States: 32-bit "m", "v" float32[n]; 8-bit "m_codes", "v_codes" uint8[n], "m_absmax", "v_absmax"
        float32[ceil(n/256)].  Loading it into an optimizer over the same parameter shapes continues bit for bit.
        """
        arrays = self._impl.export()
        state = {}
        for i, p in enumerate(self._params):
            entry = {"step": int(self.state[p]["step"])}
            entry.update({k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in arrays[i].items()})
            state[i] = entry
        groups = []
        start = 0
        for g in self.param_groups:
            saved = {k: v for k, v in g.items() if k != "params"}
            saved["betas"] = tuple(saved["betas"])
            saved["params"] = list(range(start, start + len(g["params"])))
            start += len(g["params"])
            groups.append(saved)
        config = {"format": STATE_DICT_FORMAT, "state_bits": self.state_bits, "decay": self.decay}
        if self.state_bits == 8:
            config["blocksize"] = BLOCKSIZE_8BIT
        return {"state": state, "param_groups": groups, "config": config}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a PagedAdamW.state_dict(); everything is checked before anything is written (ValueError on mismatch)."""
        if not isinstance(state_dict, dict) or not {"state", "param_groups", "config"} <= set(state_dict):
            got = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(
                f"expected a PagedAdamW.state_dict() with keys state/param_groups/config, got {got}; "
                "a torch.optim.AdamW state dict cannot be loaded (different state layout)"
            )
        config = state_dict["config"]
        if config.get("format") != STATE_DICT_FORMAT:
            raise ValueError(f"state dict format {config.get('format')!r}, expected {STATE_DICT_FORMAT!r}")
        for key, mine in (("state_bits", self.state_bits), ("decay", self.decay)):
            if config.get(key) != mine:
                raise ValueError(
                    f"state dict was saved with {key}={config.get(key)!r} but this optimizer has {key}={mine!r}; "
                    "construct the optimizer with the saved setting to resume bit for bit"
                )
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state dict has {len(groups)} param groups, this optimizer {len(self.param_groups)}")
        for k, (saved, mine) in enumerate(zip(groups, self.param_groups, strict=True)):
            if len(saved["params"]) != len(mine["params"]):
                raise ValueError(
                    f"param group {k}: state dict has {len(saved['params'])} parameters, "
                    f"this optimizer {len(mine['params'])}"
                )
        state = state_dict["state"]
        names = ("m", "v") if self.state_bits == 32 else ("m_codes", "m_absmax", "v_codes", "v_absmax")
        arrays = []
        for i, p in enumerate(self._params):
            if i not in state:
                raise ValueError(f"state dict has no state for parameter {i} (shape {tuple(p.shape)})")
            entry = state[i]
            missing = [k for k in ("step", *names) if k not in entry]
            if missing:
                raise ValueError(f"state of parameter {i} lacks {missing} (has {sorted(entry)})")
            step = entry["step"]
            step = int(step.item()) if isinstance(step, torch.Tensor) else step
            if not isinstance(step, int) or step < 0:
                raise ValueError(f"state of parameter {i}: step must be an int >= 0, got {entry['step']!r}")
            n = p.numel()
            nb = -(-n // BLOCKSIZE_8BIT)
            expect = {"m": (np.float32, n), "v": (np.float32, n), "m_codes": (np.uint8, n),
                      "v_codes": (np.uint8, n), "m_absmax": (np.float32, nb), "v_absmax": (np.float32, nb)}  # fmt: skip
            out = {}
            for k in names:
                a = entry[k]
                a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
                dtype, size = expect[k]
                if a.dtype != dtype or a.size != size:
                    raise ValueError(
                        f"state {k!r} of parameter {i} (shape {tuple(p.shape)}, {n} elements) is "
                        f"{a.dtype}[{a.size}], expected {np.dtype(dtype).name}[{size}]: the state dict belongs to "
                        "different parameters"
                    )
                out[k] = np.ascontiguousarray(a.ravel())
            arrays.append((step, out))
        self._impl.load([a for _, a in arrays])
        for p, (step, _) in zip(self._params, arrays, strict=True):
            self.state[p]["step"] = step
        for saved, mine in zip(groups, self.param_groups, strict=True):
            for k, v in saved.items():
                if k != "params":
                    mine[k] = tuple(v) if k == "betas" else v


# ---- boundary checks -------------------------------------------------------------------------------------------


def _check_hyper(lr, betas, eps, weight_decay) -> None:
    if isinstance(lr, torch.Tensor) or not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite float >= 0, got {lr!r}")
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two floats in [0, 1), got {betas!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0 and math.isfinite(weight_decay)):
        raise ValueError(f"weight_decay must be a finite float >= 0, got {weight_decay!r}")


def _common_device(params: list[torch.Tensor]) -> torch.device:
    if not params:
        raise ValueError("PagedAdamW got no parameters")
    devices = {p.device for p in params}
    if len(devices) != 1:
        got = sorted(map(str, devices))
        raise ValueError(f"all parameters must be on one device (CPU or one CUDA device), got {got}")
    return devices.pop()


def _check_param(i: int, p: torch.Tensor) -> None:
    if p.dtype not in _DTYPE_CODE:
        raise TypeError(f"parameter {i} has dtype {p.dtype}; PagedAdamW takes float32, bfloat16 or float16")
    if not p.is_contiguous():
        raise ValueError(f"parameter {i} (shape {tuple(p.shape)}) is not contiguous; make it contiguous first")


def _check_grad(i: int, p: torch.Tensor) -> None:
    g = p.grad
    if g.is_sparse:
        raise TypeError(f"parameter {i} has a sparse gradient; PagedAdamW supports dense gradients only")
    if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
        raise ValueError(
            f"gradient of parameter {i} is {g.dtype}{tuple(g.shape)} on {g.device}, "
            f"expected {p.dtype}{tuple(p.shape)} on {p.device}"
        )
    if not g.is_contiguous():
        raise ValueError(f"gradient of parameter {i} is not contiguous")
    _check_param(i, p)


# ---- CPU: numpy states, the spec's functions -------------------------------------------------------------------


class _HostStates:
    """States as numpy arrays; each step calls the spec per parameter (bit-identical by construction)."""

    pageable = False
    resident = True

    def __init__(self, params: list[torch.Tensor], state_bits: int):
        self.device = torch.device("cpu")
        self.state_bits = state_bits
        if state_bits == 32:
            self.states = [(np.zeros(p.numel(), np.float32), np.zeros(p.numel(), np.float32)) for p in params]
        else:
            self.states = [spec.AdamW8bitState.zeros(p.numel()) for p in params]
        self.nbytes = sum(_state_nbytes(p.numel(), state_bits) for p in params)

    def free_bytes(self) -> int:
        return 0

    def location(self) -> str:
        return "host"

    def page_out(self, sync: bool) -> None:  # host memory already: nothing to move
        return None

    def page_in(self) -> None:
        return None

    def check_finite(self, grads) -> None:
        for i, g in grads:
            _raise_nonfinite(i, g.detach().to(torch.float32).reshape(-1).numpy())

    def step(self, work, decay: str) -> None:
        for i, p, g, t, _, group in work:
            kw = dict(lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"])
            p32 = p.detach().to(torch.float32).reshape(-1).numpy()  # (n,)
            g32 = g.detach().to(torch.float32).reshape(-1).numpy()  # (n,)
            if self.state_bits == 32:
                m, v = self.states[i]
                p_new, m, v = spec.adamw_step(p32, g32, m, v, t, decay=decay, **kw)
                self.states[i] = (m, v)
            else:
                p_new, self.states[i] = spec.adamw_step_8bit(p32, g32, self.states[i], t, decay=decay, **kw)
            p.copy_(torch.from_numpy(np.asarray(p_new, np.float32)).view(p.shape))  # one rounding to p.dtype

    def export(self) -> list[dict[str, np.ndarray]]:
        if self.state_bits == 32:
            return [{"m": m.copy(), "v": v.copy()} for m, v in self.states]
        return [
            {"m_codes": s.m_codes.copy(), "m_absmax": s.m_absmax.copy(), "v_codes": s.v_codes.copy(),
             "v_absmax": s.v_absmax.copy()}
            for s in self.states
        ]  # fmt: skip

    def load(self, arrays: list[dict[str, np.ndarray]]) -> None:
        if self.state_bits == 32:
            self.states = [(a["m"].copy(), a["v"].copy()) for a in arrays]
        else:
            self.states = [
                spec.AdamW8bitState(
                    m_codes=a["m_codes"].copy(), m_absmax=a["m_absmax"].copy(),
                    v_codes=a["v_codes"].copy(), v_absmax=a["v_absmax"].copy(),
                )
                for a in arrays
            ]  # fmt: skip


def _raise_nonfinite(i: int, g32: np.ndarray) -> None:
    finite = np.isfinite(g32)
    if not finite.all():
        first = int(np.argmin(finite))
        raise NonFiniteError(
            f"gradient of parameter {i} has {finite.size - int(np.count_nonzero(finite))} non-finite value(s) "
            f"(NaN/Inf); the first is {g32[first]} at flat index {first}. Nothing was updated: skip this step "
            "(loss-scale overflow?) or find where the NaN comes from."
        )


def _state_nbytes(n: int, state_bits: int) -> int:
    if state_bits == 32:
        return 2 * _aligned(4 * n)
    nb = -(-n // BLOCKSIZE_8BIT)
    return 2 * _aligned(n) + 2 * _aligned(4 * nb)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


# ---- CUDA: one arena, managed or device memory, one fused launch ----------------------------------------------


def _kernels():
    """The compiled kernels of kernels/adamw.cu (through the backend's build cache)."""
    from backends.cupy_backend import build

    if "adamw.cu" in build.NAME_EXPRESSIONS:
        mod = build.module("adamw.cu")
    else:
        mod = _local_module(build.source("adamw.cu"), build.OPTIONS)
    return mod


_LOCAL_MODULES: dict[str, object] = {}


def _local_module(src: str, options: tuple[str, ...]):
    import cupy

    if src not in _LOCAL_MODULES:
        mod = cupy.RawModule(code=src, options=options)
        mod.compile()
        _LOCAL_MODULES[src] = mod
    return _LOCAL_MODULES[src]


def _location(device_id: int | None):
    """A cudaMemLocation (CUDA 13's argument of prefetch and advise): device `device_id`, or the host when None."""
    from cuda.bindings import runtime as cudart

    loc = cudart.cudaMemLocation()
    if device_id is None:
        loc.type = cudart.cudaMemLocationType.cudaMemLocationTypeHost
        loc.id = 0
    else:
        loc.type = cudart.cudaMemLocationType.cudaMemLocationTypeDevice
        loc.id = device_id
    return loc


def _prefetch(ptr: int, nbytes: int, device_id: int | None, stream_ptr: int) -> None:
    """cudaMemPrefetchAsync to device `device_id` (None: the host) on a stream; CUDA 13 takes a cudaMemLocation."""
    from cuda.bindings import runtime as cudart

    loc = _location(device_id)
    try:
        (err,) = cudart.cudaMemPrefetchAsync(ptr, nbytes, loc, 0, stream_ptr)
    except TypeError:  # cuda-bindings 12.x: (ptr, count, dstDevice, stream)
        dst = cudart.cudaCpuDeviceId if device_id is None else device_id
        (err,) = cudart.cudaMemPrefetchAsync(ptr, nbytes, dst, stream_ptr)
    if err != cudart.cudaError_t.cudaSuccess:
        where = "host" if device_id is None else f"cuda:{device_id}"
        raise RuntimeError(f"cudaMemPrefetchAsync of {nbytes} bytes to {where} failed: {err}")


def _advise(ptr: int, nbytes: int, advice: str, device_id: int | None) -> None:
    """cudaMemAdvise(ptr, nbytes, cudaMemAdvise<advice>, device `device_id` or the host when None)."""
    from cuda.bindings import runtime as cudart

    adv = getattr(cudart.cudaMemoryAdvise, f"cudaMemAdvise{advice}")
    loc = _location(device_id)
    try:
        (err,) = cudart.cudaMemAdvise(ptr, nbytes, adv, loc)
    except TypeError:  # cuda-bindings 12.x: an int device (cudaCpuDeviceId for the host)
        (err,) = cudart.cudaMemAdvise(ptr, nbytes, adv, cudart.cudaCpuDeviceId if device_id is None else device_id)
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"cudaMemAdvise({advice}) of {nbytes} bytes failed: {err}")


def _check_host_room(need: int) -> None:
    """Refuse host placement when MemAvailable (Linux /proc/meminfo) is short of the arena plus 1 GiB."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()}
    except OSError:
        return
    avail = info.get("MemAvailable")
    if avail is not None and avail < need + (1 << 30):
        raise DeviceMemoryError(
            f"cannot place {need / 2**20:.1f} MiB of optimizer state in host memory: {avail / 2**20:.1f} MiB "
            "available (1 GiB kept as a margin). Use state_bits=8 or placement='device'."
        )


class _CudaStates:
    """All states of the optimizer in one arena; one fused kernel launch per step."""

    def __init__(self, params, device, state_bits, paged, chunk, margin_bytes, free_memory_fn, placement="device"):
        import cupy

        self.cp = cupy
        self._streams: dict[int, object] = {}  # torch stream pointer -> CuPy wrapper
        self.device = device
        self.device_id = device.index if device.index is not None else torch.cuda.current_device()
        self.state_bits = state_bits
        self.pageable = paged
        self.on_host = placement == "host"
        self.chunk = chunk
        self._free_fn = free_memory_fn
        self.sizes = [p.numel() for p in params]
        # arena layout: per parameter m, v (32-bit) or m_codes, v_codes, m_absmax, v_absmax (8-bit), 256-B aligned
        self.offsets: list[dict[str, int]] = []
        off = 0
        for n in self.sizes:
            nb = -(-n // BLOCKSIZE_8BIT)
            parts = (("m", 4 * n), ("v", 4 * n)) if state_bits == 32 else (
                ("m", n), ("v", n), ("m_absmax", 4 * nb), ("v_absmax", 4 * nb))  # fmt: skip
            entry = {}
            for name, size in parts:
                entry[name] = off
                off += _aligned(size)
            self.offsets.append(entry)
        self.nbytes = max(off, _ALIGN)
        with cupy.cuda.Device(self.device_id):
            free, total = cupy.cuda.runtime.memGetInfo()
            self.margin = int(margin_bytes) if margin_bytes is not None else max(256 << 20, total // 50)
            stream = self._stream()
            if self.on_host:
                _check_host_room(self.nbytes)
                self.mem = cupy.cuda.malloc_managed(self.nbytes)
                self.base = int(self.mem.ptr)
                _advise(self.base, self.nbytes, "SetPreferredLocation", None)
                _advise(self.base, self.nbytes, "SetAccessedBy", self.device_id)
                ctypes.memset(self.base, 0, self.nbytes)  # first touch by the CPU: the pages are born in host memory
                self._torch_arena = None
            elif paged:
                self._check_room(self.nbytes, "allocate")
                self.mem = cupy.cuda.malloc_managed(self.nbytes)  # MemoryPointer into managed memory
                self.base = int(self.mem.ptr)
                _prefetch(self.base, self.nbytes, self.device_id, stream.ptr)
                self._torch_arena = None
            else:
                self._check_room(self.nbytes, "allocate")
                self._torch_arena = torch.empty(self.nbytes, dtype=torch.uint8, device=device)
                self.base = self._torch_arena.data_ptr()
                self.mem = cupy.cuda.MemoryPointer(
                    cupy.cuda.UnownedMemory(self.base, self.nbytes, self._torch_arena, self.device_id), 0
                )
            if not self.on_host:
                cupy.cuda.runtime.memsetAsync(self.base, 0, self.nbytes, stream.ptr)
            self.resident = not self.on_host
            # static part of the per-tensor table
            self.static = np.zeros(len(params), _ARGS_DTYPE)
            for i, (n, o) in enumerate(zip(self.sizes, self.offsets, strict=True)):
                self.static[i]["m"] = self.base + o["m"]
                self.static[i]["v"] = self.base + o["v"]
                if state_bits == 8:
                    self.static[i]["m_absmax"] = self.base + o["m_absmax"]
                    self.static[i]["v_absmax"] = self.base + o["v_absmax"]
                self.static[i]["n"] = n
            if state_bits == 8:
                self.code_m = cupy.asarray(dynamic_map(signed=True))  # (256,)
                self.code_v = cupy.asarray(dynamic_map(signed=False))  # (256,)
            self.kernels = _kernels()
            self._blocks_cache: dict[tuple[int, ...], object] = {}
            self._keep = None  # the last uploaded table, alive until the next step's launch is queued
            self.naive = False  # tests: run the v1 kernel (adamw32_naive, one launch per tensor) instead

    # -- memory ---------------------------------------------------------------------------------------------------

    def _stream(self):
        ptr = torch.cuda.current_stream(self.device).cuda_stream
        stream = self._streams.get(ptr)
        if stream is None:
            stream = self._streams[ptr] = self.cp.cuda.ExternalStream(ptr, self.device_id)
        return stream

    def _real_free(self) -> int:
        with self.cp.cuda.Device(self.device_id):
            return int(self.cp.cuda.runtime.memGetInfo()[0])

    def free_bytes(self) -> int:
        real = self._real_free()
        return real if self._free_fn is None else min(real, int(self._free_fn()))

    def _check_room(self, need: int, what: str) -> None:
        free = self.free_bytes()
        if free < need + self.margin and torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # return torch's cached blocks before refusing
            free = self.free_bytes()
        if free < need + self.margin:
            raise DeviceMemoryError(
                f"cannot {what} {need / 2**20:.1f} MiB of optimizer state on cuda:{self.device_id}: "
                f"{free / 2**20:.1f} MiB free, and {self.margin / 2**20:.1f} MiB is kept as a margin. "
                "Free device memory (smaller batch, page_out() elsewhere) or use state_bits=8."
            )

    def location(self) -> str:
        if not self.pageable:
            return "device"
        if self.on_host:
            return "host"
        from cuda.bindings import runtime as cudart

        # the int-valued attribute (device id, or cudaCpuDeviceId = -1 for the host); cuda-bindings 13.3 refuses
        # the newer ...LastPrefetchLocationType in its Python helper
        attr = cudart.cudaMemRangeAttribute.cudaMemRangeAttributeLastPrefetchLocation
        err, data = cudart.cudaMemRangeGetAttribute(4, attr, self.base, self.nbytes)
        if err != cudart.cudaError_t.cudaSuccess:
            raise RuntimeError(f"cudaMemRangeGetAttribute(LastPrefetchLocation) failed: {err}")
        where = int(data[0] if isinstance(data, (list, tuple)) else data)
        if where == int(cudart.cudaCpuDeviceId):
            return "host"
        return "device" if where == self.device_id else f"location {where}"

    def page_out(self, sync: bool) -> None:
        if not self.pageable:
            raise ValueError("page_out() needs paged=True (states in managed memory)")
        if not self.resident or self.on_host:
            return
        stream = self._stream()
        _prefetch(self.base, self.nbytes, None, stream.ptr)
        if sync:
            stream.synchronize()
        self.resident = False

    def page_in(self) -> None:
        if self.resident or self.on_host:  # host placement: the kernel reads the states where they are
            return
        self._check_room(self.nbytes, "page in")
        _prefetch(self.base, self.nbytes, self.device_id, self._stream().ptr)
        self.resident = True

    # -- step -----------------------------------------------------------------------------------------------------

    def check_finite(self, grads) -> None:
        """Fused foreach L1 norms (read-only multi-tensor kernels): NaN/Inf anywhere makes a norm non-finite."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for _, g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        norms = [n.float() for gs in by_dtype.values() for n in torch._foreach_norm(gs, 1)]
        if not bool(torch.isfinite(torch.stack(norms)).all()):  # the one sync; the slow path names the culprit
            for i, g in grads:
                _raise_nonfinite(i, g.detach().to(torch.float32).reshape(-1).cpu().numpy())

    def _blocks(self, active: tuple[int, ...]):
        """(tensor position in the launch table, chunk index) per CUDA block, int32[nblocks, 2]; cached by layout."""
        cached = self._blocks_cache.get(active)
        if cached is None:
            rows = []
            per_block = self.chunk  # elements per CUDA block (8-bit: chunk/256 quantization blocks)
            for k, i in enumerate(active):
                nchunks = -(-self.sizes[i] // per_block)
                rows.append(np.stack([np.full(nchunks, k, np.int32), np.arange(nchunks, dtype=np.int32)], axis=1))
            table = np.ascontiguousarray(np.concatenate(rows))  # (nblocks, 2)
            cached = self.cp.asarray(table)
            if len(self._blocks_cache) > 8:
                self._blocks_cache.clear()
            self._blocks_cache[active] = cached
        return cached

    def step(self, work, decay: str) -> None:
        cp = self.cp
        with cp.cuda.Device(self.device_id):
            self.page_in()
            active = tuple(i for i, *_ in work)
            args = self.static[list(active)]  # (k,) copy of the static rows
            args["p"] = [p.data_ptr() for _, p, *_ in work]
            args["g"] = [g.data_ptr() for _, _, g, *_ in work]
            args["dtype"] = [_DTYPE_CODE[p.dtype] for _, p, *_ in work]
            args["decay_before"] = 1 if decay == "before" else 0
            scalars = [s for *_, s, _ in work]
            first = scalars[0]
            same = all(s is first for s in scalars)
            for name in StepScalars.__dataclass_fields__:
                args[name] = getattr(first, name) if same else [getattr(s, name) for s in scalars]
            stream = self._stream()
            with stream:
                blocks = self._blocks(active)
                table = cp.asarray(args.view(np.uint8))  # async H2D from pinned staging, stream-ordered
                grid = (int(blocks.shape[0]),)
                if self.naive and self.state_bits == 32:
                    kern = self.kernels.get_function("adamw32_naive")
                    for k, i in enumerate(active):
                        kern((-(-self.sizes[i] // _THREADS),), (_THREADS,), (table, np.int32(k)))
                elif self.state_bits == 32:
                    kern = self.kernels.get_function("adamw32_multi")
                    kern(grid, (_THREADS,), (table, blocks, np.int64(self.chunk)))
                else:
                    kern = self.kernels.get_function("adamw8_multi")
                    qpc = np.int32(self.chunk // BLOCKSIZE_8BIT)
                    kern(grid, (_THREADS,), (table, blocks, qpc, self.code_m, self.code_v))
            self._keep = table

    # -- state I/O ------------------------------------------------------------------------------------------------

    def _view(self, i: int, name: str):
        n = self.sizes[i]
        if name in ("m_absmax", "v_absmax"):
            dtype, count = np.float32, -(-n // BLOCKSIZE_8BIT)
        elif self.state_bits == 32:
            dtype, count = np.float32, n
        else:
            dtype, count = np.uint8, n
        key = name.replace("_codes", "")
        return self.cp.ndarray((count,), dtype, memptr=self.mem + self.offsets[i][key])

    def _names(self) -> tuple[str, ...]:
        return ("m", "v") if self.state_bits == 32 else ("m_codes", "m_absmax", "v_codes", "v_absmax")

    def export(self) -> list[dict[str, np.ndarray]]:
        """Copies of every state (device-to-host memcpy: reading managed memory this way does not migrate it)."""
        with self.cp.cuda.Device(self.device_id):
            stream = self._stream()
            out = [{k: self._view(i, k).get(stream=stream) for k in self._names()} for i in range(len(self.sizes))]
            stream.synchronize()
        return out

    def load(self, arrays: list[dict[str, np.ndarray]]) -> None:
        with self.cp.cuda.Device(self.device_id):
            stream = self._stream()
            for i, a in enumerate(arrays):
                for k in self._names():
                    self._view(i, k).set(a[k], stream=stream)
            stream.synchronize()
