"""qlora finetune --use-dora / --init loftq: the run's adapter (and, for LoftQ, its own 4-bit base) reload to the
model the run scored — its eval loss after training, recomputed from the files, is the summary's."""

from __future__ import annotations

import json

import pytest
from conftest import assert_one_line_error, run_cli

from backends.app.cli import finetune_config_from_argv
from backends.app.config import ModelConfig
from backends.app.datasets import Datasets
from backends.app.evaluate import eval_loss, pad_id_of
from backends.app.model import load_with_adapter


def finetune_argv(tiny_hf_dir, shared_dir, out, *flags):
    data = str(shared_dir / "data" / "alpaca" / "alpaca_5000.json")
    return ["--model", str(tiny_hf_dir), "--data", data, "--max-examples", "200", "--max-len", "128",
            "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--r", "4", "--dropout", "0", "--lr", "1e-2",
            "--eval-batches", "2", "--output-dir", str(out), "--no-progress", *flags]  # fmt: skip


@pytest.mark.parametrize(
    "flags", [["--use-dora"], ["--init", "loftq", "--loftq-iters", "2"], ["--use-dora", "--init", "loftq"]]
)
def test_the_files_reproduce_the_runs_eval_loss(flags, tiny_hf_dir, shared_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = finetune_argv(tiny_hf_dir, shared_dir, out, *flags)
    code, _, err = run_cli(["finetune", *argv], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    qcfg = json.loads((out / "adapter" / "qlora_config.json").read_text())
    assert adapter_cfg.get("use_dora", False) is ("--use-dora" in flags)
    loftq = "loftq" in flags
    assert qcfg["init"] == ("loftq" if loftq else "default")
    assert (out / "base-4bit" / "model.safetensors").is_file() is loftq
    if loftq:
        assert adapter_cfg["base_model_name_or_path"] == str(out / "base-4bit")

    cfg = finetune_config_from_argv(argv)
    model, tokenizer = load_with_adapter(
        ModelConfig(backend="numpy", dropout=0.0), str(tiny_hf_dir), str(out / "adapter")
    )
    data = Datasets.from_config(cfg, tokenizer)
    got = eval_loss(model, data.eval, batch_size=2, pad_id=pad_id_of(tokenizer), max_batches=2)
    assert got == pytest.approx(summary["eval_loss_after"], rel=1e-6, abs=1e-6)
    assert abs(got - summary["eval_loss_before"]) > 1e-4  # training moved it: the comparison can tell models apart


def test_a_loftq_adapter_without_its_base_is_one_line(tiny_hf_dir, shared_dir, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    code, _, err = run_cli(["finetune", *finetune_argv(tiny_hf_dir, shared_dir, out, "--init", "loftq")], capsys)
    assert code == 0, err
    shutil.rmtree(out / "base-4bit")
    code, _, err = run_cli(["eval", "--model", str(tiny_hf_dir), "--adapter", str(out / "adapter"), "--task"], capsys)
    assert_one_line_error(code, err, "LoftQ", "base-4bit")


def test_bad_loftq_iters_is_one_line(tiny_hf_dir, shared_dir, tmp_path, capsys):
    argv = finetune_argv(tiny_hf_dir, shared_dir, tmp_path / "run", "--init", "loftq", "--loftq-iters", "0")
    code, _, err = run_cli(["finetune", *argv], capsys)
    assert_one_line_error(code, err, "loftq")
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()
