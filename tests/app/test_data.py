"""Data: the three formats on the real files in ../shared/data, prompt masking with SmolLM2's own tokenizer,
group-by-length batching, the resumable batch stream, and the error messages for bad input.

Real files (shared/data/README.md): alpaca/alpaca_5000.json (5,000 records, 1,943 with a non-empty input) and
oasst/oa_questions.jsonl (953 records of {"input": "### Human: ... ### Assistant:", "output": ...}).
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from backends.app.batching import BatchStream, collate, length_grouped_order, random_order
from backends.app.data import (
    ALPACA_PROMPT,
    IGNORE_INDEX,
    DataError,
    Example,
    TokenizedExample,
    read_examples,
    split_eval,
    tokenize_examples,
)
from backends.app.task import ReverseTask, format_prompt, is_correct, make_task, normalize


@pytest.fixture(scope="module")
def alpaca(shared_dir):
    return read_examples(str(shared_dir / "data" / "alpaca" / "alpaca_5000.json"))


@pytest.fixture(scope="module")
def oasst_path(shared_dir):
    return str(shared_dir / "data" / "oasst" / "oa_questions.jsonl")


# --- formats on the real files ---------------------------------------------------------------------------------


def test_alpaca_real_file_formats(alpaca, shared_dir):
    raw = json.loads((shared_dir / "data" / "alpaca" / "alpaca_5000.json").read_text())
    assert len(alpaca) == len(raw) == 5000
    with_input = [e for e in alpaca if "### Input:" in e.prompt]
    assert len(with_input) == 1943  # README: 1,943 records have a non-empty input
    for ex, rec in zip(alpaca[:50], raw[:50], strict=True):
        assert ex.completion == rec["output"]
        assert rec["instruction"] in ex.prompt and ex.prompt.endswith("### Response: ")
        if rec["input"]:
            assert ex.prompt == ALPACA_PROMPT.format(instruction=rec["instruction"], input=rec["input"])


def test_oasst_real_file_formats(oasst_path):
    examples = read_examples(oasst_path)
    assert len(examples) == 953
    for ex in examples:
        assert ex.prompt.startswith("### Human:") and ex.prompt.endswith("### Assistant:")
        assert ex.completion.strip()


def test_oasst_text_field_and_prompt_completion(tmp_path):
    p = tmp_path / "chat.jsonl"
    p.write_text(
        json.dumps({"text": "### Human: hi ### Assistant: hello ### Human: 2+2? ### Assistant: 4"})
        + "\n\n"
        + json.dumps({"prompt": "Q: a", "completion": " A: b"})
        + "\n"
    )
    a, b = read_examples(str(p))
    assert a == Example("### Human: hi ### Assistant: hello ### Human: 2+2? ### Assistant:", " 4")
    assert b == Example("Q: a", " A: b")


# --- tokenization and masking ----------------------------------------------------------------------------------


def test_labels_mask_the_prompt_with_the_real_tokenizer(alpaca, tokenizer):
    data = tokenize_examples(alpaca[:64], tokenizer, max_len=2048)
    eos = tokenizer.eos_token_id
    for ex, t in zip(alpaca[:64], data, strict=True):
        n_prompt = len(tokenizer(ex.prompt)["input_ids"])
        assert t.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt  # no loss on the prompt
        assert t.labels[n_prompt:] == t.input_ids[n_prompt:]  # loss on every response token ...
        assert t.input_ids[-1] == eos  # ... and on the end token
        assert tokenizer.decode(t.input_ids[n_prompt:-1]) == ex.completion
    full = tokenize_examples(alpaca[:4], tokenizer, max_len=2048, train_on_source=True)
    assert all(t.labels == t.input_ids for t in full)


def test_too_long_sequence_is_an_error_naming_the_example(alpaca, tokenizer):
    lengths = [len(t) for t in tokenize_examples(alpaca[:20], tokenizer, max_len=4096)]
    limit = sorted(lengths)[10]
    first_bad = next(i for i, n in enumerate(lengths) if n > limit)
    with pytest.raises(DataError, match=rf"example {first_bad} is {lengths[first_bad]} tokens.*--max-len {limit}"):
        tokenize_examples(alpaca[:20], tokenizer, max_len=limit)
    with pytest.raises(DataError, match="model's limit of 32 positions"):
        tokenize_examples(alpaca[:20], tokenizer, max_len=4096, model_max=32)


def test_collate_pads_right_and_masks_padding():
    batch = [TokenizedExample([5, 6, 7], [IGNORE_INDEX, 6, 7]), TokenizedExample([1, 2], [IGNORE_INDEX, 2])]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [1, 2, 0]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, 2, IGNORE_INDEX]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert out["input_ids"].dtype == torch.long


# --- batching --------------------------------------------------------------------------------------------------


def _padding(batches, lengths):
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_group_by_length_covers_everything_once_and_pads_less(alpaca):
    lengths = [len(e.prompt) + len(e.completion) for e in alpaca]  # characters: a proxy, same code path
    grouped = length_grouped_order(lengths, 16, random.Random(0))
    flat = sorted(i for b in grouped for i in b)
    assert flat == list(range(len(alpaca)))
    assert all(len(b) <= 16 for b in grouped)
    shuffled = random_order(len(alpaca), 16, random.Random(0))
    assert _padding(grouped, lengths) < 0.3 * _padding(shuffled, lengths)
    assert grouped == length_grouped_order(lengths, 16, random.Random(0))  # deterministic
    assert grouped != length_grouped_order(lengths, 16, random.Random(1))


def test_batch_stream_resumes_from_its_position():
    data = [TokenizedExample([1] * n, [1] * n) for n in range(1, 23)]
    a = BatchStream(data, 4, seed=3)
    for _ in range(9):  # 6 batches an epoch: crosses into epoch 1
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(8)]
    b = BatchStream(data, 4, seed=3)
    b.load_state_dict(json.loads(json.dumps(state)))  # survives JSON
    assert [b.next_batch() for _ in range(8)] == expected
    with pytest.raises(DataError, match="same data and --seed"):
        BatchStream(data[:-1], 4, seed=3).load_state_dict(state)


def test_split_eval_is_deterministic_and_disjoint():
    items = list(range(100))
    tr, ev = split_eval(items, 0.1, seed=0)
    assert len(ev) == 10 and sorted(tr + ev) == items
    assert split_eval(items, 0.1, seed=0) == (tr, ev)


# --- errors ----------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        read_examples(str(tmp_path / "nope.jsonl"))


def test_malformed_json_line_names_the_line(tmp_path, oasst_path):
    with open(oasst_path, encoding="utf-8") as f:
        lines = [next(f) for _ in range(5)]
    p = tmp_path / "broken.jsonl"
    p.write_text("".join(lines) + '{"input": "### Human: hi", "output": \n' + lines[0], encoding="utf-8")
    with pytest.raises(DataError, match=r"broken.jsonl:6: malformed JSON line"):
        read_examples(str(p))


def test_empty_dataset(tmp_path):
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n\n  \n"), ("empty.json", "[]")):
        p = tmp_path / name
        p.write_text(text)
        with pytest.raises(DataError, match="empty dataset"):
            read_examples(str(p))
    with pytest.raises(DataError, match="empty dataset"):
        tokenize_examples([], None, max_len=16)


def test_unknown_fields_and_bad_types(tmp_path):
    p = tmp_path / "odd.jsonl"
    p.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    with pytest.raises(DataError, match="cannot tell the data format"):
        read_examples(str(p))
    p.write_text(json.dumps({"prompt": "a", "completion": 3}) + "\n")
    with pytest.raises(DataError, match="'completion' must be a string"):
        read_examples(str(p))
    p.write_text("[1, 2]")
    with pytest.raises(DataError, match="record 0 is a int"):
        read_examples(str(p))


# --- the generated task ----------------------------------------------------------------------------------------


def test_task_is_deterministic_held_out_and_correct(tokenizer):
    train, ev = make_task(tokenizer, n_train=300, n_eval=40, seed=5)
    train2, ev2 = make_task(tokenizer, n_train=300, n_eval=40, seed=5)
    assert train == train2 and ev == ev2
    assert make_task(tokenizer, n_train=300, n_eval=40, seed=6)[1] != ev
    assert not {e.prompt for e in ev} & {e.prompt for e in train}  # held out
    assert len({e.prompt for e in ev}) == 40
    for e in train + ev:
        question = e.prompt.split("Reverse the list: ")[1].split("<|im_end|>")[0]
        assert e.answer == e.completion == " ".join(reversed(question.split()))
        assert ReverseTask.min_items <= len(e.answer.split()) <= ReverseTask.max_items
    assert ev[0].prompt == format_prompt(tokenizer, ev[0].prompt.split("user\n")[1].split("<|im_end|>")[0])


def test_exact_match_scoring():
    assert is_correct(" 3 2 1\nmore text", "3 2 1")
    assert is_correct("\n\n3 2 1  ", "3 2 1")
    assert not is_correct("The reversed list is 3 2 1", "3 2 1")
    assert not is_correct("3 2 1 0", "3 2 1")
    assert normalize("") == ""
