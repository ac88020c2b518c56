"""The ``qlora`` command line: finetune, quantize, memory, generate, eval, export.

    qlora finetune                                  # SmolLM2-135M-Instruct (GGUF from PyPI) on the list-reversal task,
                                                    # held-out exact match before and after (~5 min on 2 CPU cores)
    qlora finetune --backend cupy                   # the same on the GPU
    qlora finetune --data alpaca_5000.json --max-steps 200 --output-dir runs/alpaca
    qlora finetune --nproc 2 --backend cupy         # data parallel over 2 GPUs (torchrun, DDP; DIST-8)
    qlora quantize MODEL OUT                        # model dir or .gguf -> bitsandbytes 4-bit checkpoint
    qlora memory --model llama-65b --seq-len 512 --batch 1 --gpu-gb 48
    qlora generate --adapter runs/qlora/adapter --prompt "Reverse the list: 1 2 3 4 5"
    qlora eval --adapter runs/qlora/adapter --task  |  --data wikitext-2/valid.txt
    qlora export --adapter runs/qlora/adapter --out runs/merged --merged --dtype bf16

Every command is parsed the same way: its flags are generated from its config dataclass (config.py), the backend
choices are the backends' own list (``backends.BACKENDS``), and ``config.validate`` checks the parsed values before the
command runs, so nothing is printed before an error.  Bad input (a missing file, a malformed JSON line, an empty
dataset, a sequence too long for the model, an adapter that does not match its base, a bad flag, a backend that
cannot run here) ends with ONE line on stderr and exit code 2; any other error also ends in one line (exit 1).
Outputs are built in a ``<out>.partial`` directory and renamed into place only when complete; a finished output is
replaced only with ``--overwrite``.  QLORA_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from backends import BackendUnavailableError, get_backend

from . import parallel
from .command_configs import DTYPE_NAMES, EvalConfig, ExportConfig, GenerateConfig, MemoryConfig, QuantizeConfig
from .config import TASK_PRESET, DataConfig, ModelConfig, RunConfig, TrainConfig, UsageError, validate
from .finetune import finetune, precheck
from .flags import add_dataclass_args, add_run_args, dataclass_from_args, run_config_from_args
from .memory_report import cmd_memory
from .model import load_prepared, load_with_adapter, resolve_model_path
from .recipes import RECIPES, recipe_defaults
from .rundir import RunDir

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage + error otherwise)
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _one_line(msg) -> str:
    return " ".join(str(msg).split())


def _quiet_transformers() -> None:
    """No hub access and no library chatter on stderr (our own errors must stand alone there)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


# --- the commands: each takes its validated config -----------------------------------------------------------


def cmd_finetune(cfg: RunConfig) -> int:
    finetune(cfg)
    return 0


def cmd_quantize(c: QuantizeConfig) -> int:
    from backends.torchlib.export import save_bnb_checkpoint
    from backends.torchlib.load import load_tokenizer

    RunDir.precheck(c.out, overwrite=c.overwrite)
    path = resolve_model_path(c.model)
    m = ModelConfig(backend=c.backend, quant_type=c.quant_type, double_quant=c.double_quant,
                    blocksize=c.blocksize, r=1, dropout=0.0, gradient_checkpointing="off")  # fmt: skip
    run = RunDir(c.out, overwrite=c.overwrite)
    try:
        model = load_prepared(m, path)
        save_bnb_checkpoint(model, run.work, dtype=c.dtype, compute_dtype=c.dtype)
        try:
            load_tokenizer(path).save_pretrained(run.work)
        except Exception as e:  # the checkpoint is complete without it; say so
            print(f"note: tokenizer not saved ({_one_line(e)})")
    except BaseException:
        run.abandon()
        raise
    print(f"wrote {run.commit()}/ (model.safetensors + config.json with quantization_config, {c.quant_type})")
    return 0


def cmd_generate(c: GenerateConfig) -> int:
    """--prompt TEXT (repeatable): the answers printed; --prompts FILE.jsonl --out answers.jsonl: one JSON line per
    prompt, written whole (answers.py).  Every input is checked before the model loads."""
    from backends.torchlib.files import write_jsonl

    from .answers import answer_file, generate_texts, precheck_out, read_prompts, run_template, wrap

    if bool(c.prompt) == bool(c.prompts):
        raise UsageError("give --prompt TEXT (repeatable) or --prompts FILE.jsonl, one of the two")
    if c.out and not c.prompts:
        raise UsageError("--out goes with --prompts FILE.jsonl (a --prompt's answer is printed)")
    items = None
    if c.prompts:
        precheck_out(c.out, c.overwrite)
        items = read_prompts(c.prompts, c.prompt_field)
        items = items[: c.max_prompts or None]
    template = "none" if c.raw else (run_template(c.adapter) if c.template == "auto" else c.template)
    path = resolve_model_path(c.model)
    model, tokenizer = load_with_adapter(ModelConfig(backend=c.backend, dropout=0.0), path, c.adapter)
    if items is not None:
        rows = answer_file(c, model, tokenizer, template, items)
        write_jsonl(c.out, rows)
        print(f"wrote {c.out} ({len(rows)} answers, template {template}, {sum(r['n_tokens'] for r in rows)} tokens)")
        return 0
    prompts = [wrap(template, p, tokenizer) for p in c.prompt]
    texts = generate_texts(c, model, tokenizer, prompts)  # a token bar; --backend cupy: the captured decode
    for p, text in zip(c.prompt, texts, strict=True):
        print(f"### prompt: {p}\n{text.strip()}\n")
    return 0


def cmd_eval(c: EvalConfig) -> int:
    from .data import (
        LengthCounts,
        LengthPolicy,
        check_data_file,
        model_max_length,
        read_examples,
        text_chunks,
        tokenize_examples,
    )
    from .evaluate import eval_loss, exact_match, pad_id_of
    from .task import make_task

    if c.mmlu:
        if c.task or c.data:
            raise UsageError("give one of --task, --data FILE or --mmlu DIR, not several")
        from .mmlu import run_eval

        return run_eval(c)
    if c.task == bool(c.data):
        raise UsageError("give exactly one of --task (exact match on the generated task) or --data FILE")
    if c.data:
        check_data_file(c.data, expected="a text file (.txt) or a .json / .jsonl data file")
    path = resolve_model_path(c.model)
    model, tokenizer = load_with_adapter(ModelConfig(backend=c.backend, dropout=0.0), path, c.adapter)
    result: dict = {"model": path, "adapter": c.adapter}
    if c.task:
        _, ev = make_task(tokenizer, n_train=1, n_eval=c.task_eval, seed=c.seed)
        acc, _ = exact_match(model, tokenizer, ev, batch_size=c.batch_size, progress=c.progress)
        result.update(task="reverse-list", n=len(ev), exact_match=acc)
        print(f"exact match: {acc:.1%} ({round(acc * len(ev))}/{len(ev)}) on {len(ev)} held-out lists (seed {c.seed})")
    else:
        mm = model_max_length(model)
        if c.data.endswith((".json", ".jsonl")):
            policy, counts = LengthPolicy(c.source_max_len, c.target_max_len, c.drop_long), LengthCounts()
            data = tokenize_examples(read_examples(c.data), tokenizer, max_len=c.max_len, model_max=mm,
                                     source=c.data, policy=policy, counts=counts)  # fmt: skip
            if counts.cut or counts.dropped:
                print(counts.line(c.data, policy, min(c.max_len, mm or c.max_len)))
            if c.max_examples:
                data = data[: c.max_examples]
        else:
            data = text_chunks(c.data, tokenizer, min(c.max_len, mm or c.max_len), c.max_examples)
        loss = eval_loss(model, data, batch_size=c.batch_size, pad_id=pad_id_of(tokenizer), progress=c.progress)
        result.update(data=c.data, n=len(data), loss=loss, perplexity=math.exp(loss))
        print(f"loss {loss:.4f} nats/token, perplexity {math.exp(loss):.3f} over {len(data)} sequences of {c.data}")
    if c.json:
        print(json.dumps(result))
    return 0


def export_base(c: ExportConfig) -> str:
    """The base model path: --model, else the one the adapter's config names."""
    from backends.torchlib.export import read_adapter_config

    if not os.path.isdir(c.adapter):
        raise UsageError(f"adapter directory not found: {c.adapter!r}")
    if c.model:
        return resolve_model_path(c.model)
    base = read_adapter_config(c.adapter).get("base_model_name_or_path")
    if not base:
        raise UsageError(f"{c.adapter}/adapter_config.json names no base model; pass --model")
    if not os.path.exists(base):
        raise UsageError(f"the adapter's base model {base!r} is not there; pass --model")
    return base


def cmd_export(c: ExportConfig) -> int:
    """--merged: model.safetensors + config.json of the merged model in 16 (or 32) bits, loadable without QLoRA;
    --gguf: that merged model as one model.gguf; else the 4-bit base as a bitsandbytes checkpoint plus adapter/
    (PEFT) naming it.  Tokenizer files beside (inside the .gguf)."""
    from backends.torchlib.export import merge_and_export, save_bnb_checkpoint, save_peft_adapter

    RunDir.precheck(c.out, overwrite=c.overwrite)
    path = export_base(c)
    dtype = DTYPE_NAMES.get(c.dtype, c.dtype)
    model, tokenizer = load_with_adapter(ModelConfig(backend=c.backend, dropout=0.0), path, c.adapter)
    run = RunDir(c.out, overwrite=c.overwrite)
    try:
        if c.gguf:
            from backends.torchlib.gguf_export import write_merged_gguf

            write_merged_gguf(model, tokenizer, run.path("model.gguf"), dtype=dtype)
            print(f"wrote {run.commit()}/model.gguf (the merged model in {dtype}, tokenizer inside)")
            return 0
        if c.merged:
            merge_and_export(model, run.work, dtype=dtype)
            what = f"the merged model in {dtype}"
        else:
            save_bnb_checkpoint(model, run.work, dtype=dtype, compute_dtype=dtype)
            save_peft_adapter(model, run.path("adapter"), base_model_name_or_path=os.path.abspath(c.out))
            what = f"the 4-bit base ({model.qlora_config.quant_type}) + adapter/"
        tokenizer.save_pretrained(run.work)
    except BaseException:
        run.abandon()
        raise
    print(f"wrote {run.commit()}/ ({what}, tokenizer)")
    return 0


# --- the parser: one subcommand per config dataclass -----------------------------------------------------------

COMMANDS = {  # name: (config class, function, help)
    "finetune": (RunConfig, cmd_finetune, "LoRA-finetune a 4-bit model (no arguments: the embedded default task)"),
    "quantize": (QuantizeConfig, cmd_quantize, "model dir or .gguf -> bitsandbytes 4-bit checkpoint"),
    "memory": (MemoryConfig, cmd_memory, "will it fit? the memory ledger, by component"),
    "generate": (
        GenerateConfig,
        cmd_generate,
        "greedy answers from the base plus an adapter: --prompt TEXT, or --prompts FILE.jsonl --out answers.jsonl",
    ),
    "eval": (EvalConfig, cmd_eval, "loss/perplexity on a file, exact match on the generated task, or MMLU"),
    "export": (
        ExportConfig,
        cmd_export,
        "base + adapter -> one merged 16-bit model, or the 4-bit checkpoint + adapter",
    ),
}

FINETUNE_DESCRIPTION = (
    f"Defaults: Guanaco's recipe. With --data task (the default) the task preset {TASK_PRESET} replaces those values; "
    "with a data file, the Guanaco defaults apply. `qlora finetune --data FILE --help` shows that file's defaults. "
    f"--recipe NAME ({', '.join(sorted(RECIPES))}) takes a named recipe's values as the defaults (backends/app/"
    "recipes.py; `qlora finetune --recipe guanaco --help` shows them); flags given on the command line still win."
)


def finetune_defaults(args: list[str]) -> tuple[dict, str]:
    """(defaults, recipe name): a --recipe's values, else the task preset when finetune's --data is the generated task
    (the default), else none (the dataclasses' Guanaco defaults).  An unknown recipe is a UsageError."""
    probe = _Parser(prog="qlora finetune", add_help=False, allow_abbrev=False)  # --r 8 is not --recipe 8
    probe.add_argument("--data", default=DataConfig.data)
    probe.add_argument("--recipe", default=TrainConfig.recipe)
    known, _ = probe.parse_known_args(args)
    if known.recipe:
        return recipe_defaults(known.recipe), known.recipe
    return (dict(TASK_PRESET) if known.data == "task" else {}), ""


def build_parser(argv: list[str] = ()) -> _Parser:
    """The ``qlora`` parser; ``argv`` picks finetune's defaults (the task preset or Guanaco's, by its --data)."""
    p = _Parser(prog="qlora", description="QLoRA finetuning with a frozen NF4 base (qlora-ref).")
    sub = p.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    sub.required = True
    for name, (cls, func, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=FINETUNE_DESCRIPTION if cls is RunConfig else help_text)
        if cls is RunConfig:
            defaults, recipe = finetune_defaults(list(argv[1:])) if argv[:1] == ["finetune"] else (TASK_PRESET, "")
            add_run_args(sp, defaults=defaults, recipe=recipe)
            sp.set_defaults(probed_recipe=recipe)
        else:
            add_dataclass_args(sp, cls)
        sp.set_defaults(func=func, config_class=cls)
    return p


def config_from_args(ns: argparse.Namespace):
    cls = ns.config_class
    if cls is RunConfig and ns.recipe != getattr(ns, "probed_recipe", ns.recipe):  # e.g. an abbreviated --rec
        raise UsageError(f"write --recipe in full (--recipe {ns.recipe}): the recipe sets the other flags' defaults")
    return run_config_from_args(ns) if cls is RunConfig else dataclass_from_args(cls, ns)


def finetune_config_from_argv(argv: list[str]) -> RunConfig:
    """Parse `qlora finetune` flags; the task preset applies when the data is the generated task."""
    argv = ["finetune", *argv]
    return config_from_args(build_parser(argv).parse_args(argv))


def _is_bad_input(e: BaseException) -> bool:
    """Errors that bad input causes (exit 2): ours are ValueError/TypeError/OSError; libraries' are listed."""
    known = (ValueError, TypeError, OSError, BackendUnavailableError, FloatingPointError)
    return isinstance(e, known) or type(e).__name__ == "SafetensorError"  # safetensors' error for a corrupt file


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(argv).parse_args(argv)
        cfg = config_from_args(args)
        validate(cfg)
        backend = getattr(cfg.model if isinstance(cfg, RunConfig) else cfg, "backend", None)
        if backend is not None:
            get_backend(backend)  # one line now, not after a slow load, when the backend cannot run here
        _quiet_transformers()
        if isinstance(cfg, RunConfig) and cfg.train.nproc > 1 and not parallel.inside_torchrun():
            precheck(cfg)  # bad input: one line here, before N processes start
            resolve_model_path(cfg.model.model)  # a missing model: one line; 'smollm2' fetched once, not by N ranks
            return parallel.launch(argv, cfg.train.nproc)  # the same command as N ranks under torchrun
        return args.func(cfg)
    except SystemExit as e:  # argparse --help
        return int(e.code or 0)
    except KeyboardInterrupt:
        print("qlora: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("QLORA_DEBUG"):
            raise
        cmd = f" {argv[0]}" if argv and argv[0] in COMMANDS else ""
        if _is_bad_input(e):
            print(f"qlora{cmd}: error: {_one_line(e)}", file=sys.stderr)
            return EXIT_USAGE
        print(f"qlora{cmd}: internal error: {type(e).__name__}: {_one_line(e)} (QLORA_DEBUG=1 shows the traceback)",
              file=sys.stderr)  # fmt: skip
        return 1


def run() -> None:
    """The ``qlora`` command (and ``python -m backends.app.cli``): main(), then a fast exit.

    The exit handlers run and both streams are flushed; then os._exit skips the interpreter's finalization, which
    frees every module, tensor and CUDA object one by one (1.1 s after a CPU finetune here; on an H200 the command
    ended 1.3 s after its last line).  Every file a command writes is closed before main returns (``with`` blocks,
    whole files renamed into place).
    """
    import atexit

    rc = main()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(rc)


# keep the dataclasses importable from here for scripts: `from backends.app.cli import RunConfig`
__all__ = ["RunConfig", "ModelConfig", "DataConfig", "TrainConfig", "main", "run", "finetune", "add_dataclass_args"]

if __name__ == "__main__":
    run()
