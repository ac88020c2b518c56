"""One QLoRA finetune, top to bottom: config -> data -> model -> trainer -> evaluate -> train -> evaluate -> export.

    qlora finetune [flags]                     # the command (cli.py parses the flags into a RunConfig)
    python -m backends.app.finetune [flags]    # the same, as a script

The run directory ``output_dir`` (built as ``output_dir.partial`` and renamed into place when whole, rundir.py):

    config.json      the resolved configuration: every flag, plus the model path, QLoRA layer settings, dataset sizes,
                     the prompt template (``qlora generate`` wraps new questions in it), a --recipe's record
    summary.json     held-out scores before (written before training, so a resumed run keeps the base model's) and
                     after, train loss, speed, peak memory, times
    metrics.jsonl    one line per logged step and per eval (trainer.py)
    checkpoint/      resumable state (trainer.py); adapter/ the PEFT adapter; loss_curve.png

The data is read and tokenized before the model is loaded: a bad data file fails in seconds, not after the load.

With ``--nproc N`` the command re-launches itself as N ranks under torchrun (parallel.py, DIST-8); each rank runs
this script, rank 0 alone writing the run directory and printing (the others only read a checkpoint on --resume).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time

from . import parallel
from .config import RunConfig, validate
from .rundir import RunDir


def precheck(cfg: RunConfig):
    """Everything about the command line that can fail before anything slow or written: the values, the recipe,
    --nproc against --batch-size (and torchrun's WORLD_SIZE), the data files, the output directory, the MMLU files.
    Returns the MMLU callback (or None).  The launching process of --nproc N runs it too: its errors are one line."""
    from .data import check_data_file
    from .recipes import check_recipe

    validate(cfg)
    check_recipe(cfg)
    parallel.check_nproc(cfg)
    for path in (cfg.data.data if cfg.data.data != "task" else "", cfg.data.eval_data):
        if path:
            check_data_file(path)
    t = cfg.train
    RunDir.precheck(t.output_dir, resume=t.resume, resumable=True, overwrite=t.overwrite)
    return mmlu_callback(cfg) if t.eval_mmlu else None  # its files checked now


def finetune(cfg: RunConfig, *, log=print) -> dict:
    """Run one finetune; returns the summary written to <output_dir>/summary.json (rank 0's, under --nproc N)."""
    from backends.torchlib import distributed as D
    from backends.torchlib.export import save_peft_adapter
    from backends.torchlib.files import write_json
    from backends.torchlib.load import load_tokenizer

    from .checkpoint import find_checkpoint
    from .data import model_max_length
    from .datasets import Datasets
    from .evaluate import plot_loss_curve
    from .model import load_prepared, resolve_model_path, settle_checkpointing
    from .recipes import resolve_recipe
    from .trainer import Trainer, seed_everything

    # -- config: every value checked and the output directory writable, before anything slow --------------------
    mmlu = precheck(cfg)
    t_start = time.perf_counter()
    # -- ranks (--nproc N under torchrun): join the process group; rank 0 alone prints and writes -------------------
    distributed = parallel.join(cfg)
    main = D.is_main()
    if not main:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, progress=False))
        log = _silent
    t = cfg.train

    # -- data: the model's tokenizer, then every example read and tokenized ---------------------------------------
    model_path = resolve_model_path(cfg.model.model)
    recipe = resolve_recipe(cfg, model_path)  # a recipe's size-dependent values (the dropout), from the model's size
    tokenizer = load_tokenizer(model_path)
    datasets = Datasets.from_config(cfg, tokenizer)
    for note in datasets.length_notes:
        log(note)

    D.barrier()  # every rank has checked the output directory before rank 0 creates <out>.partial
    if main:
        run = RunDir(t.output_dir, resume=t.resume, resumable=True, overwrite=t.overwrite)
    else:
        run = parallel.RankRunDir(*RunDir.paths(t.output_dir))
    D.barrier()  # rank 0's run directory (a --resume's checkpoint) is in place for every rank
    try:
        # -- model: the frozen 4-bit base with fresh LoRA weights drawn from the seed -----------------------------
        seed_everything(t.seed)
        model = load_prepared(cfg.model, model_path)
        datasets.check_fits(model_max_length(model))
        decided = settle_checkpointing(model, cfg.model, **ledger_inputs(model, cfg, datasets))
        if decided:
            log(decided)
        config = resolved_config(cfg, model_path, model, datasets, recipe)
        if main:
            write_json(run.path("config.json"), config, sort_keys=False)
        log(
            f"model {model_path} | backend {cfg.model.backend} | "
            f"{len(datasets.train)} train / {len(datasets.eval)} eval examples"
        )
        log(f"config: {run.final}/config.json (lr {t.lr}, r {cfg.model.r}, batch {cfg.effective_batch})")
        log(config_lines(config))

        # -- trainer: fresh, or continued from the run's checkpoint with --resume ---------------------------------
        trainer = Trainer(
            model, tokenizer, cfg, datasets.train, datasets.eval, run_dir=run.work, scored=datasets.scored,
            mmlu=(lambda m: mmlu(m, tokenizer)) if mmlu else None,
        )  # fmt: skip
        resumed = find_checkpoint(run.work) if t.resume else None
        if resumed:
            trainer.load_checkpoint(resumed)
            log(f"resumed from {resumed} at step {trainer.step}")

        # -- evaluate the base model (a resumed run keeps the scores its start recorded) ---------------------------
        summary = recorded_before(run.path("summary.json")) if t.resume else {}
        D.barrier()  # every rank has read what rank 0 may now rewrite: all take the same branch
        if not summary:
            summary = {f"{k}_before": v for k, v in trainer.scores().items()}
            if main:
                write_json(run.path("summary.json"), summary, sort_keys=False)
        log_scores(summary, "before", datasets, log)

        # -- train ------------------------------------------------------------------------------------------------
        t_train = time.perf_counter()
        with sigterm_as_interrupt():
            history = trainer.fit()
        summary.update(train_summary(history, trainer.step, time.perf_counter() - t_train))

        # -- evaluate the finetuned model -------------------------------------------------------------------------
        summary.update({f"{k}_after": v for k, v in trainer.scores().items()})
        log_scores(summary, "after", datasets, log)

        # -- export: the PEFT adapter, the loss curve, the summary -------------------------------------------------
        if main:
            base = peft_base_path(model_path)
            if cfg.model.init == "loftq":  # LoftQ changed the 4-bit base too: the adapter belongs with this one
                base = write_loftq_base(model, tokenizer, run.path(LOFTQ_BASE), os.path.join(run.final, LOFTQ_BASE))
            save_peft_adapter(model, run.path("adapter"), base_model_name_or_path=base)
            write_adapter_readme(run.path("adapter"), base, model_path, os.path.join(run.final, "adapter"))
            plot_loss_curve(history, run.path("loss_curve.png"), eval_loss_before=summary.get("eval_loss_before"),
                            title=f"QLoRA finetune: {os.path.basename(model_path)}")  # fmt: skip
        summary["total_seconds"] = time.perf_counter() - t_start
        if main:
            write_json(run.path("summary.json"), summary, sort_keys=False)
    except BaseException:
        if main and not os.path.isdir(os.path.join(run.work, "checkpoint")):
            run.abandon()  # nothing resumable: leave no half-written output behind
        raise
    final = run.commit()
    if distributed:
        parallel.leave()
    log(f"wrote {final}/ (adapter/, checkpoint/, config.json, metrics.jsonl, loss_curve.png, summary.json)")
    log(f"total time {summary['total_seconds']:.0f} s")
    return summary


# --- the pieces the script above names ---------------------------------------------------------------------------


def ledger_inputs(model, cfg: RunConfig, datasets) -> dict:
    """What settle_checkpointing weighs: the micro-batch, its longest padded sequence, the device's free memory (0 on
    the CPU, where nothing is decided)."""
    import torch

    from .gpu_step import BUCKET

    device = next(p.device for p in model.parameters() if p.requires_grad)
    pad = cfg.data.pad_to_multiple_of if cfg.data.pad_to_multiple_of > 1 else BUCKET
    longest = max((len(t) for t in datasets.train), default=1)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    return dict(batch=cfg.train.batch_size, seq_len=-(-longest // pad) * pad, free_bytes=free)


LOFTQ_BASE = "base-4bit"


def write_loftq_base(model, tokenizer, path: str, final_path: str) -> str:
    """The run's LoftQ-initialised 4-bit base as a bitsandbytes checkpoint (+ tokenizer) at ``path``; returns the
    path it will have once the run directory is committed.  Non-quantized tensors keep the dtype they trained in."""
    from backends.torchlib.export import save_bnb_checkpoint

    dtype = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")
    save_bnb_checkpoint(model, path, dtype=dtype)
    tokenizer.save_pretrained(path)
    return final_path


def _silent(*args, **kwargs) -> None:
    """The log of a rank other than 0."""


def resolved_config(cfg: RunConfig, model_path: str, model, datasets, recipe: dict | None = None) -> dict:
    """config.json: the flags, plus what they resolved to."""
    from .data import prompt_template_of

    resolved = cfg.to_dict()
    resolved["resolved"] = {
        "model_path": model_path,
        "qlora": model.qlora_config.to_dict() if hasattr(model, "qlora_config") else None,
        "n_train": len(datasets.train),
        "n_eval": len(datasets.eval),
        "effective_batch": cfg.effective_batch,
        "prompt_template": "chat" if cfg.data.data == "task" else prompt_template_of(cfg.data.data, cfg.data.format),
    }
    if recipe:
        resolved["resolved"]["recipe"] = recipe
    return resolved


def config_lines(config: dict) -> str:
    """The printed config: every value of config.json, one line per section."""
    lines = []
    for section, values in config.items():
        if section == "resolved":
            values = {k: v for k, v in values.items() if k not in ("qlora", "recipe")}
        lines.append(f"  {section}: " + ", ".join(f"{k}={v!r}" for k, v in values.items()))
    recipe = config.get("resolved", {}).get("recipe")
    if recipe:
        changed = ", ".join(f"{k}={v!r}" for k, v in recipe["overridden"].items()) or "none"
        rule = f"; dropout {recipe['dropout_rule']}" if "dropout_rule" in recipe else ""
        lines.append(f"  recipe {recipe['name']}: changed by flags: {changed}{rule}")
    return "\n".join(lines)


def mmlu_callback(cfg: RunConfig):
    """``--eval-mmlu DIR``: (model, tokenizer) -> the MMLU result, its files and subjects checked now (one line for a
    missing folder, subject or malformed row, before any model is loaded)."""
    from .mmlu import check_files, evaluate_mmlu

    t = cfg.train
    subjects = [s.strip() for s in t.eval_mmlu_subjects.split(",") if s.strip()] or None
    check_files(t.eval_mmlu, split=t.eval_mmlu_split, shots=t.eval_mmlu_shots, subjects=subjects)

    def score(model, tokenizer) -> dict:
        return evaluate_mmlu(model, tokenizer, t.eval_mmlu, split=t.eval_mmlu_split, shots=t.eval_mmlu_shots,
                             subjects=subjects, batch_size=t.batch_size, progress=t.progress)  # fmt: skip

    return score


def peft_base_path(model_path: str) -> str:
    """What PEFT's ``AutoPeftModelForCausalLM`` can load as the base: a model directory (absolute), for a .gguf the
    Hugging Face directory converted from it (``gguf_as_hf_dir``, cached when the model was loaded)."""
    if model_path.endswith(".gguf"):
        from backends.torchlib.load import gguf_as_hf_dir

        return str(gguf_as_hf_dir(model_path))
    return os.path.abspath(model_path)


ADAPTER_README = """# QLoRA adapter (qlora-ref)

LoRA weights for the base model `{base}`{converted}.

With PEFT (the base in full precision, the adapter on top):

    from peft import AutoPeftModelForCausalLM
    model = AutoPeftModelForCausalLM.from_pretrained("{adapter}")

With qlora-ref (the base in 4 bits, as it was trained):

    qlora generate --model {model} --adapter {adapter} --prompt "..."
    qlora export --adapter {adapter} --out merged --merged --dtype bf16
"""


def write_adapter_readme(adapter_dir: str, base: str, model_path: str, final_adapter: str) -> None:
    converted = f" (converted from `{model_path}`)" if base != os.path.abspath(model_path) else ""
    text = ADAPTER_README.format(base=base, converted=converted, adapter=final_adapter, model=model_path)
    with open(os.path.join(adapter_dir, "README.md"), "w") as f:
        f.write(text)


def recorded_before(summary_path: str) -> dict:
    """The ``*_before`` scores a run recorded when it started ({} if it has none)."""
    if not os.path.exists(summary_path):
        return {}
    with open(summary_path) as f:
        return {k: v for k, v in json.load(f).items() if k.endswith("_before")}


def log_scores(summary: dict, when: str, datasets, log) -> None:
    if summary.get(f"eval_loss_{when}") is not None:
        log(f"eval loss {when}: {summary[f'eval_loss_{when}']:.4f}")
    if f"exact_match_{when}" in summary:
        acc, n = summary[f"exact_match_{when}"], len(datasets.scored or ())
        log(f"held-out exact match {when}: {acc:.1%} ({round(acc * n)}/{n})")
    if f"mmlu_macro_acc_{when}" in summary:
        macro, micro = summary[f"mmlu_macro_acc_{when}"], summary[f"mmlu_micro_acc_{when}"]
        log(f"MMLU {when}: macro {macro:.4f}, micro {micro:.4f}")


def train_summary(history: list[dict], step: int, train_seconds: float) -> dict:
    """Steps, time, last train loss, mean tokens/s (total tokens / total step time), peak memory."""
    steps = [h for h in history if "loss" in h]
    seconds = sum(h["tokens"] / h["tokens_per_s"] for h in steps)
    return dict(
        steps=step,
        train_seconds=train_seconds,
        final_train_loss=steps[-1]["loss"] if steps else None,
        tokens_per_s=sum(h["tokens"] for h in steps) / max(seconds, 1e-9) if steps else None,
        peak_mem_gb=max((h["mem_gb"] for h in steps), default=None),
    )


class sigterm_as_interrupt:
    """While training, SIGTERM stops the run like Ctrl-C does (a checkpoint first, then exit 130)."""

    def __enter__(self):
        self.old = None
        try:
            self.old = signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not the main thread: leave signals alone
            pass
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)
        return False


if __name__ == "__main__":
    from .cli import main

    sys.exit(main(["finetune", *sys.argv[1:]]))
