"""PagedAdamW: the spec's AdamW as a torch optimizer, over the backend's AdamW step (states paged on CUDA).

Math (qlora_ref.adamw, specs/adamw.md; the scalars in backends/adamw_state.py), float32, one op at a time:

    m = b1*m + (1-b1)*g                    v = b2*v + (1-b2)*(g*g)                                    (ADAMW-2)
    c1 = 1 - b1**t                         c2 = sqrt(1 - b2**t)            step_size = -lr*c2/c1
    p = p + step_size * (m / (sqrt(v) + eps*c2))
    decay="after"  (default, bitsandbytes):        then p = p*(1 - lr*wd)                             (ADAMW-3)
    decay="before" (torch.optim.AdamW placement):  p = p*(1 - lr*wd) first

state_bits=8 keeps m, v as the spec's 8-bit blockwise states (ADAMW-6..ADAMW-8: 256-value blocks, signed dynamic map
for m, unsigned for v), for every parameter whatever its size.

This module is the torch front: param groups, step counts, the per-group scalars, state_dict / load_state_dict,
stepping inside backward.  The states and the step are the backend's (`Backend.adamw_states`, `Backend.adamw_step`),
the one whose device the parameters are on (or the one named by ``backend=``):

- "numpy" (CPU tensors): numpy states; each step calls ``qlora_ref.adamw.adamw_step`` / ``adamw_step_8bit`` per
  parameter, bit-identical to the spec by construction (backends/numpy_adamw.py).
- "cupy" (CUDA tensors): every state in one arena (CUDA managed memory when ``paged=True``, device memory otherwise;
  backends/cupy_backend/paged.py) and ONE fused launch per step over a table of (param, grad, state) pointers
  (backends/cupy_backend/adamw.py, kernels/adamw.cu): 0 ULP from the spec, since the kernel gets the spec's own
  host-computed float32 scalars and does only correctly rounded mul/add/div/sqrt.

Paging (SPEC-NOTES 1.9): ``page_out()`` migrates the states to host memory, ``page_in()`` brings them back; ``step()``
pages in when needed and, after the update, pages out by itself when free device memory falls under
``page_threshold_bytes``.  The states are allocated and paged in only when their size plus a margin is free
(``DeviceMemoryError`` otherwise).  ``placement="host"`` keeps them in host memory for good: the kernel reaches them
across the bus and no device memory is ever taken (the 65B-shaped run's 38 GB budget, benchmarks/bench_memory.py).

Stepping inside backward (``hook_into_backward()``): each parameter is stepped, and its gradient freed, as soon as
autograd has accumulated it (``register_post_accumulate_grad_hook``), so the LoRA gradients never coexist on the
device.  The update is the same AdamW (same bits); what is given up is a global gradient-norm clip (the norm is not
known until every gradient exists) and gradient accumulation over micro-batches.  How the hooks keep the
non-finite check without a host synchronisation, and overlap the steps with backward: in_backward.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch

from backends import Backend
from backends.adamw_state import BLOCKSIZE_8BIT, DeviceMemoryError, StepScalars, check_hyper, step_scalars
from qlora_ref.checks import NonFiniteError

from .optim_checks import PARAM_DTYPES, backend_for, check_grad, check_param, checked_states, common_device

STATE_DICT_FORMAT = "qlora_ref.PagedAdamW/1"
_STRIDED = torch.strided

__all__ = ["DeviceMemoryError", "PagedAdamW", "StepScalars", "step_scalars"]


class PagedAdamW(torch.optim.Optimizer):
    """AdamW (qlora_ref.adamw) over torch parameters, states held by the backend, one fused launch per step on CUDA.

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
            spec does); on CUDA this is one fused check and one host sync per step.  "deferred": the same check
            without the sync: a step with a NaN/Inf gradient writes nothing (the kernel reads the check's flag), and
            NonFiniteError is raised by the next ``step()``, ``state_dict()`` or ``raise_if_nonfinite()``, which
            first undo that step's step counts (a pinned copy of the flag, read once the GPU has passed it).
        backend: "numpy", "cupy" or a backend object; default: the one that computes on the parameters' device.
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
        check_finite: bool | str = True,
        backend: str | Backend | None = None,
    ):
        check_hyper(lr, betas, eps, weight_decay)
        if decay not in ("after", "before"):
            raise ValueError(f"decay must be 'after' (bitsandbytes) or 'before' (torch.optim.AdamW), got {decay!r}")
        if page_threshold_bytes < 0:
            raise ValueError(f"page_threshold_bytes must be >= 0, got {page_threshold_bytes}")
        self.decay = decay
        self.state_bits = state_bits
        self.page_threshold_bytes = int(page_threshold_bytes)
        if check_finite not in (True, False, "deferred"):
            raise ValueError(f'check_finite must be True, False or "deferred", got {check_finite!r}')
        self.check_finite = check_finite
        self._pending: list | None = None  # deferred: (param, step count) of the last step, until its flag is read
        self._hooked = None  # in_backward.InBackwardSteps once hook_into_backward() is called
        self._scalars: dict[tuple, StepScalars] = {}  # (t, lr, betas, eps, wd) -> step_scalars, for the hooks
        self._built = False
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self._params = [p for g in self.param_groups for p in g["params"]]
        self._index = {id(p): i for i, p in enumerate(self._params)}
        self._group_of = [g for g in self.param_groups for _ in g["params"]]
        if len(self._index) != len(self._params):
            raise ValueError("a parameter appears more than once in the param groups")
        self._device = common_device(self._params)
        for i, p in enumerate(self._params):
            self.state[p]["step"] = 0
            check_param(i, p)
        self.backend = backend_for(self._device, backend)
        self._states = self.backend.adamw_states(
            [p.numel() for p in self._params],
            state_bits=state_bits,
            device=self._device.index,
            paged=bool(paged),
            placement=placement,
            margin_bytes=margin_bytes,
            free_memory_fn=free_memory_fn,
            chunk=chunk,
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
        return self._device

    @property
    def state_bytes(self) -> int:
        """Bytes of optimizer state (alignment included)."""
        return self._states.nbytes

    @property
    def resident(self) -> bool:
        """True when the states are on the GPU (always True on CPU: host memory is where they live)."""
        return self._states.resident

    def page_out(self, sync: bool = True) -> None:
        """Migrate the states to host memory (managed memory only); with sync, the device memory is free on return."""
        self._states.page_out(sync)

    def page_in(self) -> None:
        """Prefetch the states to the GPU on the current stream (refuses if free memory is short: DeviceMemoryError)."""
        self._states.page_in()

    def state_location(self) -> str:
        """Where the states were last put: "host" or "device" ("device" for unpaged, "host" on CPU)."""
        return self._states.location()

    def maybe_page_out(self) -> bool:
        """Page out when free device memory is below page_threshold_bytes; returns whether it did."""
        states = self._states
        if self.page_threshold_bytes and states.pageable and states.resident:
            if states.free_bytes() < self.page_threshold_bytes:
                states.page_out(True)
                return True
        return False

    def hook_into_backward(self, *, overlap: bool = False, group: int = 16) -> list:
        """Step each parameter the moment its gradient is accumulated, then free that gradient (module docstring).

        Call once; afterwards ``loss.backward()`` performs the optimizer step (do not call ``step()`` or clip).
        Returns the hook handles (``handle.remove()`` undoes it).  The result equals ``backward(); step()``
        parameter for parameter.  Under check_finite="deferred" no hook waits for the GPU: each tensor's check is
        read back later, and a NaN/Inf gradient raises NonFiniteError out of a later ``backward()`` (in_backward.py).
        group: up to this many tensors are gathered and stepped in one launch; overlap (CUDA): the steps run on a
        side stream beside the rest of backward.
        """
        from .in_backward import InBackwardSteps

        if self._hooked is not None:  # hooks registered earlier: their flags are read before new ones take over
            self._hooked.drain()
        self._hooked = InBackwardSteps(self, overlap=overlap, group=group)
        return [p.register_post_accumulate_grad_hook(self._hooked.hook) for p in self._params]

    def _step_tensors(self, params: list, index: list[int], skip) -> list[int]:
        """These parameters' step in one launch (their gradients checked into ``skip`` when given, else as
        check_finite says); returns their new step counts."""
        grads, scalars, counts = [], [], []
        for p, i in zip(params, index, strict=True):
            group = self._group_of[i]
            lr, betas, eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            g = p.grad
            if g.layout is not _STRIDED or not g.is_contiguous() or p.dtype not in PARAM_DTYPES:
                check_grad(i, p)
            t = self.state[p]["step"] + 1
            key = (t, lr, tuple(betas), eps, wd)
            s = self._scalars.get(key)
            if s is None:  # checks the hyperparameters too (a scheduler may have changed lr)
                if len(self._scalars) > 256:
                    self._scalars.clear()
                s = self._scalars[key] = step_scalars(t, lr=lr, betas=betas, eps=eps, weight_decay=wd)
            grads.append(g)
            scalars.append(s)
            counts.append(t)
        check = "deferred" if skip is not None else self.check_finite is True
        self.backend.adamw_step(params, grads, self._states, index, scalars, decay=self.decay, check_finite=check,
                                skip=skip)  # fmt: skip
        for p, t in zip(params, counts, strict=True):
            self.state[p]["step"] = t
        return counts

    # -- the step -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One AdamW step (ADAMW-2, ADAMW-3; 8-bit ADAMW-7, ADAMW-8) for every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params, grads, index, scalars, steps = [], [], [], [], []
        cache: dict[tuple[int, int], StepScalars] = {}
        for group in self.param_groups:
            check_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"])
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                i = self._index[id(p)]
                # torch itself refuses a .grad of another shape, dtype or device on assignment; what it allows and the
                # kernel cannot take (non-contiguous, sparse, a param swapped to another dtype) goes to the full
                # check.  This keeps the per-step host cost at ~0.5 us per tensor.
                if g.layout is not _STRIDED or not g.is_contiguous() or p.dtype not in PARAM_DTYPES:
                    check_grad(i, p)
                t = self.state[p]["step"] + 1
                key = (id(group), t)
                if key not in cache:
                    cache[key] = step_scalars(
                        t, lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"]
                    )
                params.append(p)
                grads.append(g)
                index.append(i)
                scalars.append(cache[key])
                steps.append(t)
        if not params:
            return loss
        deferred = self.check_finite == "deferred"
        if deferred:
            self.raise_if_nonfinite()  # the previous step's flag, long since computed: no wait in practice
        # checks the gradients (ADAMW-12) and pages in (may refuse) before anything is written
        skip = self._skip_flag() if deferred else None
        self.backend.adamw_step(
            params, grads, self._states, index, scalars, decay=self.decay, check_finite=self.check_finite, skip=skip
        )
        for p, t in zip(params, steps, strict=True):
            self.state[p]["step"] = t
        if deferred:
            self._flag_host.copy_(self._flag, non_blocking=True)
            if self._flag_event is not None:
                self._flag_event.record()
            self._pending = list(zip(params, steps, strict=True))
        self.maybe_page_out()
        return loss

    def _skip_flag(self) -> torch.Tensor:
        """The deferred check's int32 flag on the parameters' device, and its pinned host copy (made once)."""
        if not hasattr(self, "_flag"):
            self._flag = torch.zeros(1, dtype=torch.int32, device=self._device)
            cuda = self._device.type == "cuda"
            self._flag_host = torch.zeros(1, dtype=torch.int32, pin_memory=cuda) if cuda else self._flag
            self._flag_event = torch.cuda.Event() if cuda else None
        return self._flag

    def raise_if_nonfinite(self) -> None:
        """check_finite="deferred": raise NonFiniteError if the last step met a NaN/Inf gradient (that step wrote
        nothing; its step counts are undone first).  Waits only for that step's flag, not for later work.  Stepping
        inside backward: every flag not yet read, waiting for the GPU as needed."""
        if self._hooked is not None:
            self._hooked.drain()
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if self._flag_event is not None:
            self._flag_event.synchronize()
        if int(self._flag_host[0]):
            for p, t in pending:
                self.state[p]["step"] = t - 1
            raise NonFiniteError(
                "a gradient of the last optimizer step held NaN/Inf (check_finite='deferred'); that step updated "
                "nothing and is undone: skip the batch, lower the learning rate, or find where the NaN comes from"
            )

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """{"state": {i: {"step", states as CPU tensors}}, "param_groups": [...], "config": {...}}.

        States: 32-bit "m", "v" float32[n]; 8-bit "m_codes", "v_codes" uint8[n], "m_absmax", "v_absmax"
        float32[ceil(n/256)].  Loading it into an optimizer over the same parameter shapes continues bit for bit,
        on either backend.
        """
        self.raise_if_nonfinite()  # a pending non-finite step: its counts must not be saved
        arrays = self._states.export()
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
        steps, arrays = checked_states(state_dict["state"], self._params, self.state_bits)
        self._pending = None  # the loaded counts replace whatever the last step left
        self._states.load(arrays)
        for p, step in zip(self._params, steps, strict=True):
            self.state[p]["step"] = step
        for saved, mine in zip(groups, self.param_groups, strict=True):
            for k, v in saved.items():
                if k != "params":
                    mine[k] = tuple(v) if k == "betas" else v
