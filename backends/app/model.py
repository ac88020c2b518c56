"""The model a command runs: a name resolved to a path, loaded and prepared for QLoRA with a ModelConfig's settings,
optionally with a trained adapter copied in."""

from __future__ import annotations

import contextlib
import io
import os

from .config import ModelConfig, UsageError


def resolve_model_path(model: str) -> str:
    """'smollm2' -> the cached GGUF (downloaded on first use); a path -> itself, if it exists."""
    if model in ("smollm2", "smollm2-135m"):
        from .hub import smollm2_gguf_path

        return str(smollm2_gguf_path())
    if not os.path.exists(model):
        raise UsageError(f"model not found: {model!r}; pass a model directory, a .gguf file, or 'smollm2'")
    return model


def compute_dtype_of(m: ModelConfig) -> str | None:
    return None if m.compute_dtype == "auto" else m.compute_dtype


def checkpointing_of(m: ModelConfig) -> bool:
    """--gradient-checkpointing: 'on' / 'off', or 'auto' = on at load exactly when the base is on the GPU (--backend
    cupy), where ``settle_checkpointing`` then decides from the memory ledger.  (A config.json written before the
    flag took 'auto' holds a bool, which means what it says.)"""
    v = m.gradient_checkpointing
    return v if isinstance(v, bool) else {"on": True, "off": False}.get(v, m.backend == "cupy")


# 'auto' on the GPU stores every layer's activations when they take at most this share of the free device memory;
# the rest is left for the step's transients (the LM head's logit chunks, attention, the dequantized weight).
STORED_ACTIVATIONS_SHARE = 0.5


def recomputes(model) -> bool:
    """Whether the model recomputes its layers in backward (transformers 5.23 renamed gradient to activation
    checkpointing and deprecated the old name: `backends.torchlib.prepare.is_checkpointing` reads either)."""
    from backends.torchlib.prepare import is_checkpointing

    return is_checkpointing(model)


def settle_checkpointing(model, m: ModelConfig, *, batch: int, seq_len: int, free_bytes: int) -> str | None:
    """--gradient-checkpointing auto on the GPU: turn the recompute off when the memory ledger (MEM-8, our layer's
    terms: backends/torchlib/ledger.py) says that storing a micro-batch's activations (``batch`` sequences of
    ``seq_len`` tokens, the longest the run has) takes at most STORED_ACTIVATIONS_SHARE of ``free_bytes``.
    Recomputing is a third of a step's kernels; storing changes no value (the dropout masks come from seeds,
    LORA-8).  Returns the line that says what was decided; None when there was nothing to decide."""
    if m.gradient_checkpointing != "auto" or not recomputes(model):
        return None
    from backends.torchlib.ledger import Runtime, activation_bytes
    from qlora_ref import memory

    q = model.qlora_config
    shape = memory.shape_from_dict(model.config.to_dict())
    recipe = memory.Recipe(seq_len=seq_len, batch=batch, r=q.r, checkpointing=False, double_quant=q.double_quant,
                           blocksize=q.blocksize, compute_dtype=q.compute_dtype, lora_dtype=q.lora_dtype,
                           lora_dropout=q.dropout, use_dora=q.use_dora)  # fmt: skip
    need = activation_bytes(shape, recipe, Runtime())
    gb = f"{need / memory.GB:.2f} GB stored activations ({batch} x {seq_len} tokens)"
    gb += f" of {free_bytes / memory.GB:.1f} GB free"
    if need > STORED_ACTIVATIONS_SHARE * free_bytes:
        return f"gradient checkpointing on: {gb}"
    from backends.torchlib.prepare import disable_checkpointing

    disable_checkpointing(model)
    q.gradient_checkpointing = False
    return f"gradient checkpointing off: {gb}"


def load_prepared(m: ModelConfig, path: str, **overrides):
    """load_model with the ModelConfig's QLoRA settings (``overrides`` win, e.g. an adapter's own r/alpha)."""
    from backends.torchlib.load import load_model

    kw = dict(
        r=m.r,
        alpha=m.alpha,
        dropout=m.dropout,
        target=m.target if m.target == "all-linear" else [t.strip() for t in m.target.split(",") if t.strip()],
        quant_type=m.quant_type,
        double_quant=m.double_quant,
        blocksize=m.blocksize,
        rslora=m.rslora,
        gradient_checkpointing=checkpointing_of(m),
        compute_dtype=compute_dtype_of(m),
        lora_dtype=m.lora_dtype,
        use_dora=m.use_dora,
        init=m.init,
        loftq_iters=m.loftq_iters,
        fuse=True if m.fuse else "exact",  # off: only the kernels that keep transformers' values (RoPE)
    )
    kw.update(overrides)
    with contextlib.redirect_stderr(io.StringIO()):  # transformers' GGUF reader draws its own tqdm bar on stderr
        return load_model(path, backend=m.backend, **kw)


def loftq_base_of(adapter: str) -> str | None:
    """The 4-bit base a LoftQ-initialised adapter belongs with (its adapter_config's base), None for any other adapter.

    LoftQ changes the quantized base as well as A and B (specs/loftq.md), so the adapter computes the trained model
    only on the base its run wrote; re-quantizing the 16-bit model would give plain NF4's base instead."""
    import json

    from backends.torchlib.export import QLORA_CONFIG, read_adapter_config

    qpath = os.path.join(adapter, QLORA_CONFIG)
    if not os.path.isfile(qpath):
        return None
    with open(qpath, encoding="utf-8") as f:
        if json.load(f).get("init") != "loftq":
            return None
    base = read_adapter_config(adapter).get("base_model_name_or_path")
    if not base or not os.path.isdir(base):
        raise UsageError(
            f"adapter {adapter!r} was initialised by LoftQ and belongs with the 4-bit base it names ({base!r}), which "
            "is not there; keep the run directory's base-4bit/ beside its adapter/"
        )
    return base


def load_with_adapter(m: ModelConfig, model_path: str, adapter: str | None):
    """(model, tokenizer) — the base prepared with the adapter's own settings and its weights copied in; a LoftQ
    adapter brings its own 4-bit base (``loftq_base_of``), which replaces ``model_path``."""
    from backends.torchlib.export import adapter_prepare_kwargs, load_peft_adapter
    from backends.torchlib.load import load_tokenizer

    overrides = {}
    if adapter:
        if not os.path.isdir(adapter):
            raise UsageError(f"adapter directory not found: {adapter!r}")
        overrides = adapter_prepare_kwargs(adapter)
        overrides.setdefault("dropout", 0.0)
        model_path = loftq_base_of(adapter) or model_path
    tokenizer = load_tokenizer(model_path)
    model = load_prepared(m, model_path, **overrides)
    if adapter:
        load_peft_adapter(model, adapter)
    model.eval()
    return model, tokenizer
