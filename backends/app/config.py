"""finetune's configuration (the other commands' are in command_configs.py): one ``@dataclass`` per concern, commented
defaults, flags generated from the fields, and one set of validators that every command runs.

The finetune defaults are the QLoRA paper's Guanaco recipe (Dettmers et al., 2023, Appendix B and ``qlora.py``):

    r 64, alpha 16, dropout 0.05, LoRA on every linear layer but the LM head, NF4 + double quantization, blocksize 64,
    lr 2e-4 constant, max grad norm 0.3, effective batch 16 by gradient accumulation, paged AdamW (32-bit states),
    weight decay 0, betas (0.9, 0.999), loss on the response only, group-by-length batching,
    bf16 compute on the GPU / fp32 on the CPU.

Every field becomes one flag: ``lr`` -> ``--lr``, ``group_by_length`` -> ``--group-by-length / --no-group-by-length``,
a field with ``choices`` offers exactly those, a ``list[str]`` field is a repeatable flag, and a field without a
default is a positional argument.  ``validate`` checks every field by its name with the same rule in every command
(``--batch-size 0`` is refused alike by finetune and eval).  The resolved finetune configuration (after flags and
``"auto"`` values are settled) is written as ``config.json`` beside every run's outputs, so a run can be repeated
from its own directory.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass, field

from backends import BACKENDS
from qlora_ref.checks import BLOCKSIZES


class UsageError(ValueError):
    """A bad command line (reported as one line, exit 2)."""


def opt(default, help: str, *, choices: tuple | None = None):
    """A dataclass field whose default, help text and allowed values travel together (``--help`` shows them)."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def required(help: str, *, flag: bool = False):
    """A field without a default: a positional argument, or with ``flag`` (and for a ``list[str]``: a repeatable one)
    a flag that must be given."""
    return field(metadata={"help": help, "choices": None, "flag": flag})


MMLU_SPLITS = ("dev", "val", "test")

# --- finetune ------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    model: str = opt("smollm2", "HF model dir, a .gguf file, or 'smollm2' (SmolLM2-135M-Instruct GGUF from PyPI)")
    backend: str = opt("numpy", "dequantization backend: 'numpy' (CPU reference) or 'cupy' (GPU)", choices=BACKENDS)
    quant_type: str = opt("nf4", "4-bit data type of the frozen base", choices=("nf4", "fp4", "int4"))
    double_quant: bool = opt(True, "quantize the absmax constants again to 8 bits (paper section 3)")
    blocksize: int = opt(64, "4-bit quantization block size")
    r: int = opt(64, "LoRA rank (Guanaco: 64)")
    alpha: float = opt(16.0, "LoRA alpha; scale s = alpha / r (Guanaco: 16)")
    dropout: float | None = opt(0.05, "LoRA dropout (--recipe guanaco: 0.1 up to 13B parameters, 0.05 above)")
    target: str = opt("all-linear", "which linear layers get LoRA: 'all-linear' or comma-separated module names")
    rslora: bool = opt(False, "rank-stabilised LoRA: s = alpha / sqrt(r)")
    gradient_checkpointing: str = opt(
        "auto",
        "recompute each decoder layer in backward instead of storing it: 'auto' = off on the CPU (a quarter less "
        "compute; a CPU's memory holds a small model's activations), and with --backend cupy off exactly when the "
        "memory ledger puts a micro-batch's stored activations under half the GPU's free memory, else on",
        choices=("auto", "on", "off"),
    )
    compute_dtype: str = opt(
        "auto", "'auto' = bfloat16 on the GPU, float32 on the CPU", choices=("auto", "float32", "bfloat16")
    )
    lora_dtype: str = opt(
        "float32",
        "dtype of LoRA's A and B (their gradients too); bfloat16 = the Guanaco scripts' --bf16 (fewer casts and "
        "kernels on the GPU; each AdamW update is rounded to bf16)",
        choices=("float32", "bfloat16"),
    )
    use_dora: bool = opt(False, "DoRA: a trainable magnitude per output feature beside A and B (specs/dora.md)")
    init: str = opt(
        "default",
        "'default' = plain 4-bit base and B = 0 (PEFT's); 'loftq' = base and A, B by LoftQ (specs/loftq.md), the run "
        "then writes its 4-bit base beside the adapter",
        choices=("default", "loftq"),
    )
    loftq_iters: int = opt(1, "LoftQ rounds T of quantize(W - s B A) + rank-r SVD (with --init loftq)")
    fuse: bool = opt(
        False,
        "--backend cupy: RMSNorm and SwiGLU as own kernels (fewer launches: H200 main job 46.8 vs 55.9 ms/step; "
        "transformers' math within a few units of the last place, not bit for bit: that one run's trajectory moved, "
        "held-out exact match 68.8%% -> 60.9%%); off by default, so the command keeps transformers' numerics (RoPE "
        "runs as one kernel either way: it gives transformers' values)",
    )


@dataclass
class DataConfig:
    data: str = opt("task", "'task' (the generated list-reversal task) or a .json (Alpaca) / .jsonl file")
    format: str = opt("auto", "auto: from the file's fields", choices=("auto", "alpaca", "oasst", "prompt-completion"))
    eval_data: str = opt("", "held-out file of the same kind; '' = split eval_fraction off the training data")
    eval_fraction: float = opt(0.05, "fraction held out for eval loss when no eval_data is given")
    max_len: int = opt(512, "longest example in tokens (prompt + response); longer: cut, or skipped (--drop-long)")
    source_max_len: int = opt(256, "prompt tokens kept, the first ones (QLoRA's source_max_len)")
    target_max_len: int = opt(256, "response tokens kept, end token included (QLoRA's target_max_len)")
    drop_long: bool = opt(False, "skip an example longer than a limit instead of cutting it")
    group_by_length: bool = opt(True, "batch examples of similar length together (Guanaco: on)")
    pad_to_multiple_of: int = opt(
        1, "pad each training micro-batch to a multiple of this many tokens (few static shapes for capture/compile)"
    )
    train_on_source: bool = opt(False, "also put the loss on the prompt (Guanaco: off; loss on the response only)")
    assistant_turns: bool = opt(
        False, "OASST conversations: the loss on every assistant turn, the earlier ones in the prompt too (guanaco: on)"
    )
    task_train: int = opt(2000, "generated task: number of training examples")
    task_eval: int = opt(64, "generated task: number of held-out examples (exact-match scored)")
    max_examples: int = opt(0, "use only the first N training examples (0 = all)")


@dataclass
class TrainConfig:
    output_dir: str = opt("runs/qlora", "where adapter, checkpoints, config.json, metrics and loss curve go")
    lr: float = opt(2e-4, "learning rate, constant schedule (Guanaco: 2e-4)")
    max_grad_norm: float = opt(0.3, "clip the global gradient norm to this (Guanaco: 0.3)")
    batch_size: int = opt(4, "micro-batch size (examples per forward/backward)")
    grad_accum: int = opt(4, "micro-batches per optimizer step; effective batch = batch_size * grad_accum (16)")
    max_steps: int = opt(100, "optimizer steps to run")
    weight_decay: float = opt(0.0, "decoupled weight decay (Guanaco: 0)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.999, "AdamW beta2")
    eps: float = opt(1e-8, "AdamW epsilon")
    optim_bits: int = opt(32, "optimizer state bits: 32 (paged_adamw_32bit, Guanaco) or 8", choices=(8, 32))
    paged: bool = opt(True, "paged optimizer states (unified memory on the GPU; plain memory on the CPU)")
    seed: int = opt(0, "seed for init, dropout, data order and the generated task")
    eval_every: int = opt(0, "steps between eval-loss passes (0 = only at the end)")
    save_every: int = opt(0, "steps between checkpoints (0 = only at the end and on Ctrl-C)")
    save_minutes: float = opt(10.0, "also checkpoint when this many minutes passed since the last one (0 = never)")
    log_every: int = opt(1, "steps between log lines in metrics.jsonl")
    eval_batches: int = opt(8, "micro-batches used for each eval-loss pass (0 = the whole eval set)")
    resume: bool = opt(False, "continue from output_dir/checkpoint if it exists")
    overwrite: bool = opt(False, "replace a finished run in output_dir (it is refused otherwise)")
    progress: bool = opt(True, "show a tqdm progress bar")
    recipe: str = opt("", "a named recipe's values as the defaults, e.g. 'guanaco' (recipes.py); flags still win")
    eval_mmlu: str = opt("", "MMLU folder (dev/ + the split's CSVs): score MMLU before, every N steps and after")
    eval_mmlu_every: int = opt(0, "steps between MMLU scores (0 = every --eval-every steps; both 0: before and after)")
    eval_mmlu_split: str = opt("dev", "MMLU questions scored (dev: leave-one-out shots)", choices=MMLU_SPLITS)
    eval_mmlu_shots: int = opt(4, "MMLU dev examples before each question (the paper: 5, which dev leaves 4 of)")
    eval_mmlu_subjects: str = opt("", "MMLU: comma-separated subjects, e.g. anatomy,virology ('' = all)")
    nproc: int = opt(
        1, "data parallel ranks (torchrun, DDP; DIST-8): --batch-size is the global micro-batch, split over them"
    )
    cuda_graphs: str = opt(
        "auto",
        "GPU: run each micro-batch's forward + backward as a CUDA graph, one per padded batch shape "
        "(auto: when it can be captured, else eager with one line saying why; off: eager)",
        choices=("auto", "off"),
    )


# The embedded default (`qlora finetune` with no arguments).  Where it departs from the Guanaco defaults above,
# and why: lr 1e-3, because the run is 25 steps (a PEFT trial of this task, 30 steps x 8 examples: 94% exact match at
# 1e-3, 52% at 2e-4); micro-batch 8 x 2 accumulation = the paper's effective batch 16; 25 steps = 400 examples.
# Measured on this 2-core CPU (2026-12-02, warm caches): 2 min 54 s, 3 min 07 s, 2 min 59 s; exact match 0.0% -> 82.8%.
TASK_PRESET = dict(lr=1e-3, batch_size=8, grad_accum=2, max_steps=25, task_train=400, task_eval=64, eval_batches=0)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    SECTIONS: typing.ClassVar[tuple[str, ...]] = ("model", "data", "train")

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in self.SECTIONS}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        """Inverse of ``to_dict``; unknown keys are an error (a config from a different version should say so)."""
        parts = {}
        for name, sub_cls in (("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig)):
            sub = dict(d.get(name, {}))
            known = {f.name for f in dataclasses.fields(sub_cls)}
            unknown = sorted(set(sub) - known)
            if unknown:
                raise ValueError(f"config section {name!r} has unknown keys {unknown}; known: {sorted(known)}")
            if isinstance(sub.get("gradient_checkpointing"), bool):  # written before the flag took auto/on/off
                sub["gradient_checkpointing"] = "on" if sub["gradient_checkpointing"] else "off"
            parts[name] = sub_cls(**sub)
        return cls(**parts)

    @property
    def effective_batch(self) -> int:
        return self.train.batch_size * self.train.grad_accum


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


# --- validation: one rule per field name, the same in every command -----------------------------------------------

RULES: dict[str, tuple[Callable[[typing.Any], bool], str]] = {
    "r": (lambda v: v >= 1, ">= 1"),
    "pad_to_multiple_of": (lambda v: v >= 1, ">= 1"),
    "loftq_iters": (lambda v: v >= 1, ">= 1"),
    "alpha": (lambda v: v > 0, "> 0"),
    "blocksize": (lambda v: v in BLOCKSIZES, f"one of {', '.join(map(str, BLOCKSIZES))}"),
    "dropout": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "lora_dropout": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "eval_fraction": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "max_len": (lambda v: v >= 8, ">= 8"),
    "source_max_len": (lambda v: v >= 1, ">= 1"),
    "target_max_len": (lambda v: v >= 1, ">= 1"),
    "task_train": (lambda v: v >= 1, ">= 1"),
    "task_eval": (lambda v: v >= 1, ">= 1"),
    "max_examples": (lambda v: v >= 0, ">= 0"),
    "shots": (lambda v: v >= 0, ">= 0"),
    "lr": (lambda v: v > 0, "> 0"),
    "max_grad_norm": (lambda v: v > 0, "> 0"),
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "grad_accum": (lambda v: v >= 1, ">= 1"),
    "max_steps": (lambda v: v >= 0, ">= 0"),
    "eval_every": (lambda v: v >= 0, ">= 0"),
    "eval_mmlu_every": (lambda v: v >= 0, ">= 0"),
    "eval_mmlu_shots": (lambda v: v >= 0, ">= 0"),
    "max_prompts": (lambda v: v >= 0, ">= 0"),
    "nproc": (lambda v: v >= 1, ">= 1"),
    "save_every": (lambda v: v >= 0, ">= 0"),
    "save_minutes": (lambda v: v >= 0, ">= 0"),
    "log_every": (lambda v: v >= 0, ">= 0"),
    "eval_batches": (lambda v: v >= 0, ">= 0"),
    "seq_len": (lambda v: v >= 1, ">= 1"),
    "batch": (lambda v: v >= 1, ">= 1"),
    "gpu_gb": (lambda v: v > 0, "> 0"),
    "overhead_gb": (lambda v: v >= 0, ">= 0"),
    "max_new_tokens": (lambda v: v >= 1, ">= 1"),
}


def validate(cfg) -> None:
    """Reject values that cannot work, at the boundary, naming the flag, the rule and the value received.

    ``cfg`` is any config dataclass (here or in command_configs.py; a RunConfig is checked section by section).  A
    field is checked by its ``choices`` and by ``RULES[name]``; ``None`` (an unset optional flag) passes.
    """
    if isinstance(cfg, RunConfig):
        for name in cfg.SECTIONS:
            validate(getattr(cfg, name))
        return
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None:
            continue
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ValueError(f"{flag_name(f.name)} must be one of {', '.join(map(str, choices))}, got {value!r}")
        if f.name in RULES:
            ok, words = RULES[f.name]
            if not ok(value):
                raise ValueError(f"{flag_name(f.name)} must be {words}, got {value!r}")
