"""Issue 15: MMLU as a training callback (`qlora finetune --eval-mmlu DIR`), as the QLoRA repository's: scored before
training, every N steps and after, logged in metrics.jsonl and summary.json, and without changing the training."""

from __future__ import annotations

import json

import pytest
from conftest import assert_one_line_error, run_cli

SUBJECTS = "abstract_algebra,anatomy"  # 2 x 5 dev questions, leave-one-out shots


@pytest.fixture(scope="module")
def runs(tiny_hf_dir, shared_dir, tmp_path_factory):
    """The same 3-step finetune of the tiny model with and without the MMLU callback (every step via --eval-every)."""
    from backends.app.cli import main

    tmp = tmp_path_factory.mktemp("mmlu-cb")
    data = str(shared_dir / "data" / "alpaca" / "alpaca_5000.json")
    base = ["finetune", "--model", str(tiny_hf_dir), "--data", data, "--max-examples", "24", "--max-steps", "3",
            "--batch-size", "2", "--grad-accum", "2", "--r", "4", "--dropout", "0.1", "--eval-every", "1",
            "--eval-batches", "1", "--no-progress"]  # fmt: skip
    mmlu = ["--eval-mmlu", str(shared_dir / "data" / "mmlu"), "--eval-mmlu-subjects", SUBJECTS,
            "--eval-mmlu-shots", "2"]  # fmt: skip
    assert main([*base, *mmlu, "--output-dir", str(tmp / "with")]) == 0
    assert main([*base, "--output-dir", str(tmp / "without")]) == 0
    assert main([*base, *mmlu, "--eval-mmlu-every", "2", "--output-dir", str(tmp / "every2")]) == 0
    read = lambda d: [json.loads(s) for s in open(tmp / d / "metrics.jsonl")]  # noqa: E731
    summary = lambda d: json.loads((tmp / d / "summary.json").read_text())  # noqa: E731
    return {d: (read(d), summary(d)) for d in ("with", "without", "every2")}


def test_mmlu_is_logged_before_every_n_steps_and_after(runs):
    metrics, summary = runs["with"]
    scored = [r for r in metrics if "mmlu_macro_acc" in r]
    assert [r["step"] for r in scored] == [0, 1, 2, 3]  # before, every --eval-every step, after
    assert all(r["mmlu_n_questions"] == 10 and 0 <= r["mmlu_micro_acc"] <= 1 for r in scored)
    assert summary["mmlu_macro_acc_before"] == scored[0]["mmlu_macro_acc"]
    assert summary["mmlu_macro_acc_after"] == scored[-1]["mmlu_macro_acc"]
    assert summary["mmlu_micro_acc_after"] == scored[-1]["mmlu_micro_acc"]
    every2 = [r["step"] for r in runs["every2"][0] if "mmlu_macro_acc" in r]
    assert every2 == [0, 2, 3]  # --eval-mmlu-every wins over --eval-every
    assert "mmlu_macro_acc_before" not in runs["without"][1]


def test_mmlu_does_not_change_the_training(runs):
    losses = {d: [(r["step"], r["loss"], r["grad_norm"]) for r in m if "loss" in r] for d, (m, _) in runs.items()}
    assert len(losses["with"]) == 3
    assert losses["with"] == losses["without"] == losses["every2"]  # bit for bit: dropout's RNG draws untouched
    evals = {d: [(r["step"], r["eval_loss"]) for r in m if "eval_loss" in r] for d, (m, _) in runs.items()}
    assert evals["with"] == evals["without"]


def test_the_scores_match_qlora_eval_mmlu_on_the_same_model(runs, tiny_hf_dir, shared_dir, tmp_path, capsys):
    """The step-0 score is the base model's: the same numbers `qlora eval --mmlu` gives it."""
    out = tmp_path / "m.json"
    code, _, err = run_cli(["eval", "--model", str(tiny_hf_dir), "--mmlu", str(shared_dir / "data" / "mmlu"),
                            "--mmlu-split", "dev", "--shots", "2", "--subjects", SUBJECTS, "--batch-size", "2",
                            "--mmlu-out", str(out), "--no-progress"], capsys)  # fmt: skip
    assert code == 0, err
    result = json.loads(out.read_text())
    first = next(r for r in runs["with"][0] if "mmlu_macro_acc" in r)
    assert (first["mmlu_macro_acc"], first["mmlu_micro_acc"]) == (result["mmlu_macro_acc"], result["mmlu_micro_acc"])


def test_bad_mmlu_input_is_one_line_before_any_model_loads(shared_dir, tmp_path, capsys):
    data = str(shared_dir / "data" / "alpaca" / "alpaca_5000.json")
    base = ["finetune", "--model", str(tmp_path / "no-model"), "--data", data, "--output-dir", str(tmp_path / "r")]
    mmlu = str(shared_dir / "data" / "mmlu")
    code, _, err = run_cli([*base, "--eval-mmlu", str(tmp_path / "nope")], capsys)
    assert_one_line_error(code, err, "no dev/ folder")
    code, _, err = run_cli([*base, "--eval-mmlu", mmlu, "--eval-mmlu-subjects", "astrology"], capsys)
    assert_one_line_error(code, err, "subject 'astrology'")
    code, _, err = run_cli([*base, "--eval-mmlu", mmlu, "--eval-mmlu-shots", "5"], capsys)
    assert_one_line_error(code, err, "5 shots asked, 4 dev examples")
    code, _, err = run_cli([*base, "--eval-mmlu", mmlu, "--eval-mmlu-split", "test"], capsys)
    assert_one_line_error(code, err, "no test/ folder")
    bad = tmp_path / "bad" / "dev"
    bad.mkdir(parents=True)
    (bad / "anatomy_dev.csv").write_text("What is it?,a,b,c,d,E\n")
    code, _, err = run_cli([*base, "--eval-mmlu", str(tmp_path / "bad"), "--eval-mmlu-shots", "0"], capsys)
    assert_one_line_error(code, err, "anatomy_dev.csv row 1", "answer 'E'")
    assert not (tmp_path / "r").exists() and not (tmp_path / "r.partial").exists()
