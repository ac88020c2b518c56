"""Issue 15: `qlora generate --prompts FILE.jsonl --out answers.jsonl` on the OASST1 questions: the prompt template the
run trained with, one JSON line per prompt written whole, --overwrite, the progress bar, and bad input (one line,
exit 2, nothing written)."""

from __future__ import annotations

import json
import os

import pytest
from conftest import assert_one_line_error, run_cli

from backends.app.answers import read_prompts, run_template, wrap
from backends.app.data import ALPACA_PROMPT


@pytest.fixture(scope="module")
def questions(shared_dir):
    return str(shared_dir / "data" / "oasst" / "oa_questions.jsonl")


def test_the_oasst_questions_are_read_and_wrapped_byte_for_byte(questions):
    records = [json.loads(line) for line in open(questions, encoding="utf-8")]
    items = read_prompts(questions)
    assert len(items) == len(records) == 953
    for it, rec in zip(items, records, strict=True):
        assert it["prompt"] == rec["text"] and it["id"] == rec["question_id"]
        assert wrap("guanaco", it["prompt"], None) == rec["text"]  # already "### Human: {q} ### Assistant:"
    assert wrap("guanaco", "Why is the sky blue?", None) == "### Human: Why is the sky blue? ### Assistant:"
    assert wrap("none", "x", None) == "x"
    rec = {"instruction": "Add.", "input": "2 3"}
    assert wrap("alpaca", "Add.", None, rec) == ALPACA_PROMPT.format(instruction="Add.", input="2 3")
    assert read_prompts(questions, "prompt")[0]["prompt"] == records[0]["prompt"]  # --prompt-field picks another


@pytest.fixture(scope="module")
def guanaco_run(tiny_hf_dir, questions, tmp_path_factory):
    from backends.app.cli import main

    out = tmp_path_factory.mktemp("gen") / "run"
    argv = ["finetune", "--recipe", "guanaco", "--model", str(tiny_hf_dir), "--data", questions, "--max-examples",
            "8", "--max-len", "256", "--max-steps", "1", "--batch-size", "2", "--grad-accum", "1", "--r", "4",
            "--eval-batches", "1", "--output-dir", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    return out


def test_generate_answers_a_prompt_file(guanaco_run, tiny_hf_dir, questions, tmp_path, capsys, monkeypatch):
    import functools

    import tqdm.auto

    monkeypatch.setattr(tqdm.auto, "tqdm", functools.partial(tqdm.auto.tqdm, mininterval=0, miniters=1))
    assert run_template(str(guanaco_run / "adapter")) == "guanaco"  # from the run's config.json
    assert run_template(None) == "chat"
    out = tmp_path / "answers.jsonl"
    argv = ["generate", "--model", str(tiny_hf_dir), "--adapter", str(guanaco_run / "adapter"), "--prompts", questions,
            "--out", str(out), "--max-prompts", "3", "--max-new-tokens", "4", "--batch-size", "2"]  # fmt: skip
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "3/3" in err and "prompt" in err  # the bar counts prompts
    assert f"wrote {out} (3 answers, template guanaco" in stdout
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    records = [json.loads(line) for line in open(questions, encoding="utf-8")][:3]
    assert [r["id"] for r in rows] == [r["question_id"] for r in records]
    assert [r["prompt"] for r in rows] == [r["text"] for r in records]
    assert all(set(r) == {"id", "prompt", "answer", "n_tokens"} and 0 <= r["n_tokens"] <= 4 for r in rows)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".answers.jsonl.")]  # no temporary left

    before = out.read_bytes()
    code, _, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, "already exists", "--overwrite")
    assert out.read_bytes() == before
    code, _, err = run_cli([*argv[:-6], "--max-prompts", "2", "--max-new-tokens", "4", "--overwrite",
                            "--no-progress"], capsys)  # fmt: skip
    assert code == 0 and err == ""
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2


def test_bad_prompt_files_are_one_line_and_write_nothing(questions, tmp_path, capsys):
    lines = open(questions, encoding="utf-8").read().splitlines()[:3]
    cases = {
        "missing.jsonl": None,
        "not_json.jsonl": "\n".join([*lines[:2], "{not json", lines[2]]),
        "no_field.jsonl": "\n".join([lines[0], json.dumps({"question_id": "x", "output": "y"})]),
        "empty.jsonl": "\n\n",
    }
    wants = {"missing.jsonl": "not found", "not_json.jsonl": "not_json.jsonl:3: malformed JSON line",
             "no_field.jsonl": "no_field.jsonl:2: no prompt field", "empty.jsonl": "no prompts"}  # fmt: skip
    out = tmp_path / "answers.jsonl"
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text, encoding="utf-8")
        code, _, err = run_cli(["generate", "--model", str(tmp_path / "no-model"), "--prompts", str(tmp_path / name),
                                "--out", str(out)], capsys)  # fmt: skip
        assert_one_line_error(code, err, wants[name])
    for argv, want in (
        (["--prompts", questions], "--out"),
        (["--prompt", "hi", "--prompts", questions, "--out", str(out)], "one of the two"),
        (["--prompt", "hi", "--out", str(out)], "--out goes with --prompts"),
        ([], "--prompt TEXT"),
        (["--prompts", questions, "--out", str(tmp_path)], "is a directory"),
        (["--prompts", questions, "--out", str(out), "--max-prompts", "-1"], "--max-prompts must be >= 0"),
    ):
        code, _, err = run_cli(["generate", "--model", str(tmp_path / "no-model"), *argv], capsys)
        assert_one_line_error(code, err, want)
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".answers.jsonl.")]
