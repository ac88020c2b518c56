"""Instruction data: read, format, tokenize with the model's own tokenizer, mask the prompt (batches: batching.py).

Formats (all give ``Example(prompt, completion)``; the loss goes on the completion only, as in QLoRA's Guanaco runs):

    alpaca             .json array of {"instruction", "input", "output"}  -> the Alpaca prompt (qlora.py's
                       ALPACA_PROMPT_DICT) + output
    oasst              .jsonl, {"input": "### Human: ... ### Assistant:", "output": ...}   or
                       {"text": "### Human: ... ### Assistant: ..."} (split at the last "### Assistant:"); both give
                       the same text, "### Human: {q} ### Assistant: {a}" (a space after the tag, as in the
                       earlier turns of a conversation: completion = " " + output)
    prompt-completion  .jsonl, {"prompt": ..., "completion": ...}

Tokenization (one example, T tokens):

    input_ids = tok(prompt) + tok(completion) + [eos]                       (T,)
    labels    = [-100] * len(tok(prompt)) + tok(completion) + [eos]         (T,)   -100 = ignored by the loss

OASST conversations with ``assistant_turns`` (the Guanaco recipe): the loss goes on every assistant turn, the earlier
ones inside the prompt too, and on no human turn.  The prompt is tokenized piece by piece at the turn boundaries,

    "### Human: q1 ### Assistant:" | " a1" | " ### Human: q2 ### Assistant:"  + completion " a2" + [eos]
     masked (-100)                   loss    masked                              loss

so the decoded tokens are the conversation byte for byte and every label is either a human piece's -100 or an
assistant piece's own token.

Length policy (``LengthPolicy``; as the QLoRA repository's ``qlora.py``: ``source_max_len``, ``target_max_len``,
truncation on; limit L = min(--max-len, the model's positions)):

    prompt     = tok(prompt)[:source_max_len]                   (the first tokens kept, as qlora.py's truncation)
    completion = (tok(completion) + [eos])[:target_max_len]
    if len(prompt) + len(completion) > L:                       (L is ours: qlora.py has no total limit)
        prompt     = prompt[:max(L - len(completion), L // 2)]   the prompt keeps at least half of L,
        completion = completion[:L - len(prompt)]               the response the rest (at least one token)

An example is "long" if any of these cuts it; it is cut (the default) or skipped (``drop_long``).
``LengthCounts`` tells how many were cut and dropped.  Without a policy a long example is an error.

Every problem with the input is a ``DataError`` (a ValueError) naming the file, the line or example, and what to do.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

IGNORE_INDEX = -100

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: "
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response: "
)
ASSISTANT_TAG = "### Assistant:"
HUMAN_TAG = "### Human:"


class DataError(ValueError):
    """Bad training/eval data: missing file, malformed line, empty set, an example too long for the model."""


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str
    answer: str | None = None  # the exact-match target, for generated tasks


@dataclass(frozen=True)
class LengthPolicy:
    """What to do with an example longer than its limits (module docstring): cut it (default) or drop it."""

    source_max_len: int = 256
    target_max_len: int = 256
    drop_long: bool = False


@dataclass
class LengthCounts:
    """How many examples a length policy cut and dropped, out of ``total``."""

    total: int = 0
    cut: int = 0
    dropped: int = 0

    def line(self, source: str, policy: LengthPolicy, limit: int) -> str:
        how = f"--source-max-len {policy.source_max_len}, --target-max-len {policy.target_max_len}, limit {limit}"
        return f"{source}: {self.cut} of {self.total} examples cut, {self.dropped} dropped ({how})"


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_target(self) -> int:
        return sum(1 for v in self.labels if v != IGNORE_INDEX)


# --- reading ---------------------------------------------------------------------------------------------------


def check_data_file(path: str, expected: str = "a .json or .jsonl file") -> None:
    """A readable data file, or a DataError naming it: not found, or a directory."""
    if not os.path.exists(path):
        raise DataError(f"data file not found: {path!r}")
    if os.path.isdir(path):
        raise DataError(f"data path {path!r} is a directory; expected {expected}")


def read_text(path: str, expected: str = "a .json or .jsonl file") -> str:
    """The whole file as UTF-8 text; a binary or otherwise non-UTF-8 file is a DataError naming it."""
    check_data_file(path, expected)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); expected {expected}") from None


def jsonl_records(path: str, expected: str = "a .json or .jsonl file") -> list[tuple[int, dict]]:
    """(1-based line number, object) for every non-blank line; a line that is not a JSON object is a DataError
    naming the file and the line."""
    records = []
    for lineno, line in enumerate(read_text(path, expected).split("\n"), 1):  # text mode: \r\n, \r read as \n
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        records.append((lineno, rec))
    return records


def read_jsonl(path: str) -> list[dict]:
    """One JSON object per non-blank line; a bad line is reported by its 1-based number."""
    return [rec for _, rec in jsonl_records(path)]


def read_json_array(path: str) -> list[dict]:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: record {i} is a {type(rec).__name__}, expected a JSON object")
    return data


def _require_str(rec: dict, key: str, where: str) -> str:
    v = rec.get(key)
    if not isinstance(v, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
    return v


def detect_format(rec: dict) -> str:
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    if "completion" in rec and "prompt" in rec:
        return "prompt-completion"
    if ("input" in rec and "output" in rec) or "text" in rec:
        return "oasst"
    raise DataError(
        f"cannot tell the data format from the fields {sorted(rec)[:8]}; expected alpaca (instruction/input/output), "
        "oasst (input/output or text with '### Assistant:') or prompt-completion (prompt/completion)"
    )


def to_example(rec: dict, fmt: str, where: str) -> Example:
    if fmt == "alpaca":
        instruction = _require_str(rec, "instruction", where)
        inp = rec.get("input", "") or ""
        template = ALPACA_PROMPT if inp else ALPACA_PROMPT_NO_INPUT
        return Example(template.format(instruction=instruction, input=inp), _require_str(rec, "output", where))
    if fmt == "prompt-completion":
        return Example(_require_str(rec, "prompt", where), _require_str(rec, "completion", where))
    if fmt == "oasst":
        if "input" in rec and "output" in rec:
            prompt, completion = _require_str(rec, "input", where), _require_str(rec, "output", where)
            if prompt.endswith(ASSISTANT_TAG) and completion[:1] not in ("", " ", "\n"):
                completion = " " + completion  # the conversation's text: "### Assistant: {a}", as the text form
            return Example(prompt, completion)
        text = _require_str(rec, "text", where)
        cut = text.rfind(ASSISTANT_TAG)
        if cut < 0 or not text[cut + len(ASSISTANT_TAG) :].strip():
            raise DataError(f"{where}: 'text' has no '{ASSISTANT_TAG}' followed by a response to train on")
        cut += len(ASSISTANT_TAG)
        return Example(text[:cut], text[cut:])
    raise DataError(f"unknown data format {fmt!r}; use alpaca, oasst or prompt-completion")


def read_examples(path: str, fmt: str = "auto") -> list[Example]:
    """Alpaca .json array or .jsonl (oasst / prompt-completion) -> examples; empty input is an error."""
    is_array = read_text(path).lstrip().startswith("[")
    records = read_json_array(path) if is_array else read_jsonl(path)
    if not records:
        raise DataError(f"{path}: empty dataset (no records)")
    examples = []
    for i, rec in enumerate(records):
        where = f"{path}: record {i}" if is_array else f"{path}: record {i} (non-blank line {i + 1})"
        f_i = detect_format(rec) if fmt == "auto" else fmt
        examples.append(to_example(rec, f_i, where))
    return examples


PROMPT_TEMPLATE_OF_FORMAT = {"alpaca": "alpaca", "oasst": "guanaco", "prompt-completion": "none"}


def prompt_template_of(path: str, fmt: str = "auto") -> str:
    """The prompt template a data file's examples are in (answers.py applies it to new questions): by its format,
    from the first record's fields when ``fmt`` is auto."""
    if fmt == "auto":
        is_array = read_text(path).lstrip().startswith("[")
        records = read_json_array(path) if is_array else read_jsonl(path)
        fmt = detect_format(records[0]) if records else "prompt-completion"
    return PROMPT_TEMPLATE_OF_FORMAT[fmt]


# --- tokenization ----------------------------------------------------------------------------------------------


def model_max_length(model) -> int | None:
    """The longest sequence the model's position embeddings allow (None if it does not say)."""
    cfg = getattr(model, "config", None)
    return getattr(cfg, "max_position_embeddings", None)


def oasst_pieces(prompt: str) -> list[tuple[str, bool]]:
    """An OASST prompt cut at its turn boundaries into (text, is_assistant) pieces that concatenate to ``prompt``
    (module docstring): a human piece runs from its "### Human:" (with the space before it) through the next
    "### Assistant:"; an assistant piece is the text after that tag up to the next human piece."""
    if not prompt.startswith(HUMAN_TAG) or not prompt.rstrip().endswith(ASSISTANT_TAG):
        raise ValueError(f"not an OASST conversation ('{HUMAN_TAG} ... {ASSISTANT_TAG}'): {prompt[:60]!r}")
    pieces, pos = [], 0
    while pos < len(prompt):
        tag = prompt.find(ASSISTANT_TAG, pos)
        if tag < 0:  # nothing but whitespace is left (the check above)
            pieces[-1] = (pieces[-1][0] + prompt[pos:], False)
            break
        end = tag + len(ASSISTANT_TAG)
        pieces.append((prompt[pos:end], False))
        nxt = prompt.find(HUMAN_TAG, end)
        nxt = len(prompt) if nxt < 0 else nxt - (prompt[nxt - 1] == " ")  # the space before the tag: the human's
        if prompt[end:nxt].strip():
            pieces.append((prompt[end:nxt], True))
        else:  # an empty turn (or the prompt's trailing space) stays with the human piece
            pieces[-1] = (pieces[-1][0] + prompt[end:nxt], False)
        pos = nxt
    return pieces


def _token_ids(ex: Example, tokenizer, assistant_turns: bool = False) -> tuple[list[int], list[int], list[int]]:
    """(tok(prompt) with the tokenizer's special tokens, its labels, tok(completion) + [eos]).  The prompt's labels
    are all -100, or with ``assistant_turns`` its assistant pieces' own ids (``oasst_pieces``)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos token; cannot mark the end of a response")
    completion_ids = tokenizer(ex.completion, add_special_tokens=False)["input_ids"] + [eos]
    if not assistant_turns:
        prompt_ids = list(tokenizer(ex.prompt, add_special_tokens=True)["input_ids"])
        return prompt_ids, [IGNORE_INDEX] * len(prompt_ids), list(completion_ids)
    prompt_ids, prompt_labels = [], []
    for k, (text, is_assistant) in enumerate(oasst_pieces(ex.prompt)):
        ids = list(tokenizer(text, add_special_tokens=k == 0)["input_ids"])
        prompt_ids += ids
        prompt_labels += ids if is_assistant else [IGNORE_INDEX] * len(ids)
    return prompt_ids, prompt_labels, list(completion_ids)


def _assemble(
    prompt_ids: list[int], prompt_labels: list[int], completion_ids: list[int], train_on_source: bool
) -> TokenizedExample:
    input_ids = prompt_ids + completion_ids
    labels = input_ids.copy() if train_on_source else prompt_labels + completion_ids
    return TokenizedExample(input_ids, labels)


def tokenize_example(
    ex: Example, tokenizer, *, train_on_source: bool = False, assistant_turns: bool = False
) -> TokenizedExample:
    return _assemble(*_token_ids(ex, tokenizer, assistant_turns), train_on_source)


def tokenize_examples(
    examples: list[Example],
    tokenizer,
    *,
    max_len: int,
    model_max: int | None = None,
    train_on_source: bool = False,
    source: str = "data",
    policy: LengthPolicy | None = None,
    counts: LengthCounts | None = None,
    assistant_turns: bool = False,
) -> list[TokenizedExample]:
    """Tokenize all, limit L = min(max_len, model_max).  With a ``policy`` a long example is cut or dropped (module
    docstring; ``counts`` receives how many); without one, an example longer than L is an error.  ``assistant_turns``:
    OASST conversations, the loss on every assistant turn (module docstring)."""
    if not examples:
        raise DataError(f"{source}: empty dataset (no examples)")
    limit = max_len if model_max is None else min(max_len, model_max)
    counts = LengthCounts() if counts is None else counts
    out = []
    for i, ex in enumerate(examples):
        try:
            prompt_ids, prompt_labels, completion_ids = _token_ids(ex, tokenizer, assistant_turns)
        except ValueError as e:
            raise DataError(f"{source}: example {i}: {e}; the loss on assistant turns needs OASST text") from None
        n = len(prompt_ids) + len(completion_ids)
        counts.total += 1
        if policy is not None:
            p, c = prompt_ids[: policy.source_max_len], completion_ids[: policy.target_max_len]
            if len(p) + len(c) > limit:
                p = p[: max(limit - len(c), limit // 2)]
                c = c[: limit - len(p)]
            if len(p) < len(prompt_ids) or len(c) < len(completion_ids):  # a long example
                if policy.drop_long:
                    counts.dropped += 1
                    continue
                counts.cut += 1
                prompt_ids, prompt_labels, completion_ids = p, prompt_labels[: len(p)], c
        elif n > limit:
            who = f"the model's limit of {model_max} positions" if model_max is not None and n > model_max else ""
            raise DataError(
                f"{source}: example {i} is {n} tokens, longer than "
                + (who or f"--max-len {max_len}")
                + "; shorten or drop it, or raise --max-len"
                + (f" (the model allows at most {model_max})" if model_max is not None else "")
            )
        t = _assemble(prompt_ids, prompt_labels, completion_ids, train_on_source)
        if t.n_target == 0:
            raise DataError(f"{source}: example {i} has no response tokens to train on")
        out.append(t)
    if not out:
        raise DataError(f"{source}: every one of the {counts.total} examples is too long and was dropped; "
                        "raise --max-len / --source-max-len / --target-max-len or leave out --drop-long")  # fmt: skip
    return out


def text_chunks(path: str, tokenizer, seq_len: int, max_chunks: int = 0) -> list[TokenizedExample]:
    """A plain text file as consecutive seq_len-token chunks, every token scored (perplexity)."""
    text = read_text(path, expected="a text file (.txt) or a .json / .jsonl data file")
    if not text.strip():
        raise DataError(f"{path}: empty dataset (no text)")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    chunks = [ids[k : k + seq_len] for k in range(0, len(ids) - 1, seq_len)]
    chunks = [c for c in chunks if len(c) > 1]
    if max_chunks:
        chunks = chunks[:max_chunks]
    return [TokenizedExample(list(c), list(c)) for c in chunks]


def split_eval(data: list, fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic held-out split: (train, eval); eval is at least one example when fraction > 0."""
    if fraction <= 0 or len(data) < 2:
        return data, []
    idx = list(range(len(data)))
    random.Random(f"split-{seed}").shuffle(idx)
    n_eval = max(1, int(round(len(data) * fraction)))
    ev = set(idx[:n_eval])
    return [d for i, d in enumerate(data) if i not in ev], [d for i, d in enumerate(data) if i in ev]
