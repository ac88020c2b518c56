"""``qlora memory``: will it fit?  The memory ledger (qlora_ref/memory.py, backends/torchlib/ledger.py) of a preset
or of the shape an HF config.json describes, by component, per GPU with --nproc; arithmetic only, no device."""

from __future__ import annotations

import json
from pathlib import Path

from .command_configs import MEMORY_MODELS, MEMORY_PRESETS_EXTRA, MemoryConfig
from .config import UsageError
from .data import DataError


def memory_shape(model: str):
    """A ledger preset by name, or the shape an HF config.json (or the model dir holding it) describes."""
    from qlora_ref import memory

    if model in memory.PRESETS:
        return memory.PRESETS[model]
    if model in MEMORY_PRESETS_EXTRA:
        return memory.ModelShape(model, **MEMORY_PRESETS_EXTRA[model])
    p = Path(model)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise UsageError(f"--model {model!r} is neither a preset ({', '.join(MEMORY_MODELS)}) nor an HF config.json")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{p}:{e.lineno}: malformed JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise DataError(f"{p}: not UTF-8 text; expected an HF config.json") from None
    return memory.shape_from_dict(d)


def cmd_memory(c: MemoryConfig) -> int:
    from backends.torchlib.ledger import CUDA_OVERHEAD_BYTES, Runtime, estimate, per_rank_estimate
    from qlora_ref import memory

    shape = memory_shape(c.model)
    recipe = memory.Recipe(
        seq_len=c.seq_len, batch=c.batch, r=c.r, checkpointing=c.checkpointing, double_quant=c.double_quant,
        blocksize=c.blocksize, optimizer=c.optimizer, compute_dtype=c.compute_dtype, lora_dtype=c.lora_dtype,
        lora_dropout=c.lora_dropout, use_dora=c.use_dora,
    )  # fmt: skip
    overhead = CUDA_OVERHEAD_BYTES if c.overhead_gb is None else int(c.overhead_gb * memory.GB)
    runtime = Runtime(layer=c.layer, step_in_backward=c.step_in_backward, offload_checkpoints=c.offload_checkpoints,
                      embeddings_on_host=c.embeddings_on_host, overhead_bytes=overhead)  # fmt: skip
    if c.use_dora and c.layer == "peft":
        raise UsageError("--use-dora counts DoRALinear's tensors (MEM-15, MEM-16); PEFT's DoRA layer is not modelled: "
                         "drop --layer peft")  # fmt: skip
    if c.shard and c.nproc == 1:
        raise UsageError("--shard splits the model over --nproc N GPUs; give N >= 2")
    if c.nproc > 1 and c.step_in_backward:
        raise UsageError("--step-in-backward steps before DDP averages the gradients (refused by wrap_ddp); drop one")
    per_rank = c.nproc > 1
    ledger = per_rank_estimate(shape, recipe, runtime, world=c.nproc, shard=c.shard) if per_rank else \
        estimate(shape, recipe, runtime)  # fmt: skip
    lines = [f"{shape.name}: {shape.n_params / 1e9:.2f}B parameters, {shape.n_lora(c.r) / 1e6:.1f}M LoRA parameters"]
    if c.use_dora:
        lines[0] += f" + {memory.dora_magnitude_count(shape) / 1e6:.2f}M DoRA magnitudes"
    if per_rank:
        how = "FSDP2 sharding (on paper, DIST-7)" if c.shard else "DDP, every GPU a replica (DIST-7)"
        lines.append(f"per GPU of {c.nproc}, {how}, batch {c.batch} per GPU ({c.batch * c.nproc} in all):")
    lines.append(ledger.table())
    if c.gpu_gb is not None:
        fits, fits_paged = ledger.fits(c.gpu_gb), ledger.fits(c.gpu_gb, allow_paging=True)
        verdict = "yes" if fits else ("only with paging (optimizer states evicted to host)" if fits_paged else "no")
        where = f"{c.gpu_gb:g} GB" + (" per GPU" if per_rank else "")
        lines.append(f"fits in {where}: {verdict} (needs {ledger.total / memory.GB:.2f} GB, "
                     f"{ledger.resident / memory.GB:.2f} GB resident with paging)")  # fmt: skip
    print("\n".join(lines))  # all computed first: an error prints nothing
    return 0
