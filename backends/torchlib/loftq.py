"""LoftQ initialisation of QLoRA layers (specs/loftq.md; the spec is qlora_ref/loftq.py), on the backend's device.

    A, B = 0, 0
    for t = 1 .. T:
        q      = backend.quantize_4bit(T_W(W - s B A))      T_W: the weight's own dtype (float32 on CPU, bf16 on CUDA)
        R      = W - dequantize(q)                          float64
        U S Vh = svd(R)                                     torch.linalg.svd, float64, on the device
        B, A   = U_r sqrt(S_r / s),  sqrt(S_r / s) Vh_r     float32 (LOFTQ-2)

Two entry points: ``prepare_model(model, init="loftq", loftq_iters=T)`` runs it per layer while it quantizes (the
16-bit weight is at hand then), and ``loftq_initialize_(model, weights, iters=T)`` re-initialises an already
prepared model from the original weights (a {module path: tensor} dict or the model's safetensors directory), as
PEFT's ``replace_lora_weights_loftq`` does.  Both replace the layer's 4-bit base with LoftQ's (LOFTQ-3): the adapter
then belongs with that base, saved by ``save_bnb_checkpoint`` (LOFTQ-6).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from backends import get_backend, placement

from .layer import QLoRALinear


def check_loftq_iters(iters) -> int:
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"loftq_iters (LoftQ's T) must be a positive int, got {iters!r}")
    return iters


def loftq_state(weight: torch.Tensor, *, backend, r: int, scaling: float, iters: int = 1, quant_type="nf4",
                blocksize=64, double_quant=True):  # fmt: skip
    """(q, A float32[r, in], B float32[out, r]) of T = ``iters`` LoftQ rounds for a 16/32-bit weight (out, in).

    q is the backend's quantized state (on its device), quantized from the target rounded to the weight's dtype, as
    ``QLoRALinear.from_linear`` quantizes a weight; A and B are on the backend's device."""
    check_loftq_iters(iters)
    be = get_backend(backend) if isinstance(backend, str) else backend
    if weight.ndim != 2:
        raise ValueError(f"LoftQ needs a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(out_f, in_f):
        raise ValueError(f"LoftQ rank r must be an int in [1, min(out, in)] = [1, {min(out_f, in_f)}], got {r!r}")
    if not torch.isfinite(weight).all():
        raise ValueError("LoftQ needs finite weights; this one has NaN/Inf")
    device = torch.device(placement(be)[0])
    W = weight.detach().to(device)  # (out, in), the weight's dtype
    W64 = W.double()
    A = torch.zeros(r, in_f, dtype=torch.float32, device=device)  # (r, in)
    B = torch.zeros(out_f, r, dtype=torch.float32, device=device)  # (out, r)
    W_hat = torch.empty(out_f, in_f, dtype=torch.float32, device=device)  # one float32 buffer, reused
    for _ in range(iters):
        target = (W64 - scaling * (B.double() @ A.double())).to(W.dtype).contiguous()  # (out, in)
        q = be.quantize_4bit(target, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
        be.dequantize_4bit(q, dtype="float32", out=W_hat)
        U, S, Vh = torch.linalg.svd(W64 - W_hat.double(), full_matrices=False)  # (out, k), (k,), (k, in)
        root = torch.sqrt(S[:r] / scaling)  # (r,)
        B = (U[:, :r] * root).float()  # (out, r)
        A = (root[:, None] * Vh[:r]).float()  # (r, in)
    return q, A, B


def loftq_layer(linear: torch.nn.Linear, *, cls=QLoRALinear, backend, iters: int, quant_type: str, blocksize: int,
                double_quant: bool, **layer_kw) -> QLoRALinear:  # fmt: skip
    """A QLoRALinear (or DoRALinear: ``cls``) of ``linear`` whose 4-bit base and A, B come from LoftQ; a DoRA
    magnitude is initialised afterwards, from the LoftQ adapter (DORA-3)."""
    r, alpha = layer_kw.get("r", 64), float(layer_kw.get("alpha", 16))
    scaling = alpha / math.sqrt(r) if layer_kw.get("rslora", False) else alpha / r
    q, A, B = loftq_state(linear.weight, backend=backend, r=r, scaling=scaling, iters=iters, quant_type=quant_type,
                          blocksize=blocksize, double_quant=double_quant)  # fmt: skip
    layer = cls(q, bias=linear.bias, backend=backend, **layer_kw)
    _set_adapter(layer, A, B)
    return layer


def _set_adapter(layer, A, B) -> None:
    with torch.no_grad():
        layer.lora_A.copy_(A.to(layer.lora_A.dtype))
        layer.lora_B.copy_(B.to(layer.lora_B.dtype))
    if hasattr(layer, "reset_magnitude"):
        layer.reset_magnitude()


def _original_weights(weights, names: list[str]) -> dict:
    """{module path: weight} from a dict or a model directory's safetensors (``<path>.weight`` keys)."""
    if isinstance(weights, dict):
        return weights
    directory = Path(weights)
    if not directory.is_dir():
        raise ValueError(f"weights must be a {{module path: tensor}} dict or a model directory, got {weights!r}")
    from safetensors import safe_open

    from .load import _safetensors_files

    out = {}
    for f in _safetensors_files(directory):
        with safe_open(str(f), framework="pt") as st:
            for name in names:
                if f"{name}.weight" in st.keys():
                    out[name] = st.get_tensor(f"{name}.weight")
    return out


def loftq_initialize_(model, weights, *, iters: int = 1):
    """Re-initialise every QLoRA layer of a prepared model by LoftQ from its original weights, in place.

    ``weights``: {module path: (out, in) tensor} or the Hugging Face directory the model was loaded from (its
    safetensors hold ``<module path>.weight``).  Each layer is rebuilt with the same settings on LoftQ's 4-bit base
    (its A, B from LoftQ; a DoRA magnitude re-initialised), so call this before making the optimizer.  Returns the
    model; ``model.qlora_config`` records init="loftq" and the iterations.  ValueError if a layer's weight is missing
    or has the wrong shape.
    """
    from .prepare import qlora_layers, replace_linears

    check_loftq_iters(iters)
    layers = qlora_layers(model)
    if not layers:
        raise ValueError("the model has no QLoRALinear layers: call backends.torchlib.prepare_model(model) first")
    originals = _original_weights(weights, list(layers))
    missing = [n for n in layers if n not in originals]
    if missing:
        raise ValueError(f"no original weight for {len(missing)} QLoRA layer(s), e.g. {missing[:3]}; LoftQ needs them")

    def rebuilt(name, old):
        W = originals[name]
        if tuple(W.shape) != (old.out_features, old.in_features):
            raise ValueError(f"{name}: original weight has shape {tuple(W.shape)}, the layer is {tuple(old.q.shape)}")
        kw = dict(r=old.r, alpha=old.alpha, dropout=old.dropout, rslora=old.rslora, lora_dtype=old.lora_A.dtype,
                  compute_dtype=old.compute_dtype)  # fmt: skip
        if hasattr(old, "block_rows"):
            kw["block_rows"] = old.block_rows
        q, A, B = loftq_state(W, backend=old.backend, r=old.r, scaling=old.scaling, iters=iters,
                              quant_type=old.q.quant_type, blocksize=old.q.blocksize,
                              double_quant=old.q.double_quant)  # fmt: skip
        new = type(old)(q, bias=old.bias, backend=old.backend, **kw)
        _set_adapter(new, A, B)
        new.train(old.training)
        return new

    replace_linears(model, list(layers), lambda name, old: rebuilt(name, old))
    cfg = getattr(model, "qlora_config", None)
    if cfg is not None:
        cfg.init, cfg.loftq_iters = "loftq", iters
    return model
