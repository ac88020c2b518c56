"""``qlora generate``: prompts wrapped in the template the adapter was trained with, answered greedily; with
``--prompts FILE.jsonl --out answers.jsonl`` a whole prompt file (e.g. the OASST1 questions the paper's Guanaco
evaluation answers) for side-by-side judging.

Templates (``--template``; ``auto`` = the adapter's run's ``config.json["resolved"]["prompt_template"]``, which
finetune records from its data, else ``chat``):

    guanaco   "### Human: {q} ### Assistant:"       (OASST1; a prompt already in this form, as the OASST files store
                                                     their conversations, is used as it is)
    alpaca    qlora.py's Alpaca prompt ("... ### Instruction:\\n{q}\\n\\n### Response: "; with the record's input)
    chat      the model's chat template, if it has one (SmolLM2-Instruct does), else guanaco (task.format_prompt)
    none      the prompt as given

A prompt file: one JSON object per line; the prompt is the first of ``PROMPT_FIELDS`` a record has (or
``--prompt-field``), its id the first of ``ID_FIELDS``.  Every line is checked before the model loads: a missing file,
a line that is not a JSON object, a record without the prompt field, an empty file end in one line (exit 2) and
nothing is written.  The answers (one line per prompt: id, prompt, answer, n_tokens = tokens generated before the end
token) are written to a temporary file beside ``<out>`` and renamed into place when all are done
(backends/torchlib/files.py write_jsonl).

Decoders (``decoder_of``): on the CPU, and with ``--cuda-graphs off``, transformers' ``model.generate`` (greedy, its
dynamic KV cache).  With ``--backend cupy`` (``--cuda-graphs auto``, the default) backends.torchlib.decode: a static
KV cache of prompt + max_new_tokens columns, the prompt prefilled eagerly, then the one-token decode step captured
once as a CUDA graph and replayed per token (eager, with one line on stderr saying why, when it cannot be captured).
Both decode greedily with the same end-token and padding rules, and give the same tokens in the CPU tests
(tests/torchlib/test_decode.py); in bf16 the static cache's masked columns may round the attention differently, so
a near-tie can break the other way.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from .config import UsageError
from .data import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, ASSISTANT_TAG, HUMAN_TAG, DataError, jsonl_records

PROMPT_FIELDS = ("instruction", "text", "input", "prompt", "question")  # Alpaca, OASST, prompt-completion, plain
ID_FIELDS = ("id", "question_id", "message_id")


# --- reading ------------------------------------------------------------------------------------------------------


def read_prompts(path: str, field: str = "auto") -> list[dict]:
    """[{"id"?, "prompt", "record"}] for every non-blank line of a .jsonl file (module docstring)."""
    fields = PROMPT_FIELDS if field == "auto" else (field,)
    out = []
    for lineno, rec in jsonl_records(path, expected="a .jsonl file of prompts"):
        name = next((f for f in fields if isinstance(rec.get(f), str) and rec[f].strip()), None)
        if name is None:
            raise DataError(f"{path}:{lineno}: no prompt field (a non-empty string in {' or '.join(fields)})")
        item = {"prompt": rec[name], "record": rec, "field": name}
        ident = next((rec[f] for f in ID_FIELDS if f in rec), None)
        if ident is not None:
            item["id"] = ident
        out.append(item)
    if not out:
        raise DataError(f"{path}: no prompts (the file is empty)")
    return out


# --- templates ----------------------------------------------------------------------------------------------------


def run_template(adapter: str | None) -> str:
    """The template the adapter's run trained with (its ../config.json), else 'chat'."""
    if adapter:
        config = os.path.join(os.path.dirname(os.path.abspath(adapter)), "config.json")
        if os.path.isfile(config):
            try:
                with open(config) as f:
                    return json.load(f).get("resolved", {}).get("prompt_template") or "chat"
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                pass  # not a run's config: fall back
    return "chat"


def wrap(template: str, prompt: str, tokenizer, record: dict | None = None) -> str:
    """The prompt as the model sees it (module docstring)."""
    if template == "none":
        return prompt
    if template == "guanaco":
        if prompt.startswith(HUMAN_TAG) and prompt.rstrip().endswith(ASSISTANT_TAG):
            return prompt  # already an OASST conversation
        return f"{HUMAN_TAG} {prompt} {ASSISTANT_TAG}"
    if template == "alpaca":
        inp = (record or {}).get("input") if "instruction" in (record or {}) else None
        if isinstance(inp, str) and inp:
            return ALPACA_PROMPT.format(instruction=prompt, input=inp)
        return ALPACA_PROMPT_NO_INPUT.format(instruction=prompt)
    if template == "chat":
        from .task import format_prompt

        return format_prompt(tokenizer, prompt)
    raise ValueError(f"unknown prompt template {template!r}")


# --- generating ---------------------------------------------------------------------------------------------------

DECODERS = ("generate", "static", "graph")  # transformers' generate; static KV cache eager; static + CUDA graph


def decoder_of(c) -> str:
    """The decoder a generate config asks for (module docstring): 'graph' for --backend cupy unless --cuda-graphs
    off, else 'generate' (the CPU path, unchanged)."""
    return "graph" if c.backend == "cupy" and c.cuda_graphs != "off" else "generate"


def _say_once():
    """A ``say`` for the decoder: each distinct line once on stderr (a prompt file decodes many batches)."""
    said: set[str] = set()

    def say(line: str) -> None:
        if line not in said:
            said.add(line)
            print(f"qlora: {line}", file=sys.stderr, flush=True)

    return say


def _left_padded(tokenizer, prompts: list[str], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    T = max(len(i) for i in ids)
    input_ids = torch.tensor([[pad_id] * (T - len(i)) + list(i) for i in ids], device=device)  # (B, T)
    mask = torch.tensor([[0] * (T - len(i)) + [1] * len(i) for i in ids], device=device)  # (B, T)
    return input_ids, mask


def _static_tokens(model, input_ids, mask, *, max_new_tokens, eos, pad_id, decoder, say, on_token=None):
    """(B, <= max_new_tokens) new tokens from backends.torchlib.decode (decoder 'static' or 'graph')."""
    from backends.torchlib.decode import greedy_decode

    out = greedy_decode(model, input_ids, mask, max_new_tokens=max_new_tokens, eos_token_id=eos,
                        pad_token_id=pad_id, capture=decoder == "graph", say=say, on_token=on_token)  # fmt: skip
    return out.tokens


@torch.no_grad()
def answer(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    progress: bool,
    decoder: str = "generate",
):
    """[(answer text, n_tokens)] by greedy decoding (left-padded batches, KV cache); the bar counts prompts.
    n_tokens: the tokens generated before the end token (at most max_new_tokens).  ``decoder``: one of DECODERS
    (module docstring); every one gives the same tokens."""
    from .evaluate import model_device, pad_id_of, progress_bar

    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    was_training = model.training
    model.eval()
    device, pad_id, eos = model_device(model), pad_id_of(tokenizer), tokenizer.eos_token_id
    say = _say_once()
    out: list[tuple[str, int]] = []
    with progress_bar(len(prompts), progress, "generate", unit="prompt") as bar:
        for k in range(0, len(prompts), batch_size):
            input_ids, mask = _left_padded(tokenizer, prompts[k : k + batch_size], pad_id, device)  # (B, T) each
            T = input_ids.shape[1]
            if decoder == "generate":
                gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=pad_id, eos_token_id=eos,
                                     use_cache=True)[:, T:]  # fmt: skip
            else:
                gen = _static_tokens(model, input_ids, mask, max_new_tokens=max_new_tokens, eos=eos, pad_id=pad_id,
                                     decoder=decoder, say=say)  # fmt: skip
            for row in gen.tolist():  # (B, <= max_new_tokens)
                n = row.index(eos) if eos in row else len(row)
                out.append((tokenizer.decode(row[:n], skip_special_tokens=True), n))
            bar.update(len(input_ids))
    model.train(was_training)
    return out


@torch.no_grad()
def generate_texts(c, model, tokenizer, prompts: list[str]) -> list[str]:
    """--prompt's answers, each the decoded continuation without special tokens; the bar counts tokens.  The
    'generate' decoder is evaluate.generate (the CPU path, unchanged); the others decode the same tokens here."""
    from .evaluate import generate, model_device, pad_id_of, progress_bar

    decoder = decoder_of(c)
    if decoder == "generate":
        return generate(model, tokenizer, prompts, max_new_tokens=c.max_new_tokens, progress=c.progress)
    was_training = model.training
    model.eval()
    pad_id = pad_id_of(tokenizer)
    input_ids, mask = _left_padded(tokenizer, prompts, pad_id, model_device(model))  # (B, T) each
    with progress_bar(c.max_new_tokens, c.progress, "generate", unit="token") as bar:
        gen = _static_tokens(model, input_ids, mask, max_new_tokens=c.max_new_tokens, eos=tokenizer.eos_token_id,
                             pad_id=pad_id, decoder=decoder, say=_say_once(),
                             on_token=lambda n: bar.update(1))  # fmt: skip
    model.train(was_training)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in gen.tolist()]


# --- writing ------------------------------------------------------------------------------------------------------


def precheck_out(out: str, overwrite: bool) -> None:
    """Before anything slow: --out is a writable file path, refused if it exists unless --overwrite."""
    if not out:
        raise UsageError("--prompts needs --out FILE.jsonl (where the answers go)")
    if os.path.isdir(out):
        raise UsageError(f"--out {out!r} is a directory; give a .jsonl file path")
    if os.path.exists(out) and not overwrite:
        raise UsageError(f"{out!r} already exists; pass --overwrite to replace it, or choose another --out")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise UsageError(f"--out {out!r}: the folder {parent!r} does not exist")


def answer_file(c, model, tokenizer, template: str, items: list[dict]) -> list[dict]:
    """The rows of answers.jsonl for the prompt file's ``items`` (read_prompts), in file order."""
    texts = [wrap(template, it["prompt"], tokenizer, it["record"]) for it in items]
    answers = answer(model, tokenizer, texts, max_new_tokens=c.max_new_tokens, batch_size=c.batch_size,
                     progress=c.progress, decoder=decoder_of(c))  # fmt: skip
    rows = []
    for it, (text, n) in zip(items, answers, strict=True):
        row = {"id": it["id"]} if "id" in it else {}
        rows.append({**row, "prompt": it["prompt"], "answer": text, "n_tokens": n})
    return rows
