"""Writing a prepared QLoRA model in the ecosystem's formats (specs/formats.md); every file is written atomically.

1. PEFT adapter          adapter_config.json + adapter_model.safetensors, keys
                         ``base_model.model.<module path>.lora_A.weight`` (r, in) / ``.lora_B.weight`` (out, r),
                         and with DoRA ``.lora_magnitude_vector`` (out,) and ``use_dora: true`` (DORA-3)
                         -> ``peft.PeftModel.from_pretrained(base, dir)`` loads it.
2. bitsandbytes 4-bit    model.safetensors with ``Quantized4bit.to_bnb_state_dict`` entries per linear (FMT-1..FMT-4)
                         and 16-bit tensors for the rest; config.json with transformers' ``quantization_config``
                         -> ``AutoModelForCausalLM.from_pretrained(dir)`` with bitsandbytes installed loads it.
                         This is the frozen base only: the LoRA weights go in the PEFT adapter beside it.
3. merged 16-bit         W = T(W_hat + s * (B A)), W_hat = dequantize_4bit(q) in float32, the sum in float64,
                         one rounding T to the export dtype (not re-quantized): model.safetensors + config.json.

Atomic (files.py): each file is written to a temporary file in the target directory and moved into place with
``os.replace``; config.json is written last, so a directory with a config.json is complete.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import qlora_ref

from .dora import DoRALinear
from .dtypes import as_torch_dtype
from .files import write_json, write_safetensors
from .layer import QLoRALinear
from .prepare import QLoRAConfig, qlora_layers

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
QLORA_CONFIG = "qlora_config.json"
PEFT_PREFIX = "base_model.model."


# --- helpers -------------------------------------------------------------------------------------------------------


def _layers_or_raise(model) -> dict[str, QLoRALinear]:
    layers = qlora_layers(model)
    if not layers:
        raise ValueError("the model has no QLoRALinear layers: call backends.torchlib.prepare_model(model) first")
    return layers


def _common(layers: dict[str, QLoRALinear], attrs: tuple[str, ...]) -> dict:
    """The value of each attribute shared by every layer; ValueError if the layers disagree."""
    out = {}
    for a in attrs:
        values = {getattr(m, a) for m in layers.values()}
        if len(values) != 1:
            raise ValueError(f"the QLoRA layers disagree on {a} ({sorted(map(str, values))}); one value is needed")
        out[a] = values.pop()
    return out


def _config_dict(model) -> dict:
    cfg = json.loads(model.config.to_json_string(use_diff=False))
    cfg.pop("quantization_config", None)
    cfg["use_cache"] = True
    return cfg


def _set_dtype(cfg: dict, dtype: str) -> None:
    keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype"]
    for k in keys:
        cfg[k] = dtype


def _other_tensors(model, layers: dict[str, QLoRALinear], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """state_dict entries outside the QLoRA layers, floating ones cast to dtype; tied tensors written once."""
    prefixes = tuple(f"{n}." for n in layers)
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        if k.startswith(prefixes):
            continue
        key = (v.device, v.data_ptr(), tuple(v.shape))
        if v.numel() and key in seen:  # e.g. lm_head.weight tied to model.embed_tokens.weight
            continue
        seen.add(key)
        out[k] = v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype)
    return out


def _numpy_q(q):
    """A copy of q with numpy arrays (CuPy arrays are copied to the host)."""

    def host(a):
        if a is None or isinstance(a, np.ndarray):
            return a
        return a.get() if hasattr(a, "get") else np.asarray(a)

    if isinstance(q.packed, np.ndarray):
        return q
    return qlora_ref.Quantized4bit(
        packed=host(q.packed),
        shape=q.shape,
        dtype=q.dtype,
        quant_type=q.quant_type,
        blocksize=q.blocksize,
        absmax=host(q.absmax),
        absmax_q=host(q.absmax_q),
        nested_absmax=host(q.nested_absmax),
        offset=None if q.offset is None else np.float32(float(q.offset)),
    )


# --- 1. PEFT adapter -----------------------------------------------------------------------------------------------


MAGNITUDE = "lora_magnitude_vector"  # PEFT's DoRA key, written without ".weight" (DORA-3)


def _uses_dora(layers: dict[str, QLoRALinear]) -> bool:
    """True if every layer is a DoRA layer, False if none is; ValueError for a mix (PEFT's use_dora is one flag)."""
    kinds = {isinstance(m, DoRALinear) for m in layers.values()}
    if len(kinds) != 1:
        raise ValueError("some QLoRA layers are DoRA layers and some are not; an adapter has one use_dora setting")
    return kinds.pop()


def peft_state_dict(model) -> dict[str, torch.Tensor]:
    """{``base_model.model.<path>.lora_A.weight``: A (r, in), ``...lora_B.weight``: B (out, r)} in the LoRA dtype,
    plus ``...lora_magnitude_vector``: m (out,) for DoRA layers."""
    out = {}
    for name, m in _layers_or_raise(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = _whole(m.lora_A).cpu()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = _whole(m.lora_B).cpu()
        if isinstance(m, DoRALinear):
            out[f"{PEFT_PREFIX}{name}.{MAGNITUDE}"] = _whole(m.lora_magnitude_vector).cpu()
    return out


def _whole(p: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value: an FSDP2-sharded one (a DTensor) all-gathered, a collective every rank calls."""
    p = p.detach()
    return p.full_tensor() if _is_dtensor(p) else p


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without distributed
        return False
    return isinstance(t, DTensor)


def peft_adapter_config(model, base_model_name_or_path=None) -> dict:
    """The adapter_config.json PEFT writes for a LoRA on these modules (peft's LoraConfig fields; the rest default)."""
    layers = _layers_or_raise(model)
    c = _common(layers, ("r", "alpha", "dropout", "rslora"))
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model.config, "_name_or_path", None) or None
    return {
        "alpha_pattern": {},
        "base_model_name_or_path": None if base_model_name_or_path is None else str(base_model_name_or_path),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": c["alpha"],
        "lora_bias": False,
        "lora_dropout": c["dropout"],
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": c["r"],
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(layers),
        "task_type": "CAUSAL_LM",
        "use_dora": _uses_dora(layers),
        "use_rslora": c["rslora"],
    }


def save_peft_adapter(model, out_dir, base_model_name_or_path=None, *, state_dict=None) -> Path:
    """Write adapter_model.safetensors + adapter_config.json (+ qlora_config.json, our settings) to out_dir.
    ``state_dict``: the model's ``peft_state_dict``, when the caller gathered it already (sharded LoRA)."""
    out = Path(out_dir)
    config = peft_adapter_config(model, base_model_name_or_path)
    sd = peft_state_dict(model) if state_dict is None else state_dict
    write_safetensors(out / ADAPTER_WEIGHTS, sd, {"format": "pt"})
    qc = getattr(model, "qlora_config", None)
    if isinstance(qc, QLoRAConfig):
        write_json(out / QLORA_CONFIG, qc.to_dict())
    write_json(out / ADAPTER_CONFIG, config)
    return out


def read_adapter_config(adapter_dir) -> dict:
    """adapter_config.json as a dict, checked to be a LoRA adapter; ValueError with the reason otherwise."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise ValueError(f"{path} does not exist: {adapter_dir} is not a PEFT adapter directory")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters are supported")
    for key in ("r", "lora_alpha"):
        if key not in cfg:
            raise ValueError(f"{path} has no {key!r}")
    if cfg.get("lora_bias") or cfg.get("bias", "none") != "none":
        raise ValueError(f"{path}: LoRA bias / trained biases are not supported by QLoRALinear")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"{path}: per-module rank_pattern / alpha_pattern are not supported")
    return cfg


def adapter_prepare_kwargs(adapter_dir) -> dict:
    """prepare_model keyword arguments that rebuild the layers an adapter was trained on (r, alpha, dropout, ...)."""
    cfg = read_adapter_config(adapter_dir)
    kw = {"r": int(cfg["r"]), "alpha": cfg["lora_alpha"], "dropout": float(cfg.get("lora_dropout", 0.0))}
    kw["rslora"] = bool(cfg.get("use_rslora", False))
    if cfg.get("use_dora"):
        kw["use_dora"] = True
    target = cfg.get("target_modules")
    if target and target != "all-linear":
        kw["target"] = [target] if isinstance(target, str) else list(target)
    qpath = Path(adapter_dir) / QLORA_CONFIG
    if qpath.is_file():
        q = json.loads(qpath.read_text(encoding="utf-8"))
        kw.update({k: q[k] for k in ("quant_type", "double_quant", "blocksize", "lora_dtype") if k in q})
    return kw


def load_peft_adapter(model, adapter_dir):
    """Copy a PEFT LoRA adapter's A/B into a prepared model (in place); returns the model.

    The adapter must match: same r, alpha and rsLoRA on every layer, DoRA layers for a DoRA adapter (use_dora) and
    plain ones otherwise, the same set of target modules, the same shapes.  Any mismatch is a ValueError that names it.
    """
    from safetensors.torch import load_file

    layers = _layers_or_raise(model)
    cfg = read_adapter_config(adapter_dir)
    for name, m in layers.items():
        if m.r != cfg["r"] or m.alpha != float(cfg["lora_alpha"]) or m.rslora != bool(cfg.get("use_rslora", False)):
            raise ValueError(
                f"adapter {adapter_dir} has r={cfg['r']}, lora_alpha={cfg['lora_alpha']}, "
                f"use_rslora={cfg.get('use_rslora', False)} but layer {name} has r={m.r}, alpha={m.alpha:g}, "
                f"rslora={m.rslora}; prepare the model with adapter_prepare_kwargs(adapter_dir)"
            )
    if bool(cfg.get("use_dora", False)) != _uses_dora(layers):
        raise ValueError(
            f"adapter {adapter_dir} has use_dora={bool(cfg.get('use_dora', False))} but the model's layers are "
            f"{'DoRA' if _uses_dora(layers) else 'plain LoRA'} layers; prepare the model with "
            "adapter_prepare_kwargs(adapter_dir)"
        )
    wpath = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not wpath.is_file():
        raise ValueError(f"{wpath} does not exist (only safetensors adapters are read)")
    sd = load_file(str(wpath))
    renames = {".lora_A.default.weight": ".lora_A.weight", ".lora_B.default.weight": ".lora_B.weight",
               f".{MAGNITUDE}.default.weight": f".{MAGNITUDE}", f".{MAGNITUDE}.weight": f".{MAGNITUDE}"}  # fmt: skip
    for old, new in renames.items():
        sd = {(k[: -len(old)] + new if k.endswith(old) else k): v for k, v in sd.items()}
    expected = peft_state_dict(model)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"adapter {adapter_dir} does not match this model: {len(missing)} missing key(s) {missing[:3]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:3]}"
        )
    with torch.no_grad():
        for name, m in layers.items():
            parts = [("lora_A.weight", m.lora_A), ("lora_B.weight", m.lora_B)]
            if isinstance(m, DoRALinear):
                parts.append((MAGNITUDE, m.lora_magnitude_vector))
            for part, p in parts:
                t = sd[f"{PEFT_PREFIX}{name}.{part}"]
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"{name}.{part}: adapter has shape {tuple(t.shape)}, the model {tuple(p.shape)}")
                t = t.to(p.device, p.dtype)
                if _is_dtensor(p):  # FSDP2-sharded: each rank keeps its rows (a collective every rank calls)
                    from torch.distributed.tensor import distribute_tensor

                    t = distribute_tensor(t, p.device_mesh, p.placements)
                p.copy_(t)
    return model


# --- 2. bitsandbytes / transformers 4-bit checkpoint ---------------------------------------------------------------


def bnb_quantization_config(model, compute_dtype: str = "bfloat16") -> dict:
    """transformers' ``BitsAndBytesConfig(load_in_4bit=True, ...).to_dict()`` for this model's quantized layers.

    ``llm_int8_skip_modules`` lists the linears that stay unquantized (the LM head, untargeted layers) so that
    transformers converts exactly the layers stored in 4 bits.
    """
    layers = _layers_or_raise(model)
    quant_types = {m.q.quant_type for m in layers.values()}
    double = {m.q.double_quant for m in layers.values()}
    if len(quant_types) != 1 or len(double) != 1:
        raise ValueError(f"layers mix quant types {quant_types} / double_quant {double}; bitsandbytes needs one")
    quant_type = quant_types.pop()
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"bitsandbytes has no {quant_type!r} type; only nf4 and fp4 checkpoints can be written")
    as_torch_dtype(compute_dtype)
    skip = sorted(n for n, m in model.named_modules() if type(m) is torch.nn.Linear)
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double.pop(),
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip or None,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


def bnb_state_dict(model, dtype="bfloat16") -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: bitsandbytes entries for each QLoRA layer's weight, `dtype` for everything else."""
    dt = as_torch_dtype(dtype)
    layers = _layers_or_raise(model)
    out = _other_tensors(model, layers, dt)
    for name, m in layers.items():
        for k, v in _numpy_q(m.q).to_bnb_state_dict(prefix=f"{name}.weight").items():
            out[k] = torch.from_numpy(np.ascontiguousarray(v).copy())
        if m.bias is not None:
            out[f"{name}.bias"] = m.bias.detach().to("cpu", dt)
    return out


def save_bnb_checkpoint(model, out_dir, dtype="bfloat16", compute_dtype="bfloat16") -> Path:
    """Write model.safetensors + config.json (with quantization_config) that transformers + bitsandbytes load.

    The 4-bit base only (the LoRA adapter is saved with ``save_peft_adapter``); non-quantized tensors in ``dtype``.
    """
    out = Path(out_dir)
    qconfig = bnb_quantization_config(model, compute_dtype)
    tensors = bnb_state_dict(model, dtype)
    cfg = _config_dict(model)
    _set_dtype(cfg, str(dtype) if isinstance(dtype, str) else str(dtype).removeprefix("torch."))
    cfg["quantization_config"] = qconfig
    write_safetensors(out / "model.safetensors", tensors, {"format": "pt"})
    write_json(out / "config.json", cfg)
    return out


# --- 3. exact merged 16-bit export -----------------------------------------------------------------------------------


def merged_state_dict(model, dtype="bfloat16") -> dict[str, torch.Tensor]:
    """{<path>.weight: T(W_hat + s * B A)} for every QLoRA layer (float64 sum, one rounding), the rest in `dtype`."""
    dt = as_torch_dtype(dtype)
    layers = _layers_or_raise(model)
    out = _other_tensors(model, layers, dt)
    for name, m in layers.items():
        out[f"{name}.weight"] = m.merged_weight(dt).cpu()
        if m.bias is not None:
            out[f"{name}.bias"] = m.bias.detach().to("cpu", dt)
    return out


def merge_and_export(model, out_dir, dtype="bfloat16") -> Path:
    """Write the merged model (dequantized base + LoRA, not re-quantized) as model.safetensors + config.json."""
    out = Path(out_dir)
    tensors = merged_state_dict(model, dtype)
    cfg = _config_dict(model)
    _set_dtype(cfg, dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch."))
    write_safetensors(out / "model.safetensors", tensors, {"format": "pt"})
    write_json(out / "config.json", cfg)
    return out
