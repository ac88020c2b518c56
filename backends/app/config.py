"""Run configuration: one ``@dataclass`` per concern, commented defaults, argparse flags generated from the fields.

The defaults are the QLoRA paper's Guanaco recipe (Dettmers et al., 2023, Appendix B and ``qlora.py``):

    r 64, alpha 16, dropout 0.05, LoRA on every linear layer but the LM head, NF4 + double quantization, blocksize 64,
    lr 2e-4 constant, max grad norm 0.3, effective batch 16 by gradient accumulation, paged AdamW (32-bit states),
    weight decay 0, betas (0.9, 0.999), loss on the response only, group-by-length batching,
    bf16 compute on the GPU / fp32 on the CPU.

Every field becomes one flag: ``lr`` -> ``--lr``, ``group_by_length`` -> ``--group-by-length / --no-group-by-length``.
The resolved configuration (after flags and ``"auto"`` values are settled) is written as ``config.json`` beside every
run's outputs, so a run can be repeated from its own directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field


def opt(default, help: str):
    """A dataclass field whose default and help text travel together (the help is the flag's ``--help`` line)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    model: str = opt("smollm2", "HF model dir, a .gguf file, or 'smollm2' (SmolLM2-135M-Instruct GGUF from PyPI)")
    backend: str = opt("numpy", "dequantization backend: 'numpy' (CPU reference) or 'cupy' (GPU)")
    quant_type: str = opt("nf4", "4-bit data type of the frozen base: nf4 | fp4 | int4")
    double_quant: bool = opt(True, "quantize the absmax constants again to 8 bits (paper section 3)")
    blocksize: int = opt(64, "4-bit quantization block size")
    r: int = opt(64, "LoRA rank (Guanaco: 64)")
    alpha: float = opt(16.0, "LoRA alpha; scale s = alpha / r (Guanaco: 16)")
    dropout: float = opt(0.05, "LoRA dropout (Guanaco 7B/13B: 0.05)")
    target: str = opt("all-linear", "which linear layers get LoRA: 'all-linear' or comma-separated module names")
    rslora: bool = opt(False, "rank-stabilised LoRA: s = alpha / sqrt(r)")
    gradient_checkpointing: bool = opt(True, "recompute each decoder layer in backward instead of storing it")
    compute_dtype: str = opt("auto", "'auto' = bfloat16 on the GPU, float32 on the CPU; or float32 | bfloat16")


@dataclass
class DataConfig:
    data: str = opt("task", "'task' (the generated list-reversal task) or a .json (Alpaca) / .jsonl file")
    format: str = opt("auto", "auto | alpaca | oasst | prompt-completion (auto: from the file's fields)")
    eval_data: str = opt("", "held-out file of the same kind; '' = split eval_fraction off the training data")
    eval_fraction: float = opt(0.05, "fraction held out for eval loss when no eval_data is given")
    max_len: int = opt(512, "longest tokenized example allowed; longer ones are an error (never silently cut)")
    group_by_length: bool = opt(True, "batch examples of similar length together (Guanaco: on)")
    train_on_source: bool = opt(False, "also put the loss on the prompt (Guanaco: off; loss on the response only)")
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
    optim_bits: int = opt(32, "optimizer state bits: 32 (paged_adamw_32bit, Guanaco) or 8")
    paged: bool = opt(True, "paged optimizer states (unified memory on the GPU; plain memory on the CPU)")
    seed: int = opt(0, "seed for init, dropout, data order and the generated task")
    eval_every: int = opt(0, "steps between eval-loss passes (0 = only at the end)")
    save_every: int = opt(0, "steps between checkpoints (0 = only at the end)")
    log_every: int = opt(1, "steps between log lines in metrics.jsonl")
    eval_batches: int = opt(8, "micro-batches used for each eval-loss pass (0 = the whole eval set)")
    resume: bool = opt(False, "continue from output_dir/checkpoint if it exists")
    progress: bool = opt(True, "show a tqdm progress bar")


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
            parts[name] = sub_cls(**sub)
        return cls(**parts)

    @property
    def effective_batch(self) -> int:
        return self.train.batch_size * self.train.grad_accum


# --- flags from dataclasses ------------------------------------------------------------------------------------


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp):
    """int | None -> int; plain types pass through."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def add_dataclass_args(parser: argparse.ArgumentParser, cls, *, defaults: dict | None = None) -> None:
    """One flag per field of ``cls``; ``defaults`` overrides the shown default (e.g. a subcommand's preset)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        default = (defaults or {}).get(
            f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory()
        )
        tp = _base_type(hints[f.name])
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})"
        if tp is bool:
            group.add_argument(
                _flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        else:
            group.add_argument(
                _flag(f.name), dest=f.name, type=tp, default=default, help=help_text, metavar=tp.__name__
            )


def dataclass_from_args(cls, ns: argparse.Namespace):
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


def add_run_args(parser: argparse.ArgumentParser, *, defaults: dict | None = None) -> None:
    for cls in (ModelConfig, DataConfig, TrainConfig):
        add_dataclass_args(parser, cls, defaults=defaults)


def run_config_from_args(ns: argparse.Namespace) -> RunConfig:
    return RunConfig(
        model=dataclass_from_args(ModelConfig, ns),
        data=dataclass_from_args(DataConfig, ns),
        train=dataclass_from_args(TrainConfig, ns),
    )


def validate(cfg: RunConfig) -> None:
    """Reject values that cannot work, at the boundary, with the value received and what to do."""
    m, d, t = cfg.model, cfg.data, cfg.train
    checks = [
        (m.backend in ("numpy", "cupy"), f"--backend must be 'numpy' or 'cupy', got {m.backend!r}"),
        (m.quant_type in ("nf4", "fp4", "int4"), f"--quant-type must be nf4, fp4 or int4, got {m.quant_type!r}"),
        (m.r >= 1, f"--r must be >= 1, got {m.r}"),
        (0.0 <= m.dropout < 1.0, f"--dropout must be in [0, 1), got {m.dropout}"),
        (
            m.compute_dtype in ("auto", "float32", "bfloat16"),
            f"--compute-dtype auto|float32|bfloat16, got {m.compute_dtype!r}",
        ),
        (d.format in ("auto", "alpaca", "oasst", "prompt-completion"), f"--format: unknown format {d.format!r}"),
        (0.0 <= d.eval_fraction < 1.0, f"--eval-fraction must be in [0, 1), got {d.eval_fraction}"),
        (d.max_len >= 8, f"--max-len must be >= 8, got {d.max_len}"),
        (d.task_train >= 1 and d.task_eval >= 1, "--task-train and --task-eval must be >= 1"),
        (t.lr > 0, f"--lr must be > 0, got {t.lr}"),
        (t.max_grad_norm > 0, f"--max-grad-norm must be > 0, got {t.max_grad_norm}"),
        (
            t.batch_size >= 1 and t.grad_accum >= 1,
            f"--batch-size/--grad-accum must be >= 1, got {t.batch_size}/{t.grad_accum}",
        ),
        (t.max_steps >= 0, f"--max-steps must be >= 0, got {t.max_steps}"),
        (t.optim_bits in (8, 32), f"--optim-bits must be 8 or 32, got {t.optim_bits}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)
