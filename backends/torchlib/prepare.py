"""Turning a Hugging Face causal LM into a QLoRA model (loading one from disk is load.py's).

    prepare_model(model, backend="cupy", r=64, alpha=16)     # every nn.Linear but the head -> QLoRALinear

``prepare_model`` replaces every ``nn.Linear`` but the LM head with a ``QLoRALinear`` (frozen NF4 base + LoRA A/B),
quantizing one layer at a time on the backend's device, so the GPU never holds more than one linear weight in 16 bits.
Everything else (embeddings, norms, the LM head) is frozen and cast to the compute dtype.  The resolved settings are
kept on the model as ``model.qlora_config`` (a ``QLoRAConfig``) and used by ``backends.torchlib.export``.

``enable_checkpointing`` / ``disable_checkpointing`` / ``is_checkpointing`` switch and read transformers' gradient
checkpointing under either of its names: ``activation_checkpointing_enable(activation_checkpointing_kwargs=...)``,
``activation_checkpointing_disable()``, ``is_activation_checkpointing`` from transformers 5.23 on; the
``gradient_checkpointing_*`` names before (deprecated from 5.23, removed in v6).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .dora import DoRALinear
from .dtypes import DTYPE_NAMES, as_torch_dtype
from .layer import QLoRALinear
from .loftq import check_loftq_iters, loftq_layer
from .scratch import scratch_buffer

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
INITS = ("default", "loftq")


@dataclass
class QLoRAConfig:
    """The settings ``prepare_model`` resolved (saved with every adapter and checkpoint)."""

    backend: str = "numpy"  # "numpy" (CPU, the spec's arithmetic) | "cupy" (CUDA kernels)
    r: int = 64  # LoRA rank (QLoRA paper: 64)
    alpha: float = 16  # LoRA alpha (paper: 16); scaling = alpha / r, or alpha / sqrt(r) with rslora
    dropout: float = 0.05  # dropout on the LoRA input (paper: 0.1 up to 13B, 0.05 above)
    target: str | list = "all-linear"  # "all-linear", or module names (last component or full path)
    quant_type: str = "nf4"  # "nf4" | "fp4" | "int4" (bitsandbytes can load nf4/fp4 only)
    double_quant: bool = True  # quantize the absmax constants too (0.127 instead of 0.5 bit/param)
    blocksize: int = 64  # elements per absmax block
    rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)
    lora_dtype: str = "float32"  # dtype of A and B (and of their optimizer state)
    compute_dtype: str = "float32"  # activations and dequantized weights: float32 on CPU, bfloat16 on CUDA
    gradient_checkpointing: bool = True
    use_dora: bool = False  # DoRA (specs/dora.md): a trainable magnitude per output feature beside A and B
    init: str = "default"  # "default" (PEFT's: B = 0 on the plain 4-bit base) | "loftq" (specs/loftq.md)
    loftq_iters: int = 1  # LoftQ's T: rounds of quantize(W - s B A) + rank-r SVD (init="loftq" only)
    target_modules: list = field(default_factory=list)  # resolved: full paths of the replaced modules

    def to_dict(self) -> dict:
        return asdict(self)


# --- preparation ---------------------------------------------------------------------------------------------------


def _check_model(model) -> str:
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_model needs a torch.nn.Module (a Hugging Face causal LM), got {type(model).__name__}")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model type {model_type!r} ({type(model).__name__}) is not supported; prepare_model handles the LLaMA "
            f"family {SUPPORTED_MODEL_TYPES} (LLaMA, SmolLM, Mistral, Qwen2). Load one of those."
        )
    if getattr(model, "get_output_embeddings", None) is None or model.get_output_embeddings() is None:
        raise ValueError(f"{type(model).__name__} has no LM head (get_output_embeddings() is None): load *ForCausalLM")
    for name, module in model.named_modules():
        if isinstance(module, QLoRALinear):
            raise ValueError(f"the model is already prepared ({name} is a QLoRALinear); prepare a fresh model")
        if isinstance(module, nn.Linear) and type(module) is not nn.Linear:
            kind = f"{type(module).__module__}.{type(module).__name__}"
            raise TypeError(
                f"module {name} is a {kind}, not a plain torch.nn.Linear (an already-quantized or adapted model?); "
                "load the model in 16/32-bit without quantization_config or adapters"
            )
    return model_type


def _target_names(model, target) -> list[str]:
    """Full module paths of the linears to replace: every nn.Linear but the LM head, filtered by `target`."""
    head = model.get_output_embeddings()
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear and m is not head]
    if target == "all-linear":
        return linears
    if isinstance(target, str):
        target = [target]
    if not isinstance(target, (list, tuple)) or not all(isinstance(t, str) for t in target) or not target:
        raise ValueError(f"target must be 'all-linear' or a non-empty list of module names, got {target!r}")
    chosen = [n for n in linears if any(n == t or n.endswith("." + t) for t in target)]
    for t in target:
        if not any(n == t or n.endswith("." + t) for n in linears):
            short = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ValueError(f"target {t!r} matches no linear layer (the LM head is never targeted); names: {short}")
    return chosen


def _prequantized_names(model, states: dict, target, settings: tuple) -> list[str]:
    """Module paths of the linears that get a stored 4-bit state (module order), checked against the model."""
    if target != "all-linear" and set(_target_names(model, target)) != set(states):
        raise ValueError(
            f"target={target!r}: a 4-bit checkpoint's quantized linears all become QLoRA layers (their 16-bit weights "
            "are not stored) and no others; leave target='all-linear'"
        )
    names = [n for n, m in model.named_modules() if n in states]
    missing = sorted(set(states) - set(names))
    if missing:
        raise ValueError(f"4-bit states for modules this model does not have: {missing[:3]} ({len(missing)} in all)")
    for name in names:
        linear, q = model.get_submodule(name), states[name]
        if type(linear) is not nn.Linear or tuple(q.shape) != (linear.out_features, linear.in_features):
            raise ValueError(f"{name}: the 4-bit state has shape {tuple(q.shape)}, the model's module is {linear!r}")
        stored = (q.quant_type, q.double_quant, q.blocksize)
        if stored != settings:
            raise ValueError(
                f"{name} is stored as (quant_type, double_quant, blocksize) = {stored} but {settings} was asked for; "
                "a stored 4-bit state is used as it is"
            )
    return names


def replace_linears(model, names: list[str], make, *, desc: str | None = None) -> int:
    """Swap each named nn.Linear for ``make(name, linear)`` (a QLoRALinear), one at a time, so that the 16-bit
    original is dropped before the next is quantized; a tqdm bar when ``desc`` is given.  Returns the largest
    padded weight size (elements), what the shared dequantization scratch must hold."""
    iterator = names
    if desc is not None:
        from tqdm.auto import tqdm

        iterator = tqdm(names, desc=desc, unit="layer")
    largest = 0
    for name in iterator:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = make(name, getattr(parent, attr))
        setattr(parent, attr, new)  # the original is dropped here
        largest = max(largest, new.q.nblocks * new.q.blocksize)
    return largest


def prepare_model(
    model,
    backend="numpy",
    r: int = 64,
    alpha: float = 16,
    dropout: float = 0.05,
    target="all-linear",
    quant_type: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    rslora: bool = False,
    lora_dtype="float32",
    compute_dtype=None,
    gradient_checkpointing: bool = True,
    progress: bool = False,
    prequantized: dict | None = None,
    use_dora: bool = False,
    init: str = "default",
    loftq_iters: int = 1,
    fuse: bool | str = True,
):
    """Replace the target linears of a LLaMA-family causal LM with QLoRALinear, in place; returns the model.

    The model may sit on the CPU in any float dtype; each target weight is moved to the backend's device, quantized
    there and dropped before the next, then the remaining (small) modules are moved and cast to the compute dtype
    (float32 on CPU, bfloat16 on CUDA unless given).  All parameters but lora_A/lora_B are frozen.
    ``prequantized`` ({module path: Quantized4bit}, what ``read_bnb_checkpoint`` gives): those linears (their weights
    may be on the meta device) get these 4-bit states as they are, not re-quantized; they are the targets, and
    quant_type / double_quant / blocksize must be theirs.
    ``use_dora=True``: DoRALinear layers (a trainable magnitude per output feature, PEFT's DoRA; specs/dora.md).
    ``init="loftq"``: each layer's 4-bit base and A, B from ``loftq_iters`` LoftQ rounds on its 16-bit weight
    (specs/loftq.md) instead of plain quantization and B = 0; the adapter then belongs with that base (save it with
    ``save_bnb_checkpoint``).  Not with ``prequantized`` (LoftQ needs the 16-bit weights).
    ``fuse`` (cupy): the RMSNorms, SwiGLU activations, RoPE and a causal LM's loss run as own kernels
    (fuse.fuse_kernels: one launch each way instead of eager transformers' chains; the norm's, activation's and
    loss's math within a few units of the last place, not bit for bit); ``"exact"``: only RoPE, whose kernel gives
    transformers' values (the model's numerics stay transformers'); False: none.
    Raises ValueError/TypeError for an unsupported architecture, a module that is not a plain nn.Linear, or a target
    that matches nothing.
    """
    from backends import get_backend, placement

    _check_model(model)
    if not isinstance(use_dora, bool):
        raise ValueError(f"use_dora must be True or False, got {use_dora!r}")
    if not (isinstance(fuse, bool) or fuse == "exact"):
        raise ValueError(f"fuse must be True, False or 'exact', got {fuse!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    check_loftq_iters(loftq_iters)
    if init == "loftq" and prequantized is not None:
        raise ValueError(
            "init='loftq' needs the 16-bit weights, but this model's linears come from a stored 4-bit checkpoint; "
            "load the 16-bit model to initialise by LoftQ (or leave init='default' to keep the stored base)"
        )
    be = get_backend(backend) if isinstance(backend, str) else backend
    device = torch.device("cuda", torch.cuda.current_device()) if be.device == "cuda" else torch.device("cpu")
    default_compute = as_torch_dtype(placement(be)[1])  # float32 on the CPU, bfloat16 on CUDA
    cdt = as_torch_dtype(compute_dtype) if compute_dtype is not None else default_compute
    ldt = as_torch_dtype(lora_dtype)
    if prequantized is None:
        names = _target_names(model, target)
    else:
        names = _prequantized_names(model, prequantized, target, (quant_type, double_quant, blocksize))
    for p in model.parameters():
        p.requires_grad_(False)
    lora_kw = dict(r=r, alpha=alpha, dropout=dropout, rslora=rslora, lora_dtype=ldt, compute_dtype=cdt)

    cls = DoRALinear if use_dora else QLoRALinear
    qkw = dict(quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)

    def quantized(name, linear):
        if prequantized is not None:  # the stored 4-bit state, read as it is
            new = cls(be.to_device(prequantized[name]), bias=linear.bias, backend=be, **lora_kw)
        elif init == "loftq":  # LoftQ's base and adapter (LOFTQ-2), the DoRA magnitude after it (DORA-3)
            new = loftq_layer(linear, cls=cls, backend=be, iters=loftq_iters, **qkw, **lora_kw)
        else:
            new = cls.from_linear(linear, backend=be, **qkw, **lora_kw)
        new.train(linear.training)  # keep the model's train/eval mode
        return new

    desc = f"quantizing to {quant_type} ({be.name})" if progress else None
    largest = replace_linears(model, names, quantized, desc=desc)

    lora_params = {id(p) for m in model.modules() if isinstance(m, QLoRALinear) for p in m.parameters()}
    for module in model.modules():
        if isinstance(module, QLoRALinear):
            continue
        for p in module.parameters(recurse=False):
            if id(p) in lora_params:
                continue
            new_data = p.data.to(device, cdt if p.is_floating_point() else p.dtype)
            p.data = new_data  # keeps tied parameters tied (same Parameter object)
        for bname, b in module.named_buffers(recurse=False):
            if b is not None:
                module._buffers[bname] = b.to(device)  # rotary inv_freq etc.: moved, dtype kept
    if largest:  # allocate the shared scratch once, at its final size
        scratch_buffer(largest, device, cdt)
        if device.type == "cpu" and cdt != torch.float32:
            scratch_buffer(largest, device, torch.float32)

    if fuse and be.name == "cupy":
        from .fuse import fuse_kernels

        fuse_kernels(model, exact=fuse == "exact")
    model.config.use_cache = False
    if gradient_checkpointing:
        enable_checkpointing(model, use_reentrant=False)
    model.qlora_config = QLoRAConfig(
        backend=be.name,
        r=r,
        alpha=alpha,
        dropout=dropout,
        target=target if isinstance(target, str) else list(target),
        quant_type=quant_type,
        double_quant=double_quant,
        blocksize=blocksize,
        rslora=rslora,
        lora_dtype=DTYPE_NAMES[ldt],
        compute_dtype=DTYPE_NAMES[cdt],
        gradient_checkpointing=gradient_checkpointing,
        use_dora=use_dora,
        init=init,
        loftq_iters=loftq_iters,
        target_modules=names,
    )
    return model


def qlora_layers(model) -> dict[str, QLoRALinear]:
    """{full module path: QLoRALinear} of a prepared model, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QLoRALinear)}


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    """The adapter parameters (lora_A, lora_B of every QLoRALinear; lora_magnitude_vector too with DoRA), the only
    ones with requires_grad."""
    return [p for p in model.parameters() if p.requires_grad]


# --- gradient checkpointing, by either of transformers' names ----------------------------------------------------


def enable_checkpointing(model, **checkpoint_kwargs) -> None:
    """Recompute each decoder layer in backward; ``checkpoint_kwargs`` go to ``torch.utils.checkpoint.checkpoint``
    (e.g. ``use_reentrant=False``).  transformers >= 5.23: ``activation_checkpointing_enable``; older ones:
    ``gradient_checkpointing_enable``."""
    kwargs = checkpoint_kwargs or None  # None: transformers' own default ({"use_reentrant": False})
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def disable_checkpointing(model) -> None:
    """Keep every layer's activations again (``activation_checkpointing_disable``, or the older name)."""
    (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def is_checkpointing(model) -> bool:
    """Whether the model recomputes its layers in backward (False for a model that has no checkpointing)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        value = getattr(model, name, None)
        if value is not None:
            return bool(value)
    return False
