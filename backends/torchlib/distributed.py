"""Data parallel QLoRA on torch.distributed: every rank holds the whole 4-bit base, DDP all-reduces the LoRA
gradients (specs/distributed.md, DIST-1 .. DIST-6).  Started by ``torchrun`` (``python -m torch.distributed.run``).

    init_process_group()                          # from torchrun's RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT
    model = prepare_model(model, backend=...)     # every rank quantizes the same weights (checked by wrap_ddp)
    ddp = wrap_ddp(model)                         # DistributedDataParallel over lora_A / lora_B only
    batches = ShardedBatches(stream)              # each rank takes its share of every global batch
    ...  loss = ddp(**batch).loss; loss.backward(); optimizer.step()      # gradients arrive averaged
    save_checkpoint(ddp, optimizer, out, state)   # rank 0 writes; a checkpoint loads with any N

The gradient each rank's optimizer sees after ``backward`` is the mean over the N ranks (DIST-2):

    g = (1/N) sum_k g_k          g_k = d L_k / d theta,  L_k the mean loss of rank k's share of the global batch

which is the single-process gradient of the global batch when every share holds the same number of loss tokens
(then L = (1/N) sum_k L_k); float32 sums it in another order, the only difference (the bound is DIST-3's).
DDP reduces in buckets (``bucket_cap_mb``) launched from autograd hooks while backward still runs, so communication
overlaps the remaining backward.  The frozen base ``QLoRALinear.q`` is a plain attribute (not a Parameter nor a
buffer), so DDP neither broadcasts nor reduces it: ``wrap_ddp`` checks that every rank holds the same bytes (DIST-1).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .prepare import qlora_layers

OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "train_state.json"
ADAPTER_DIR = "adapter"
_Q_ARRAYS = ("packed", "absmax", "absmax_q", "nested_absmax", "offset")


# --- who am I: torchrun's environment (DIST-5) ---------------------------------------------------------------------


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None:
        return default
    if not v.isdigit():
        raise ValueError(f"environment variable {name}={v!r} must be a non-negative integer (torchrun sets it)")
    return int(v)


def rank() -> int:
    """This process's rank: the process group's when initialized, else torchrun's RANK, else 0."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else _env_int("RANK", 0)


def world_size() -> int:
    """Number of processes: the process group's when initialized, else torchrun's WORLD_SIZE, else 1."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else _env_int("WORLD_SIZE", 1)


def local_rank() -> int:
    """This process's index on its node (torchrun's LOCAL_RANK, else 0): the CUDA device it should use."""
    return _env_int("LOCAL_RANK", 0)


_current_rank = rank  # ShardedBatches' argument is named rank


def is_main() -> bool:
    """True on rank 0, the one rank that writes outputs, logs and checkpoints."""
    return rank() == 0


def init_process_group(backend: str | None = None) -> bool:
    """Join the process group torchrun describes (env:// rendezvous); True when running distributed.

    backend: "gloo" (CPU tensors, the numpy backend) or "nccl" (CUDA); default gloo without CUDA, else nccl.  With
    WORLD_SIZE unset or 1 nothing is initialized and False is returned (one process: no DDP needed).  Under CUDA the
    current device becomes cuda:LOCAL_RANK, which prepare_model must see (call this before preparing the model).
    """
    if dist.is_initialized():
        return True
    if _env_int("WORLD_SIZE", 1) <= 1:
        return False
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"WORLD_SIZE is set but {name} is not: start the processes with torchrun")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' (CPU) or 'nccl' (CUDA), got {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, init_method="env://")
    return True


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if dist.is_initialized():
        dist.barrier()


# --- the 4-bit base every rank must share (DIST-1) -----------------------------------------------------------------


def _array_digest(h, a) -> None:
    """Feed one Quantized4bit array into the hash: its bytes (numpy) or a position-weighted checksum (CUDA)."""
    if a is None:
        h.update(b"-")
        return
    if isinstance(a, (np.ndarray, np.generic)):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
        return
    t = torch.as_tensor(a, device="cuda").contiguous().view(-1).view(torch.uint8)  # CuPy array -> bytes, no copy
    h.update(f"{a.dtype}{tuple(a.shape)}".encode())
    chunk = 1 << 24
    weights = torch.arange(1, min(chunk, t.numel()) + 1, device=t.device, dtype=torch.int64) % 65521 + 1
    total = torch.zeros((), device=t.device, dtype=torch.int64)
    for s in range(0, t.numel(), chunk):  # sum_i w_i b_i per chunk, chunk-indexed: a byte move changes the sum
        c = t[s : s + chunk].to(torch.int64)
        total += (c * weights[: c.numel()]).sum() * (s // chunk + 1)
    h.update(str(int(total)).encode())


def base_fingerprint(model) -> str:
    """A digest of every QLoRALinear's frozen base (codes, absmax, double-quant constants, settings) and of the
    model's qlora_config: equal on two ranks iff they train the same quantized model (DIST-1)."""
    h = hashlib.blake2b(digest_size=16)
    cfg = getattr(model, "qlora_config", None)
    h.update(json.dumps(cfg.to_dict() if cfg is not None else None, sort_keys=True, default=str).encode())
    for name, m in qlora_layers(model).items():
        q = m.q
        h.update(f"{name}{q.shape}{q.dtype}{q.quant_type}{q.blocksize}{q.nested_blocksize}".encode())
        h.update(f"{m.r}{m.alpha}{m.dropout}{m.rslora}{m.compute_dtype}{m.lora_A.dtype}".encode())
        for k in _Q_ARRAYS:
            _array_digest(h, getattr(q, k))
    return h.hexdigest()


def _check_same_on_all_ranks(value: str, what: str, fix: str) -> None:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    differ = [k for k, v in enumerate(values) if v != values[0]]
    if differ:
        raise ValueError(f"{what} differs between rank 0 and rank(s) {differ}; {fix}")


# --- DDP over the LoRA parameters (DIST-1, DIST-2, DIST-4) ---------------------------------------------------------


def _check_wrappable(model) -> list[torch.nn.Parameter]:
    if isinstance(model, DistributedDataParallel):
        raise ValueError("the model is already wrapped in DistributedDataParallel; wrap the prepared model once")
    if not isinstance(model, torch.nn.Module) or not qlora_layers(model):
        raise ValueError("wrap_ddp needs a model prepared by backends.torchlib.prepare_model (no QLoRALinear found)")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters: nothing for DDP to reduce")
    for n, p in trainable:
        if getattr(p, "_post_accumulate_grad_hooks", None):
            raise ValueError(
                f"parameter {n} has a post-accumulate-grad hook (PagedAdamW.hook_into_backward?): it would step on "
                "this rank's gradient before DDP averages it, and the ranks would drift apart; under DDP call "
                "optimizer.step() after backward instead"
            )
    return [p for _, p in trainable]


def wrap_ddp(model, *, bucket_cap_mb: float = 25, gradient_as_bucket_view: bool = False, **ddp_kwargs):
    """``DistributedDataParallel`` over a prepared model's trainable (LoRA) parameters; returns the wrapper.

    Each rank keeps its own copy of the 4-bit base (not a Parameter: DDP ignores it); DDP broadcasts rank 0's LoRA
    parameters and buffers once at construction, then averages gradients in buckets of ``bucket_cap_mb`` MB,
    overlapped with backward.  Refused (ValueError), because DDP would train on silently: no process group; a
    model already wrapped or not prepared; a post-accumulate-grad hook on a LoRA parameter (steps before the
    average); a 4-bit base or QLoRA setting that differs between ranks (DIST-1); LoRA parameters on a device other
    than cuda:LOCAL_RANK (CUDA) or a nccl group for a CPU model; ``find_unused_parameters`` (every LoRA parameter is
    used in every step; asking for it hides a model that is not the one prepared).  A hook added after wrapping is
    not seen: never call ``hook_into_backward`` on an optimizer over DDP-wrapped parameters.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("no process group: start with torchrun and call init_process_group() before wrap_ddp")
    params = _check_wrappable(model)
    if ddp_kwargs.get("find_unused_parameters"):
        raise ValueError("find_unused_parameters: every LoRA parameter takes part in every step; leave it False")
    devices = {p.device for p in params}
    if len(devices) != 1:
        raise ValueError(f"the LoRA parameters sit on several devices {sorted(map(str, devices))}; use one per rank")
    (device,) = devices
    pg_backend = dist.get_backend()
    if device.type == "cuda":
        want = torch.device("cuda", local_rank())
        if device != want:
            raise ValueError(
                f"LoRA parameters on {device} but this rank's device is {want} (LOCAL_RANK): call "
                "init_process_group() or torch.cuda.set_device(LOCAL_RANK) before prepare_model"
            )
        device_ids = [device.index]
    else:
        if pg_backend == "nccl":
            raise ValueError("a CPU model (numpy backend) needs the gloo process group, not nccl")
        device_ids = None
    _check_same_on_all_ranks(
        base_fingerprint(model),
        "the frozen 4-bit base or the QLoRA settings",
        "every rank must prepare the same checkpoint with the same settings (DDP does not broadcast QLoRALinear.q)",
    )
    ddp_kwargs.setdefault("broadcast_buffers", False)  # frozen buffers (bias, rotary): equal since construction
    return DistributedDataParallel(
        model,
        device_ids=device_ids,
        bucket_cap_mb=bucket_cap_mb,
        gradient_as_bucket_view=gradient_as_bucket_view,
        **ddp_kwargs,
    )


def unwrap(model):
    """The prepared model inside a DistributedDataParallel (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def lora_replicas_equal(model) -> bool:
    """True when every rank holds bit-identical LoRA parameters (DIST-2: they start and stay equal); collective."""
    if world_size() == 1:
        return True
    flat = torch.cat([p.detach().reshape(-1).float() for p in unwrap(model).parameters() if p.requires_grad])
    gathered = [torch.empty_like(flat) for _ in range(world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(g.view(torch.int32), flat.view(torch.int32)) for g in gathered)


def fully_shard_lora(model, mesh=None):
    """FSDP2 over the LoRA parameters: ``fully_shard`` on every QLoRALinear, so lora_A / lora_B become DTensors
    sharded on dim 0 over ``mesh`` (default: all ranks, on the LoRA parameters' device type); returns the model.

    The 4-bit base is not a tensor FSDP can see here, so every rank keeps it whole; it is checked equal on every rank
    as under DDP (DIST-1).  To shard the base too: ``sharded_base.fully_shard_qlora`` (DIST-9).  Gradients are
    reduce-scattered (averaged) by FSDP.  Step the sharded parameters with torch.optim.AdamW: PagedAdamW does not
    take DTensors.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("no process group: start with torchrun and call init_process_group() before fully_shard_lora")
    params = _check_wrappable(model)
    if mesh is None:
        mesh = init_device_mesh(params[0].device.type, (world_size(),))
    _check_same_on_all_ranks(
        base_fingerprint(model),
        "the frozen 4-bit base or the QLoRA settings",
        "every rank must prepare the same checkpoint with the same settings (FSDP does not see QLoRALinear.q)",
    )
    for layer in qlora_layers(model).values():
        fully_shard(layer, mesh=mesh)
    return model


# --- the data: each rank's share of every global batch (DIST-4) ----------------------------------------------------


def shard(batch: list, rank_: int, world: int) -> list:
    """Rank ``rank_``'s contiguous share of a global batch: batch[k b : (k+1) b], b = len(batch) / world.

    A batch that does not split evenly is refused: DDP averages the ranks' mean losses with equal weights, so uneven
    shares would weigh some examples more than the single-process mean does."""
    if world < 1 or not 0 <= rank_ < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank_}, world={world}")
    if len(batch) % world:
        raise ValueError(
            f"a global batch of {len(batch)} examples does not split over {world} ranks; use a batch size that is a "
            "multiple of the number of processes (and a data set that fills the last batch)"
        )
    b = len(batch) // world
    return batch[rank_ * b : (rank_ + 1) * b]


class ShardedBatches:
    """A stream of global batches (anything with ``next_batch()`` and, for checkpoints, ``state_dict()`` /
    ``load_state_dict()``, e.g. backends.app.batching.BatchStream over the global batch size), each rank taking
    its share.

    Unlike torch's DistributedSampler (which deals out the data set, so the order depends on N), the sequence of
    global batches depends only on the stream's seed: its position, the same on every rank, is the checkpoint, and a
    run resumed with another N continues the same global batches (DIST-4)."""

    def __init__(self, stream, *, rank: int | None = None, world: int | None = None):
        if not callable(getattr(stream, "next_batch", None)):
            raise TypeError(f"ShardedBatches needs a stream with next_batch(), got {type(stream).__name__}")
        self.stream = stream
        self.rank = _current_rank() if rank is None else rank
        self.world = world_size() if world is None else world
        size = getattr(stream, "batch_size", None)
        if size is not None and size % self.world:
            raise ValueError(
                f"global batch size {size} does not split over {self.world} ranks; use a multiple of {self.world}"
            )

    def next_batch(self) -> list:
        return shard(self.stream.next_batch(), self.rank, self.world)

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)


# --- checkpoints: one rank writes, any N reads (DIST-6) -------------------------------------------------------------


def save_checkpoint(model, optimizer, out_dir, state: dict | None = None) -> Path:
    """Rank 0 writes out_dir/{adapter/ (PEFT), optimizer.pt, train_state.json}; every rank waits for it.

    The LoRA parameters and the optimizer states are replicas (DIST-2), so rank 0's are the run's and the files do
    not depend on N; under FSDP2 (sharded_base, with ShardedPagedAdamW) every rank gathers them whole first, so the
    files are the same format and load with any N too; ``state`` (step, the stream's position, ...) must be JSON
    and is stored with the world size."""
    from torch.distributed.tensor import DTensor

    from .export import peft_state_dict, save_peft_adapter
    from .files import write_json

    out = Path(out_dir)
    lora, opt = None, None
    if any(isinstance(p, DTensor) for p in unwrap(model).parameters()):  # sharded: every rank takes part in the
        lora = peft_state_dict(unwrap(model))  # gathers (DDP replicas: rank 0 alone copies its own, below)
        opt = optimizer.state_dict()  # sharded_base.ShardedPagedAdamW gathers its states
    if is_main():
        lora = peft_state_dict(unwrap(model)) if lora is None else lora
        opt = optimizer.state_dict() if opt is None else opt
        out.mkdir(parents=True, exist_ok=True)
        save_peft_adapter(unwrap(model), out / ADAPTER_DIR, state_dict=lora)
        torch.save(opt, out / OPTIMIZER_FILE)
        write_json(out / STATE_FILE, {"world_size": world_size(), "state": state or {}}, sort_keys=False)
    barrier()
    return out


def load_checkpoint(model, optimizer, ckpt_dir) -> dict:
    """Every rank reads a checkpoint written by save_checkpoint (by any number of ranks) into the prepared model
    (bare or DDP-wrapped) and its optimizer; returns the stored ``state``."""
    from .export import load_peft_adapter

    path = Path(ckpt_dir)
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"{path} is not a checkpoint written by save_checkpoint (no {STATE_FILE})")
    load_peft_adapter(unwrap(model), path / ADAPTER_DIR)
    optimizer.load_state_dict(torch.load(path / OPTIMIZER_FILE, weights_only=True))
    return json.loads((path / STATE_FILE).read_text())["state"]


__all__ = [
    "ShardedBatches",
    "barrier",
    "base_fingerprint",
    "fully_shard_lora",
    "init_process_group",
    "is_main",
    "load_checkpoint",
    "local_rank",
    "lora_replicas_equal",
    "per_rank_estimate",
    "rank",
    "save_checkpoint",
    "shard",
    "unwrap",
    "wrap_ddp",
    "world_size",
]


from .ledger import per_rank_estimate  # noqa: E402, F401  (the ledger per rank, DIST-7, lives with the ledger)
