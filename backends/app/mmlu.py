"""MMLU (Hendrycks et al., 2021): the k-shot multiple-choice prompt, scored by the next-token logits of the four
answer letters, no generation — as the paper's 5-shot MMLU and the QLoRA repository's MMLU callback score it.

The prompt for question q of subject S with shots e_1..e_k (S's dev examples, in file order):

    header(S)  = "The following are multiple choice questions (with answers) about " + S with "_" -> " " + ".\\n\\n"
    block(e)   = e.question + "\\nA. " + c_0 + "\\nB. " + c_1 + "\\nC. " + c_2 + "\\nD. " + c_3 + "\\nAnswer:"
    shot(e)    = block(e) + " " + letter(e.answer) + "\\n\\n"
    prompt     = header(S) + shot(e_1) + ... + shot(e_k) + block(q)

Letter scoring: with z = the logits of the prompt's next token and t_L the token that follows "Answer:" when
"Answer: L" is tokenized (L in A..D),

    pred = argmax over L of z[t_L]          correct iff pred == q.answer

SmolLM2's tokenizer splits "Answer: A" into ["Answer", ":", " A"], so t_A..t_D are the space-prefixed letters
" A", " B", " C", " D" (ids 330, 389, 340, 422); ``letter_token_ids`` derives them from any tokenizer that way and
refuses one that does not split off a single letter token.

Averages over the subjects s with n_s questions of which c_s are correct:

    macro = (1 / #subjects) * sum_s c_s / n_s          micro = sum_s c_s / sum_s n_s

Context fit: a prompt longer than ``max_length`` tokens first loses shots from the end (k -> k-1 -> ... -> 0, as
Hendrycks' evaluate.py does); a 0-shot prompt still too long keeps its last ``max_length`` tokens (left
truncation).  Each prompt that lost a shot or tokens counts once in ``n_truncated``.

Files: ``DIR/dev/<subject>_dev.csv`` gives the shots, ``DIR/<split>/<subject>_<split>.csv`` the questions.  A CSV is
either the re-formatted layout (header ``question,choice0,choice1,choice2,choice3,answer``, answer 0-3) or the
original release's (no header, answer a letter A-D).  Scoring the dev split itself uses leave-one-out shots: a dev
question's shots are the other dev examples, so k <= (dev examples) - 1.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import DataError

LETTERS = ("A", "B", "C", "D")
REFORMATTED_HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
SPLITS = ("dev", "val", "test")


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # 0..3, the index of the right choice


# --- files --------------------------------------------------------------------------------------------------------


def _parse_answer(value: str, letters: bool, where: str) -> int:
    v = value.strip()
    allowed = LETTERS if letters else ("0", "1", "2", "3")
    if v not in allowed:
        raise DataError(f"{where}: answer {value!r} is not one of {', '.join(allowed)}; fix the row")
    return allowed.index(v)


def read_csv(path: str | os.PathLike) -> list[Question]:
    """The questions of one MMLU CSV, in either layout (module docstring); a malformed row is one DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"MMLU file not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    reformatted = bool(rows) and [c.strip() for c in rows[0]] == REFORMATTED_HEADER
    out = []
    for i, row in enumerate(rows[1:] if reformatted else rows, start=2 if reformatted else 1):
        where = f"{path} row {i}"
        if len(row) != 6:
            raise DataError(f"{where}: {len(row)} fields, expected 6 (question, 4 choices, answer); fix the row")
        out.append(Question(row[0], (row[1], row[2], row[3], row[4]), _parse_answer(row[5], not reformatted, where)))
    return out


def subject_files(mmlu_dir: str | os.PathLike, split: str) -> dict[str, Path]:
    """{subject: DIR/split/<subject>_<split>.csv} for every such file, sorted by subject."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    folder = Path(mmlu_dir) / split
    if not folder.is_dir():
        raise DataError(f"no {split}/ folder in the MMLU directory {mmlu_dir} (expected {split}/<subject>_{split}.csv)")
    suffix = f"_{split}.csv"
    found = {p.name[: -len(suffix)]: p for p in folder.iterdir() if p.name.endswith(suffix)}
    if not found:
        raise DataError(f"no *{suffix} files in {folder}")
    return dict(sorted(found.items()))


# --- prompts --------------------------------------------------------------------------------------------------------


def header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def block(q: Question) -> str:
    choices = "".join(f"\n{letter}. {c}" for letter, c in zip(LETTERS, q.choices, strict=True))
    return f"{q.question}{choices}\nAnswer:"


def shot(q: Question) -> str:
    return f"{block(q)} {LETTERS[q.answer]}\n\n"


def prompt(subject: str, shots: list[Question], q: Question) -> str:
    return header(subject) + "".join(shot(e) for e in shots) + block(q)


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def fit_prompt(tokenizer, subject: str, shots: list[Question], q: Question, max_length: int) -> tuple[list[int], bool]:
    """(token ids of at most max_length, whether the prompt was truncated): drop shots from the end, then cut left."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    for k in range(len(shots), -1, -1):
        ids = encode(tokenizer, prompt(subject, shots[:k], q))
        if len(ids) <= max_length:
            return ids, k < len(shots)
    return ids[-max_length:], True


def letter_token_ids(tokenizer) -> list[int]:
    """t_A..t_D: the one token that follows "Answer:" in "Answer: L" (module docstring)."""
    base = encode(tokenizer, "Answer:")
    out = []
    for letter in LETTERS:
        ids = encode(tokenizer, f"Answer: {letter}")
        if ids[: len(base)] != base or len(ids) != len(base) + 1:
            raise ValueError(f"the tokenizer does not split 'Answer: {letter}' into 'Answer:' + one letter token")
        out.append(ids[-1])
    return out


# --- scoring --------------------------------------------------------------------------------------------------------


def _pad_id(tokenizer) -> int:
    for pid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pid is not None:
            return int(pid)
    return 0


@torch.no_grad()
def letter_logits(model, prompts: list[list[int]], letter_ids: list[int], *, pad_id: int, batch_size: int = 4):
    """(P, 4) float32: the next-token logits z[t_A..t_D] after each prompt (left-padded batches, longest first)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = torch.empty(len(prompts), len(letter_ids))
    letters = torch.tensor(letter_ids, device=device)
    for k in range(0, len(order), batch_size):
        rows = [prompts[i] for i in order[k : k + batch_size]]
        T = max(len(r) for r in rows)
        ids = torch.tensor([[pad_id] * (T - len(r)) + r for r in rows], device=device)  # (B, T)
        mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows], device=device)  # (B, T)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): each row counts from 0 at its first token
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=1).logits
        out[order[k : k + batch_size]] = logits[:, -1, :].index_select(-1, letters).float().cpu()  # (B, 4)
    return out


def summarize(per_subject: dict[str, dict]) -> dict:
    """Macro and micro accuracy (module docstring) from {subject: {"correct": c, "n": n}}; adds each "acc"."""
    if not per_subject:
        raise DataError("no MMLU subject was scored")
    for r in per_subject.values():
        r["acc"] = r["correct"] / r["n"]
    n = sum(r["n"] for r in per_subject.values())
    return {
        "mmlu_macro_acc": sum(r["acc"] for r in per_subject.values()) / len(per_subject),
        "mmlu_micro_acc": sum(r["correct"] for r in per_subject.values()) / n,
        "n_questions": n,
        "n_subjects": len(per_subject),
    }


def subjects_to_score(mmlu_dir, split: str, shots: int, subjects: list[str] | None) -> tuple[list, dict, dict]:
    """(names, {subject: questions file}, {subject: dev file}) for ``split``; a subject without its file, or without
    dev examples when shots are asked, is a DataError."""
    dev_files = subject_files(mmlu_dir, "dev")
    files = dev_files if split == "dev" else subject_files(mmlu_dir, split)
    names = list(files) if not subjects else list(subjects)
    for s in names:
        if s not in files:
            raise DataError(f"subject {s!r} has no {split} file in {mmlu_dir} (named {split}/<subject>_{split}.csv)")
        if shots and s not in dev_files:
            raise DataError(f"subject {s!r} has no dev examples for its shots (dev/{s}_dev.csv); pass --shots 0")
    return names, files, dev_files


def check_files(mmlu_dir, *, split: str = "test", shots: int = 5, subjects: list[str] | None = None) -> list[str]:
    """Everything ``evaluate_mmlu`` would refuse, found without a model: the folders, the subjects, every row of their
    CSVs, enough dev examples for the shots.  Returns the subjects that will be scored."""
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    names, files, dev_files = subjects_to_score(mmlu_dir, split, shots, subjects)
    for s in names:
        if not read_csv(files[s]):
            raise DataError(f"subject {s!r}: {files[s]} holds no questions")
        have = (len(read_csv(dev_files[s])) - (split == "dev")) if shots else 0
        if shots > have:
            raise DataError(f"subject {s!r}: {shots} shots asked, {have} dev examples available for {split}")
    return names


def evaluate_mmlu(
    model,
    tokenizer,
    mmlu_dir: str | os.PathLike,
    *,
    split: str = "test",
    shots: int = 5,
    subjects: list[str] | None = None,
    max_length: int | None = None,
    batch_size: int = 4,
    max_questions: int = 0,
    progress: bool = True,
) -> dict:
    """Score ``split`` of every (or each named) subject; the result is JSON-ready (``summarize`` + per subject).

    ``max_length`` defaults to the model's ``config.max_position_embeddings``; ``max_questions`` > 0 scores only
    each subject's first questions.  Leaves the model in the train/eval mode it found it in.
    """
    from tqdm.auto import tqdm

    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    if max_length is None:
        max_length = int(getattr(getattr(model, "config", None), "max_position_embeddings", 2048))
    names, files, dev_files = subjects_to_score(mmlu_dir, split, shots, subjects)
    letter_ids = letter_token_ids(tokenizer)
    was_training = model.training
    model.eval()
    per_subject: dict[str, dict] = {}
    n_truncated = 0
    bar = tqdm(names, desc="MMLU", unit="subject", disable=not progress, file=sys.stderr)
    for s in bar:
        questions = read_csv(files[s])[: max_questions or None]
        if not questions:
            raise DataError(f"subject {s!r}: {files[s]} holds no questions")
        dev = read_csv(dev_files[s]) if shots else []
        have = len(dev) - 1 if split == "dev" else len(dev)
        if shots > have:
            raise DataError(f"subject {s!r}: {shots} shots asked, {have} dev examples available for {split}")
        prompts = []
        for i, q in enumerate(questions):
            pool = [e for j, e in enumerate(dev) if j != i] if split == "dev" else dev  # leave-one-out on dev
            ids, cut = fit_prompt(tokenizer, s, pool[:shots], q, max_length)
            prompts.append(ids)
            n_truncated += cut
        z = letter_logits(model, prompts, letter_ids, pad_id=_pad_id(tokenizer), batch_size=batch_size)  # (n, 4)
        pred = z.argmax(-1).tolist()
        correct = sum(int(p == q.answer) for p, q in zip(pred, questions, strict=True))
        per_subject[s] = {"correct": correct, "n": len(questions), "pred": "".join(LETTERS[p] for p in pred)}
        bar.set_postfix(subject=s, acc=f"{correct / max(len(questions), 1):.2f}")
    model.train(was_training)
    summary = summarize(per_subject)
    return {
        **summary,
        "n_truncated": n_truncated,
        "split": split,
        "shots": shots,
        "leave_one_out": split == "dev",
        "max_length": max_length,
        "per_subject": per_subject,
    }


# --- outputs --------------------------------------------------------------------------------------------------------


def write_outputs(result: dict, json_path: str | os.PathLike, png_path: str | os.PathLike | None = None) -> None:
    """The result as JSON, and a horizontal bar chart of the per-subject accuracies (matplotlib, Agg)."""
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    if png_path is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["per_subject"])
    accs = [result["per_subject"][s]["acc"] for s in names]
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.22 * len(names)))
    ax.barh(range(len(names)), accs, color="tab:blue")
    ax.set_yticks(range(len(names)), [s.replace("_", " ") for s in names], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0.25, color="grey", ls=":", lw=1, label="chance (0.25)")
    ax.axvline(result["mmlu_macro_acc"], color="tab:red", lw=1, label=f"macro {result['mmlu_macro_acc']:.3f}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy")
    ax.set_title(f"MMLU {result['split']}, {result['shots']}-shot", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def format_summary(result: dict) -> str:
    return (
        f"MMLU {result['split']} {result['shots']}-shot: macro {result['mmlu_macro_acc']:.4f} over "
        f"{result['n_subjects']} subjects, micro {result['mmlu_micro_acc']:.4f} over {result['n_questions']} "
        f"questions, {result['n_truncated']} prompts truncated to {result['max_length']} tokens"
    )


# --- qlora eval --mmlu DIR / python -m backends.app.mmlu ------------------------------------------------------------


def run_eval(c) -> int:
    """``qlora eval --mmlu DIR``: c is the EvalConfig (model, adapter, backend, mmlu, mmlu_split, shots, subjects as
    one comma-separated string, batch_size, max_examples = questions per subject, mmlu_out, json, progress)."""
    from .config import ModelConfig
    from .model import load_with_adapter, resolve_model_path

    path = resolve_model_path(c.model)
    model, tokenizer = load_with_adapter(ModelConfig(backend=c.backend, dropout=0.0), path, c.adapter)
    subjects = [t.strip() for t in c.subjects.split(",") if t.strip()] or None
    result = evaluate_mmlu(model, tokenizer, c.mmlu, split=c.mmlu_split, shots=c.shots, subjects=subjects,
                           batch_size=c.batch_size, max_questions=c.max_examples, progress=c.progress)  # fmt: skip
    result = {"model": path, "adapter": c.adapter, **result}
    write_outputs(result, c.mmlu_out, Path(c.mmlu_out).with_suffix(".png"))
    print(format_summary(result) + f"; wrote {c.mmlu_out} and {Path(c.mmlu_out).with_suffix('.png')}")
    if c.json:
        print(json.dumps({k: v for k, v in result.items() if k != "per_subject"}))
    return 0


# --- python -m backends.app.mmlu (the same without the qlora command line) ----------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m backends.app.mmlu", description=__doc__.split("\n\n")[0])
    p.add_argument("mmlu_dir", help="folder with dev/ (and test/ or val/) MMLU CSVs")
    p.add_argument("--model", default="smollm2", help="HF model dir, .gguf file, or 'smollm2'")
    p.add_argument("--adapter", default=None, help="PEFT adapter dir; none = the base")
    p.add_argument("--no-quant", action="store_true", help="score the unquantized (16/32-bit) model, not NF4")
    p.add_argument("--split", default="test", choices=SPLITS, help="questions scored (dev: leave-one-out shots)")
    p.add_argument("--shots", type=int, default=5, help="dev examples in front of each question")
    p.add_argument("--subjects", nargs="*", default=None, help="subjects to score (default: all)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", default="mmlu.json", help="JSON result; the PNG goes beside it")
    args = p.parse_args(argv)
    from .config import ModelConfig
    from .model import load_with_adapter, resolve_model_path

    path = resolve_model_path(args.model)
    if args.no_quant:
        from backends.torchlib.load import load_model, load_tokenizer

        model, tokenizer = load_model(path, prepare=False), load_tokenizer(path)
    else:
        model, tokenizer = load_with_adapter(ModelConfig(dropout=0.0), path, args.adapter)
    result = evaluate_mmlu(model, tokenizer, args.mmlu_dir, split=args.split, shots=args.shots,
                           subjects=args.subjects, batch_size=args.batch_size)  # fmt: skip
    write_outputs(result, args.out, Path(args.out).with_suffix(".png"))
    print(format_summary(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
