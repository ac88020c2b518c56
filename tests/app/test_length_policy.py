"""The data pipeline's length policy (data.py, as qlora.py's source_max_len / target_max_len with truncation):
long examples are cut by default or skipped with --drop-long, counted either way; the real Alpaca and OASST1 files
get through tokenization with the default flags."""

from __future__ import annotations

import pytest

from backends.app.cli import finetune_config_from_argv
from backends.app.data import IGNORE_INDEX, DataError, Example, LengthCounts, LengthPolicy, tokenize_examples
from backends.app.datasets import Datasets

BOS, EOS = 1, 2


class CharTokenizer:
    """One token per character (its code point + 10), BOS in front with special tokens: lengths are known exactly."""

    eos_token_id = EOS

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": ([BOS] if add_special_tokens else []) + [ord(c) + 10 for c in text]}


def ids(text: str) -> list[int]:
    return [ord(c) + 10 for c in text]


def test_a_long_prompt_or_response_is_cut_to_its_limit_and_counted():
    tok, policy = CharTokenizer(), LengthPolicy(source_max_len=4, target_max_len=3)
    examples = [Example("ab", "c"), Example("abcdef", "x"), Example("a", "wxyz")]  # fits, long prompt, long response
    counts = LengthCounts()
    out = tokenize_examples(examples, tok, max_len=100, policy=policy, counts=counts)
    assert (counts.total, counts.cut, counts.dropped) == (3, 2, 0)
    assert out[0].input_ids == [BOS, *ids("ab"), *ids("c"), EOS]  # untouched
    assert out[1].input_ids == [BOS, *ids("abc"), *ids("x"), EOS]  # prompt: its first 4 tokens, BOS included
    assert out[1].labels == [IGNORE_INDEX] * 4 + [*ids("x"), EOS]
    assert out[2].input_ids == [BOS, *ids("a"), *ids("wxy")]  # response: its first 3 tokens (the EOS cut, as qlora.py)
    assert "2 of 3 examples cut, 0 dropped" in counts.line("f.json", policy, 100)


def test_the_total_limit_leaves_the_prompt_half_and_the_response_the_rest():
    tok, policy = CharTokenizer(), LengthPolicy(source_max_len=50, target_max_len=50)
    counts = LengthCounts()
    examples = [Example("abc", "wxyz"), Example("abcdefgh", "z"), Example("a", "b")]
    out = tokenize_examples(examples, tok, max_len=6, policy=policy, counts=counts)
    assert out[0].input_ids == [BOS, *ids("ab"), *ids("wxy")]  # 4 + 5 tokens: the prompt keeps 6 // 2, the response 3
    assert out[1].input_ids == [BOS, *ids("abc"), *ids("z"), EOS]  # 9 + 2: the prompt keeps 6 - 2, the response all
    assert out[2].input_ids == [BOS, *ids("a"), *ids("b"), EOS]
    assert (counts.total, counts.cut, counts.dropped) == (3, 2, 0)
    # the model's positions are a limit too
    out = tokenize_examples([Example("abc", "wxyz")], tok, max_len=100, model_max=5, policy=policy)
    assert out[0].input_ids == [BOS, *ids("a"), *ids("wxy")] and out[0].n_target == 3


def test_drop_long_skips_every_long_example_and_an_empty_result_is_an_error():
    tok = CharTokenizer()
    policy = LengthPolicy(source_max_len=4, target_max_len=3, drop_long=True)
    counts = LengthCounts()
    examples = [Example("ab", "c"), Example("abcdef", "x"), Example("a", "wxyz")]
    out = tokenize_examples(examples, tok, max_len=100, policy=policy, counts=counts)
    assert [t.input_ids for t in out] == [[BOS, *ids("ab"), *ids("c"), EOS]]
    assert (counts.total, counts.cut, counts.dropped) == (3, 0, 2)
    with pytest.raises(DataError, match="every one of the 2 examples is too long.*--drop-long"):
        tokenize_examples(examples[1:], tok, max_len=100, policy=policy, source="f.json")
    # without a policy a long example is still an error naming it
    with pytest.raises(DataError, match="example 1 is 9 tokens, longer than --max-len 8"):
        tokenize_examples(examples, tok, max_len=8)


@pytest.mark.parametrize(
    "name, n_records", [("alpaca/alpaca_5000.json", 5000), ("oasst/oa_questions.jsonl", 953)], ids=["alpaca", "oasst"]
)
def test_the_real_datasets_get_through_tokenization_with_the_default_flags(name, n_records, tokenizer, shared_dir):
    path = str(shared_dir / "data" / name)
    cut = Datasets.from_config(finetune_config_from_argv(["--data", path]), tokenizer)
    assert len(cut.train) + len(cut.eval) == n_records  # nothing dropped by default
    assert max(len(t) for t in cut.train + cut.eval) <= 512 and all(t.n_target > 0 for t in cut.train + cut.eval)
    n_cut = sum(int(note.split(": ")[1].split(" of ")[0]) for note in cut.length_notes)
    assert n_cut > 0 and all("examples cut, 0 dropped" in note for note in cut.length_notes)

    dropped = Datasets.from_config(finetune_config_from_argv(["--data", path, "--drop-long"]), tokenizer)
    assert len(dropped.train) + len(dropped.eval) == n_records - n_cut  # exactly the cut ones are skipped instead
    assert all(", 0 of " not in note and f"0 of {n_records}" not in note for note in dropped.length_notes)
    assert max(len(t) for t in dropped.train + dropped.eval) <= 512
