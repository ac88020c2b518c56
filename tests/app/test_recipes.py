"""Issue 15: `qlora finetune --recipe guanaco` (the paper's hyper-parameters as defaults, flags still win, the dropout
by the model's size, every value in config.json and the printed config), the OASST text and its loss on the assistant
turns only, on the real OASST1 file and SmolLM2's tokenizer."""

from __future__ import annotations

import json
import re

import pytest
from conftest import assert_one_line_error, run_cli

from backends.app.cli import finetune_config_from_argv
from backends.app.data import IGNORE_INDEX, Example, read_examples, to_example, tokenize_examples
from backends.app.recipes import GUANACO, count_parameters, guanaco_dropout, resolve_recipe


@pytest.fixture(scope="module")
def oasst_path(shared_dir):
    return str(shared_dir / "data" / "oasst" / "oa_questions.jsonl")


def _flat(cfg) -> dict:
    return {**vars(cfg.model), **vars(cfg.data), **vars(cfg.train)}


# --- the recipe's values as defaults -----------------------------------------------------------------------------


def test_the_recipe_sets_the_defaults_and_a_flag_wins():
    flat = _flat(finetune_config_from_argv(["--recipe", "guanaco", "--data", "x.jsonl"]))
    assert {k: flat[k] for k in GUANACO} == GUANACO
    assert (flat["r"], flat["alpha"], flat["lr"], flat["max_grad_norm"], flat["batch_size"] * flat["grad_accum"]) == (
        64, 16.0, 2e-4, 0.3, 16
    )  # fmt: skip
    assert (flat["source_max_len"], flat["target_max_len"], flat["group_by_length"], flat["recipe"]) == (
        384, 128, True, "guanaco"
    )  # fmt: skip
    flat = _flat(finetune_config_from_argv(["--recipe", "guanaco", "--data", "x.jsonl", "--r", "8", "--lr", "1e-4",
                                            "--dropout", "0.2", "--no-group-by-length"]))  # fmt: skip
    assert (flat["r"], flat["lr"], flat["dropout"], flat["group_by_length"], flat["alpha"]) == (8, 1e-4, 0.2, False, 16)
    # without a recipe: the dataclasses' defaults (the data file's), untouched
    plain = _flat(finetune_config_from_argv(["--data", "x.jsonl"]))
    assert (plain["source_max_len"], plain["dropout"], plain["assistant_turns"], plain["recipe"]) == (
        256,
        0.05,
        False,
        "",
    )


def test_an_unknown_recipe_is_one_line_naming_the_known_ones(capsys, tmp_path):
    code, _, err = run_cli(["finetune", "--recipe", "alpaca-7b", "--data", "x.jsonl",
                            "--output-dir", str(tmp_path / "r")], capsys)  # fmt: skip
    assert_one_line_error(code, err, "unknown recipe 'alpaca-7b'", "known recipes: guanaco")
    code, _, err = run_cli(["finetune", "--recipe", "guanaco", "--output-dir", str(tmp_path / "r")], capsys)
    assert_one_line_error(code, err, "--recipe guanaco", "--data FILE")
    code, _, err = run_cli(["finetune", "--rec", "guanaco", "--data", "x.jsonl"], capsys)
    assert_one_line_error(code, err, "write --recipe in full")
    assert not list(tmp_path.iterdir())
    code, out, _ = run_cli(["finetune", "--recipe", "guanaco", "--help"], capsys)
    flat = " ".join(out.split())
    assert code == 0 and "(default: 384, the guanaco recipe's)" in flat and "by the model's parameter count" in flat
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and "finetune" in out


# --- the dropout by the model's size ---------------------------------------------------------------------------


def test_the_dropout_is_chosen_by_the_parameter_count(tiny_hf_dir, tmp_path):
    import transformers

    assert guanaco_dropout(13_015_864_320) == 0.1  # LLaMA-13B
    assert guanaco_dropout(6_738_415_616) == 0.1  # LLaMA-7B
    assert guanaco_dropout(32_528_943_616) == 0.05  # LLaMA-33B
    assert guanaco_dropout(65_285_660_672) == 0.05  # LLaMA-65B
    big = tmp_path / "llama-65b"  # the shape only: a config.json, counted on the meta device
    transformers.LlamaConfig(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64,
                             vocab_size=32000).save_pretrained(big)  # fmt: skip
    assert count_parameters(str(big)) == 65_285_660_672  # the paper's 65B (its LLaMA's count)
    import torch

    tiny = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dir)
    assert count_parameters(str(tiny_hf_dir)) == sum(p.numel() for p in tiny.parameters())
    del tiny, torch
    for path, want in ((big, 0.05), (tiny_hf_dir, 0.1)):
        cfg = finetune_config_from_argv(["--recipe", "guanaco", "--data", "x.jsonl"])
        assert cfg.model.dropout is None  # settled once the model is known
        record = resolve_recipe(cfg, str(path))
        assert cfg.model.dropout == want and record["dropout_rule"].startswith(f"{want} for ")
    cfg = finetune_config_from_argv(["--recipe", "guanaco", "--data", "x.jsonl", "--dropout", "0.3"])
    record = resolve_recipe(cfg, str(big))
    assert cfg.model.dropout == 0.3 and "dropout_rule" not in record and record["overridden"] == {"dropout": 0.3}


# --- the OASST text and its loss mask ----------------------------------------------------------------------------


def _assistant_turns(text: str) -> list[str]:
    """The assistant turns of '### Human: q ### Assistant: a ...' by a regular expression (the test's own reading)."""
    return re.findall(r"### Assistant:(.*?)(?= ?### Human:|$)", text, flags=re.S)


def test_the_oasst_text_byte_for_byte_and_the_loss_on_assistant_turns_only(oasst_path, tokenizer):
    records = [json.loads(line) for line in open(oasst_path, encoding="utf-8")]
    multi = [r for r in records if r["input"].count("### Human:") == 3][:2] + records[:2]
    assert len(multi) == 4
    examples = read_examples(oasst_path)
    for rec in multi:
        ex = examples[records.index(rec)]
        text = rec["input"] + " " + rec["output"]  # the conversation as the file writes its earlier turns
        assert ex.prompt + ex.completion == text
        assert ex == to_example({"text": text}, "oasst", "w")  # the input/output and the text forms agree
        (t,) = tokenize_examples([ex], tokenizer, max_len=100_000, assistant_turns=True)
        assert t.input_ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(t.input_ids[:-1]) == text  # byte for byte
        runs, run = [], []  # the labelled tokens, as maximal runs
        for i, label in zip(t.input_ids, t.labels, strict=True):
            if label == IGNORE_INDEX:
                runs, run = (runs + [run] if run else runs), []
            else:
                assert label == i
                run.append(i)
        runs += [run] if run else []
        turns = _assistant_turns(text)
        assert len(turns) == rec["input"].count("### Human:") and all(turns)
        assert [tokenizer.decode(r) for r in runs] == [*turns[:-1], turns[-1] + tokenizer.decode([t.input_ids[-1]])]
        # the default: the loss on the last response only
        (plain,) = tokenize_examples([ex], tokenizer, max_len=100_000)
        assert plain.input_ids[-len(tokenizer(ex.completion, add_special_tokens=False)["input_ids"]) - 1 :] == \
            t.input_ids[-len(tokenizer(ex.completion, add_special_tokens=False)["input_ids"]) - 1 :]  # fmt: skip
        assert tokenizer.decode([i for i, v in zip(plain.input_ids, plain.labels, strict=True) if v != IGNORE_INDEX]) \
            == turns[-1] + tokenizer.decode([tokenizer.eos_token_id])  # fmt: skip


def test_assistant_turns_refuse_text_that_is_not_a_conversation(tokenizer):
    from backends.app.data import DataError

    with pytest.raises(DataError, match=r"f.jsonl: example 1: not an OASST conversation"):
        tokenize_examples([Example("### Human: a ### Assistant:", " b"), Example("Q: a", " b")], tokenizer,
                          max_len=64, source="f.jsonl", assistant_turns=True)  # fmt: skip


# --- a real run: every value in config.json and in the printed config ---------------------------------------------


def test_a_guanaco_run_records_every_value(tiny_hf_dir, oasst_path, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["finetune", "--recipe", "guanaco", "--model", str(tiny_hf_dir), "--data", oasst_path,
            "--max-examples", "12", "--max-len", "256", "--max-steps", "1", "--batch-size", "2", "--grad-accum", "2",
            "--lr", "1e-4", "--eval-batches", "1", "--output-dir", str(out), "--no-progress"]  # fmt: skip
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    flat = {**cfg["model"], **cfg["data"], **cfg["train"]}
    want = {**GUANACO, "dropout": 0.1, "lr": 1e-4, "max_steps": 1, "batch_size": 2, "grad_accum": 2, "max_len": 256}
    assert {k: flat[k] for k in GUANACO} == want and flat["recipe"] == "guanaco"
    recipe = cfg["resolved"]["recipe"]
    assert recipe["overridden"] == {"lr": 1e-4, "max_steps": 1, "batch_size": 2, "grad_accum": 2, "max_len": 256}
    assert recipe["values"]["lr"] == 2e-4 and recipe["dropout_rule"].startswith("0.1 for ")
    assert cfg["resolved"]["prompt_template"] == "guanaco"
    assert cfg["resolved"]["qlora"]["r"] == 64 and cfg["resolved"]["qlora"]["dropout"] == 0.1
    printed = stdout.replace("\n", " ")
    for section in ("model", "data", "train"):
        for k, v in cfg[section].items():
            assert f"{k}={v!r}" in printed, (section, k)
    assert (
        "recipe guanaco: changed by flags: lr=0.0001, batch_size=2, grad_accum=2, max_steps=1, max_len=256" in printed
    )
