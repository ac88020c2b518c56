"""The frozen 4-bit base as tensors FSDP2 can shard: each QLoRALinear's codes and absmax state in Parameters.

specs/distributed.md ("Sharding (FSDP2)", DIST-9).  ``fully_shard_qlora(model)`` turns every QLoRALinear into a
ShardedQLoRALinear and calls ``torch.distributed.fsdp.fully_shard`` on it, so each rank keeps 1/N of

    base_packed         uint8[(n + 1) // 2]       the packed 4-bit codes (PK-1)
    base_absmax         float32[nblocks]          plain absmax, or with double quantization
    base_absmax_q       uint8[nblocks]            its 8-bit codes
    base_nested_absmax  float32[ceil(nblocks / 256)]

beside its share of lora_A / lora_B (all requires_grad=False but the LoRA pair).  The rest of the state (shape,
dtype, quant_type, blocksize, offset) is replicated metadata.  FSDP all-gathers a layer's parameters before its
forward and again before its backward; in between ``layer.q`` is a Quantized4bit over the gathered bytes (numpy or
CuPy views of FSDP's unsharded tensors, no copy) and the layer dequantizes from it, so a sharded layer computes
exactly what the unsharded one does (the same bytes, the same kernels).  Outside forward and backward the base
exists only as shards and ``q`` says so.

Refused at the boundary, because FSDP would corrupt the base silently: a mixed-precision policy that casts
parameters (a float "quant_storage" cast to bf16 loses the codes; here the codes are uint8 and such a policy is
refused before anything is wrapped), a base whose bytes or settings differ between ranks (DIST-1), float64 compute.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import qlora_ref

from .layer import QLoRALinear, scratch_buffer
from .prepare import qlora_layers

ARRAYS = ("packed", "absmax", "absmax_q", "nested_absmax")  # the Quantized4bit fields that become Parameters
_META = ("shape", "dtype", "quant_type", "blocksize", "offset", "nested_blocksize")
_NUMPY = {torch.uint8: np.uint8, torch.float32: np.float32}


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
        tensors = {k: _to_torch(getattr(q, k), layer.device) for k in ARRAYS if getattr(q, k) is not None}
        del layer.__dict__["q"]
        layer.__class__ = cls
        layer._base_meta = meta
        for k, t in tensors.items():
            layer.register_parameter(f"base_{k}", nn.Parameter(t, requires_grad=False))
        layer._bound = None
        return layer

    @property
    def q(self) -> qlora_ref.Quantized4bit:
        """The 4-bit state over the all-gathered Parameters (inside forward / backward under FSDP, or unsharded)."""
        from torch.distributed.tensor import DTensor

        fields = {}
        for k in ARRAYS:
            t = getattr(self, f"base_{k}", None)
            if isinstance(t, DTensor):
                raise RuntimeError(
                    "this layer's 4-bit base is sharded over the ranks (FSDP2): it exists whole only inside forward "
                    "and backward; call the model, or gather it with the module's unshard() first"
                )
            fields[k] = None if t is None else _view(t.detach())
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


def _to_torch(arr, device: torch.device) -> torch.Tensor:
    """A torch copy of a numpy or CuPy array on ``device`` (its own memory: FSDP frees and re-allocates it)."""
    if device.type == "cuda":
        return torch.as_tensor(arr, device=device).clone()
    return torch.from_numpy(arr).clone()  # torch's own storage: from_numpy's cannot be resized, as FSDP frees it


def _view(t: torch.Tensor):
    """The array the backend reads: a numpy view of a CPU tensor, a CuPy view of a CUDA one (no copy)."""
    if t.device.type == "cuda":
        import cupy

        return cupy.asarray(t)
    # Through the address, not Tensor.numpy(): that marks the storage not resizable, and FSDP frees the gathered
    # storage after the call by resizing it to 0.  The view lives only for this call, while FSDP holds the storage.
    nbytes = t.numel() * t.element_size()
    raw = (
        np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(t.data_ptr())) if nbytes else np.empty(0, np.uint8)
    )
    return raw.view(_NUMPY[t.dtype])


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
