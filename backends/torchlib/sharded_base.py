"""The frozen 4-bit base as tensors FSDP2 can shard: each QLoRALinear's codes and absmax state in Parameters.

specs/distributed.md ("Sharding (FSDP2)", DIST-9).  ``fully_shard_qlora(model)`` turns every QLoRALinear into a
ShardedQLoRALinear and calls ``torch.distributed.fsdp.fully_shard`` on it, so each rank keeps 1/N of

    base_packed         the packed 4-bit codes (PK-1), uint8[(n + 1) // 2]
    base_absmax         plain absmax, float32[nblocks]; or with double quantization
    base_absmax_q       its 8-bit codes, uint8[nblocks]
    base_nested_absmax  float32[ceil(nblocks / 256)]

beside its share of lora_A / lora_B (all requires_grad=False but the LoRA pair).  Each array's bytes are held in a
float32 Parameter (zero-padded to a whole number of words; the bytes' own count and dtype are metadata): FSDP before
torch 2.13 makes every sharded parameter ``nn.Parameter(..., requires_grad=True)``, which integer tensors refuse, and
a copy never changes a float's bits (bitsandbytes' "quant_storage" does the same).  The rest of the state (shape,
dtype, quant_type, blocksize, offset) is replicated metadata.  FSDP all-gathers a layer's parameters before its
forward and again before its backward; in between ``layer.q`` is a Quantized4bit over the gathered bytes (numpy or
CuPy views of FSDP's unsharded tensors, no copy) and the layer dequantizes from it, so a sharded layer computes
exactly what the unsharded one does (the same bytes, the same kernels).  Outside forward and backward the base
exists only as shards and ``q`` says so.

``ShardedPagedAdamW(trainable_parameters(model), lr=...)`` steps each rank's shards of the LoRA DTensors with the
spec's AdamW (PagedAdamW): the optimizer states are 1/N per rank, paged as PagedAdamW pages them.

Refused at the boundary, because FSDP would corrupt the base silently: a mixed-precision policy that casts
parameters (the float32 words holding the codes, cast to bf16, would lose them: refused before anything is wrapped),
a base whose bytes or settings differ between ranks (DIST-1), float64 compute.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

import qlora_ref

from .layer import QLoRALinear
from .prepare import qlora_layers
from .scratch import scratch_buffer

ARRAYS = ("packed", "absmax", "absmax_q", "nested_absmax")  # the Quantized4bit fields that become Parameters
_META = ("shape", "dtype", "quant_type", "blocksize", "offset", "nested_blocksize")


class ShardedQLoRALinear(QLoRALinear):
    """A QLoRALinear whose 4-bit base lives in ``base_*`` Parameters (module docstring); made by ``convert``."""

    @classmethod
    def convert(cls, layer: QLoRALinear) -> ShardedQLoRALinear:
        """Move ``layer``'s base into Parameters (copies owned by the module) and make it this class, in place."""
        if type(layer) is not QLoRALinear:
            raise TypeError(f"convert takes a plain QLoRALinear, got {type(layer).__name__}")
        if layer.compute_dtype == torch.float64:
            raise ValueError("float64 compute (CPU gradient checks) cannot shard its base; use float32 or bfloat16")
        q = layer.q
        meta = {k: getattr(q, k) for k in _META}
        arrays = {k: getattr(q, k) for k in ARRAYS if getattr(q, k) is not None}
        words = {k: _as_words(a, layer.device) for k, a in arrays.items()}
        del layer.__dict__["q"]
        layer.__class__ = cls
        layer._base_meta = meta
        layer._base_bytes = {k: (int(a.nbytes), np.dtype(a.dtype.name)) for k, a in arrays.items()}
        for k, t in words.items():
            layer.register_parameter(f"base_{k}", nn.Parameter(t, requires_grad=False))
        layer._bound = None
        return layer

    @property
    def q(self) -> qlora_ref.Quantized4bit:
        """The 4-bit state over the all-gathered Parameters (inside forward / backward under FSDP, or unsharded)."""
        fields = {}
        for k in ARRAYS:
            t = getattr(self, f"base_{k}", None)
            if isinstance(t, DTensor):
                raise RuntimeError(
                    "this layer's 4-bit base is sharded over the ranks (FSDP2): it exists whole only inside forward "
                    "and backward; call the model, or gather it with the module's unshard() first"
                )
            fields[k] = None if t is None else _view(t.detach(), *self._base_bytes[k])
        if self.device.type == "cuda":
            from backends.cupy_backend.quantized import DeviceQuantized4bit

            return DeviceQuantized4bit._trusted(**fields, **self._base_meta)
        return qlora_ref.Quantized4bit(**fields, **self._base_meta)

    def dequantized(self) -> torch.Tensor:
        """W_hat (out, in) in the compute dtype, in the shared scratch buffer, from the bytes gathered for this call
        (their address changes from call to call, so no launch is bound, and nothing is kept: the base is sharded
        to save memory)."""
        q = self.q
        W = scratch_buffer(q.n, self.device, self.compute_dtype).view(q.shape)
        self.backend.dequantize_4bit(q, out=W)
        return W

    def extra_repr(self) -> str:
        m = self._base_meta
        return (
            f"in={self.in_features}, out={self.out_features}, {m['quant_type']}, blocksize={m['blocksize']}, "
            f"double_quant={m['offset'] is not None}, r={self.r}, alpha={self.alpha:g}, sharded base"
        )


def _as_words(arr, device: torch.device) -> torch.Tensor:
    """A float32 torch tensor on ``device`` holding ``arr``'s bytes, zero-padded to whole 4-byte words (its own
    storage: FSDP frees and re-allocates it; from_numpy's storage could not be resized)."""
    raw = arr.reshape(-1).view("uint8")  # numpy or CuPy: the array's bytes
    nbytes = int(raw.nbytes)
    if device.type == "cuda":
        b = torch.as_tensor(raw, device=device)
    else:
        b = torch.from_numpy(np.ascontiguousarray(raw))
    padded = torch.zeros((nbytes + 3) // 4 * 4, dtype=torch.uint8, device=device)
    padded[:nbytes] = b
    return padded.view(torch.float32)


def _view(t: torch.Tensor, nbytes: int, dtype: np.dtype):
    """The array the backend reads, ``nbytes`` of ``t``'s bytes as ``dtype``: a CuPy view of a CUDA tensor, a numpy
    view of a CPU one (no copy)."""
    b = t.view(torch.uint8)[:nbytes]
    if t.device.type == "cuda":
        import cupy

        return cupy.asarray(b).view(dtype)
    # Through the address, not Tensor.numpy(): that marks the storage not resizable, and FSDP frees the gathered
    # storage after the call by resizing it to 0.  The view lives only for this call, while FSDP holds the storage.
    raw = (
        np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(b.data_ptr())) if nbytes else np.empty(0, np.uint8)
    )
    return raw.view(dtype)


def fully_shard_qlora(model, mesh=None, **fsdp_kwargs):
    """FSDP2 over every QLoRALinear with its 4-bit base sharded too (module docstring); returns the model.

    ``fsdp_kwargs`` go to ``fully_shard``; an ``mp_policy`` that casts parameters is refused.  Call after
    init_process_group (torchrun); every rank must have prepared the same checkpoint with the same settings."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from . import distributed as D

    policy = fsdp_kwargs.get("mp_policy")
    if policy is not None and getattr(policy, "param_dtype", None) is not None:
        raise ValueError(
            "mp_policy.param_dtype would cast every parameter of the layer, the 4-bit base's too; leave it None "
            "(the layer computes in its own compute dtype)"
        )
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("no process group: start with torchrun and call init_process_group() first")
    layers = qlora_layers(model)
    if not layers:
        raise ValueError("fully_shard_qlora needs a model prepared by prepare_model (no QLoRALinear found)")
    if any(isinstance(m, ShardedQLoRALinear) for m in layers.values()):
        raise ValueError("the model's 4-bit base is sharded already; shard a prepared model once")
    D._check_same_on_all_ranks(
        D.base_fingerprint(model),
        "the frozen 4-bit base or the QLoRA settings",
        "every rank must prepare the same checkpoint with the same settings before the base is sharded",
    )
    device = next(iter(layers.values())).device
    if mesh is None:
        mesh = init_device_mesh(device.type, (D.world_size(),))
    for layer in layers.values():
        fully_shard(ShardedQLoRALinear.convert(layer), mesh=mesh, **fsdp_kwargs)
    return model


class ShardedPagedAdamW:
    """PagedAdamW over this rank's shards of FSDP2's DTensor parameters: each rank keeps the states of its 1/N of
    every LoRA tensor (paged as PagedAdamW pages them) and steps them in place.

    AdamW is elementwise (ADAMW-2, ADAMW-3), so stepping the shards is the unsharded step, entry for entry.  The
    shards are ``p.to_local().detach()`` (views of FSDP's sharded storage, leaf tensors the optimizer can hold); each
    step hands them their part of the reduce-scattered gradient.  ``state_dict`` / ``load_state_dict`` speak the
    whole parameters' PagedAdamW format, so distributed.save_checkpoint / load_checkpoint work with any N."""

    def __init__(self, params, **adamw_kwargs):
        from .optim import PagedAdamW

        self.params = list(params)
        bad = [i for i, p in enumerate(self.params) if not isinstance(p, DTensor)]
        if bad:
            raise TypeError(f"parameters {bad[:5]} are not DTensors: shard the model first (fully_shard_qlora)")
        self.shards = [p.to_local().detach() for p in self.params]
        self.optimizer = PagedAdamW(self.shards, **adamw_kwargs)
        self.param_groups = self.optimizer.param_groups  # over the shards: lr and the rest are set here

    def step(self) -> None:
        for p, s in zip(self.params, self.shards, strict=True):
            s.grad = None if p.grad is None else p.grad.to_local()
        self.optimizer.step()
        for s in self.shards:
            s.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        """PagedAdamW's state dict of the whole parameters (a collective every rank calls): each state is the ranks'
        shards gathered in row order, so a checkpoint does not depend on N (32-bit states; the 8-bit ones are blocked
        over each shard's own entries and do not concatenate)."""
        if self.optimizer.state_bits != 32:
            raise ValueError("a sharded 8-bit optimizer state cannot be gathered whole; checkpoint with state_bits=32")
        sd = self.optimizer.state_dict()
        for i, p in enumerate(self.params):
            st = sd["state"].get(i)
            if st is None:
                continue
            for k in ("m", "v"):
                local = st[k].to(p.device).view(self.shards[i].shape)
                full = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                st[k] = full.full_tensor().reshape(-1).cpu()
        return sd

    def load_state_dict(self, state: dict) -> None:
        """Load a whole-parameter state dict (``state_dict``'s, or one PagedAdamW wrote for the unsharded model, by
        any number of ranks): each rank keeps its rows of every state (a collective every rank calls)."""
        from torch.distributed.tensor import distribute_tensor

        sd = {**state, "state": {i: dict(st) for i, st in state["state"].items()}}
        for i, p in enumerate(self.params):
            st = sd["state"].get(i)
            if st is None:
                continue
            for k in ("m", "v"):
                if st[k].numel() != p.numel():
                    raise ValueError(
                        f"state {k} of parameter {i} has {st[k].numel()} entries, the parameter {p.numel()}"
                    )
                whole = st[k].to(p.device).view(p.shape)
                st[k] = distribute_tensor(whole, p.device_mesh, p.placements).to_local().reshape(-1).cpu()
        self.optimizer.load_state_dict(sd)

    @property
    def state_bytes(self) -> int:
        return self.optimizer.state_bytes
