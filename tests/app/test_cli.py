"""The `qlora` command line: error paths (one line on stderr, exit 2, no output left behind), `qlora memory`,
flags generated from the config dataclasses, and a short finetune + eval + generate on the real SmolLM2 GGUF."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import HAS_CUDA, assert_one_line_error, run_cli

from backends.app.cli import finetune_config_from_argv
from backends.app.config import TASK_PRESET, RunConfig, TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout


@pytest.fixture(scope="module")
def gguf():
    from backends.app.hub import find_smollm2_gguf, smollm2_gguf_path

    if os.environ.get("CI") == "true":
        return str(smollm2_gguf_path(download=True))
    path = find_smollm2_gguf()
    if path is None:
        pytest.skip("SmolLM2 GGUF not in the model cache (CI downloads it; or call smollm2_gguf_path())")
    return str(path)


# --- configuration -----------------------------------------------------------------------------------------------


def test_flags_come_from_the_dataclasses_with_guanaco_defaults():
    cfg = finetune_config_from_argv(["--data", "x.jsonl"])
    assert cfg == RunConfig(model=cfg.model, data=cfg.data, train=TrainConfig())
    assert (cfg.model.r, cfg.model.alpha, cfg.train.lr, cfg.train.max_grad_norm, cfg.effective_batch) == (
        64, 16.0, 2e-4, 0.3, 16
    )  # fmt: skip
    assert cfg.data.group_by_length and not cfg.data.train_on_source and cfg.train.paged
    task = finetune_config_from_argv([])
    assert task.train.lr == TASK_PRESET["lr"] and task.effective_batch == 16
    cfg = finetune_config_from_argv(["--lr", "3e-4", "--no-group-by-length", "--r", "8", "--data", "a.json"])
    assert (cfg.train.lr, cfg.data.group_by_length, cfg.model.r) == (3e-4, False, 8)
    assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg


# --- error paths: one line, exit 2, nothing written -----------------------------------------------------------


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys, shared_dir):
    out = tmp_path / "run"
    missing = ["finetune", "--data", str(tmp_path / "missing.jsonl"), "--output-dir", str(out)]
    assert_one_line_error(*run_cli(missing, capsys)[::2], "data file not found", "missing.jsonl")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", \n')
    assert_one_line_error(
        *run_cli(["finetune", "--data", str(bad), "--output-dir", str(out)], capsys)[::2], "bad.jsonl:2"
    )

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert_one_line_error(*run_cli(["finetune", "--data", str(empty)], capsys)[::2], "empty dataset")

    assert_one_line_error(*run_cli(["finetune", "--lr", "fast"], capsys)[::2], "--lr", "invalid float")
    assert_one_line_error(*run_cli(["finetune", "--r", "0"], capsys)[::2], "--r must be >= 1")
    assert_one_line_error(*run_cli(["frobnicate"], capsys)[::2], "invalid choice")
    assert_one_line_error(*run_cli(["memory", "--model", str(tmp_path / "nope.json")], capsys)[::2], "nope.json")
    bad_cfg = tmp_path / "config.json"
    bad_cfg.write_text("{not json")
    assert_one_line_error(*run_cli(["memory", "--model", str(bad_cfg)], capsys)[::2], "malformed JSON")
    assert_one_line_error(*run_cli(["eval", "--data", str(tmp_path / "x.txt")], capsys)[::2], "not found")
    assert_one_line_error(*run_cli(["generate", "--prompt", "hi", "--adapter", str(tmp_path)], capsys)[::2], "adapter")
    assert not out.exists() and not (tmp_path / "run.partial").exists()


def test_every_command_checks_a_flag_by_the_same_rule_before_printing(tmp_path, capsys):
    """Issue 16: the same flag is refused alike in every command, in one line, with nothing printed before it."""
    cases = [
        (["eval", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["finetune", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["eval", "--max-len", "0"], "--max-len must be >= 8, got 0"),
        (["finetune", "--max-len", "0"], "--max-len must be >= 8, got 0"),
        (["memory", "--blocksize", "17"], "--blocksize must be one of 32, 64"),
        (["quantize", "m", "o", "--blocksize", "17"], "--blocksize must be one of 32, 64"),
        (["finetune", "--blocksize", "17"], "--blocksize must be one of 32, 64"),
        (["memory", "--gpu-gb", "-1"], "--gpu-gb must be > 0, got -1.0"),
        (["memory", "--r", "0"], "--r must be >= 1"),
        (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["eval", "--backend", "cuda"], "invalid choice: 'cuda'"),
    ]
    for argv, needle in cases:
        code, out, err = run_cli(argv, capsys)
        assert_one_line_error(code, err, needle)
        assert out == "", (argv, out)


def test_data_paths_are_named_in_the_error(tmp_path, capsys):
    binary = tmp_path / "blob.jsonl"
    binary.write_bytes(bytes(range(256)))
    for argv, needles in [
        (["finetune", "--data", str(tmp_path)], ("is a directory", str(tmp_path))),
        (["eval", "--data", str(tmp_path)], ("is a directory", str(tmp_path))),
        (["finetune", "--data", str(binary)], ("blob.jsonl", "not UTF-8")),
    ]:
        code, out, err = run_cli(argv, capsys)
        assert_one_line_error(code, err, *needles)
        assert "not found" not in err and out == ""


@pytest.mark.skipif(HAS_CUDA, reason="checks the message for a machine without CuPy or a GPU")
def test_unavailable_backend_is_one_line(capsys):
    for argv in (["finetune", "--backend", "cupy"], ["eval", "--task", "--backend", "cupy"]):
        code, out, err = run_cli(argv, capsys)
        assert_one_line_error(code, err, "cupy backend needs")
        assert out == ""


def test_a_finished_output_is_refused_without_overwrite(tmp_path, capsys):
    done = tmp_path / "done"
    done.mkdir()
    (done / "summary.json").write_text("{}")
    code, _, err = run_cli(["finetune", "--output-dir", str(done)], capsys)
    assert_one_line_error(code, err, "finished result", "--overwrite", "--resume")
    code, _, err = run_cli(["quantize", "smollm2", str(done)], capsys)
    assert_one_line_error(code, err, "finished result", "--overwrite")
    assert os.listdir(done) == ["summary.json"] and not (tmp_path / "done.partial").exists()


def test_sigterm_stops_training_like_ctrl_c():
    import signal

    from backends.app.finetune import sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at once; the sleep only bounds a failure
    assert signal.getsignal(signal.SIGTERM) is before


def test_error_from_the_console_entry_point_is_one_line(tmp_path):
    """The real process: exit status 2 and exactly one stderr line, no traceback."""
    res = subprocess.run(
        [sys.executable, "-m", "backends.app.cli", "finetune", "--data", str(tmp_path / "none.json")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"qlora finetune: error: data file not found: '{tmp_path / 'none.json'}'"
    ]


def test_console_entry_point_flushes_its_output_before_its_fast_exit():
    """run() ends in os._exit: a piped (block-buffered) stdout still arrives whole, with main's exit status."""
    argv = ["memory", "--model", "llama-65b", "--seq-len", "512", "--batch", "1", "--gpu-gb", "48"]
    res = subprocess.run([sys.executable, "-m", "backends.app.cli", *argv], cwd=REPO, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    direct = subprocess.run([sys.executable, "-c", f"from backends.app.cli import main; main({argv!r})"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0 and res.stdout == direct.stdout and len(res.stdout.splitlines()) > 3


def test_partial_run_dir_is_refused_without_resume(tmp_path, capsys, shared_dir):
    (tmp_path / "run.partial").mkdir()
    data = str(shared_dir / "data" / "oasst" / "oa_questions.jsonl")
    code, _, err = run_cli(["finetune", "--data", data, "--output-dir", str(tmp_path / "run")], capsys)
    assert_one_line_error(code, err, "interrupted run", "--resume")  # said before any model or data is loaded
    assert not (tmp_path / "run").exists() and (tmp_path / "run.partial").is_dir()


# --- qlora memory ------------------------------------------------------------------------------------------------


def test_memory_planner(capsys, tmp_path):
    code, out, _ = run_cli(
        ["memory", "--model", "llama-65b", "--seq-len", "512", "--batch", "1", "--gpu-gb", "48"], capsys
    )
    assert code == 0
    for part in ("base_4bit", "lora_params", "optimizer", "activations", "total", "fits in 48 GB"):
        assert part in out
    from backends.torchlib.ledger import Runtime, estimate
    from qlora_ref import memory

    recipe = memory.Recipe(seq_len=512, batch=1)
    ledger = estimate(memory.llama_65b, recipe, Runtime(layer="qlora-ref"))  # our layer, MEM-14 overhead
    assert f"{ledger.total:,}" in out
    assert ("fits in 48 GB: yes" in out) == ledger.fits(48)
    code, out, _ = run_cli(["memory", "--model", "llama-7b", "--gpu-gb", "4"], capsys)
    assert "fits in 4 GB: no" in out
    _, levers, _ = run_cli(["memory", "--model", "llama-65b", "--step-in-backward", "--offload-checkpoints",
                        "--embeddings-on-host", "--gpu-gb", "38"], capsys)  # fmt: skip
    lean = estimate(
        memory.llama_65b,
        recipe,
        Runtime(layer="qlora-ref", step_in_backward=True, offload_checkpoints=True, embeddings_on_host=True),
    )
    assert f"{lean.resident:,}" in levers and lean.resident < ledger.resident - 2 * memory.GB
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                   tie_word_embeddings=True)))  # fmt: skip
    _, from_file, _ = run_cli(["memory", "--model", str(cfg), "--r", "8"], capsys)
    _, preset, _ = run_cli(["memory", "--model", "smollm2-135m", "--r", "8"], capsys)
    assert from_file.splitlines()[2:] == preset.splitlines()[2:]  # same numbers from the config.json as the preset


# --- the real model, and a tiny one for the slower paths -----------------------------------------------------


def test_finetune_smoke_on_the_real_gguf_then_eval(gguf, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["finetune", "--model", gguf, "--max-steps", "2", "--task-train", "16", "--task-eval", "8",
            "--batch-size", "4", "--grad-accum", "1", "--r", "8", "--output-dir", str(out)]  # fmt: skip
    code, stdout, err = run_cli([*argv, "--no-progress"], capsys)
    assert code == 0, err
    assert "held-out exact match before" in stdout and "held-out exact match after" in stdout
    assert not (tmp_path / "run.partial").exists()
    assert sorted(os.listdir(out)) == sorted(
        ["adapter", "checkpoint", "config.json", "loss_curve.png", "metrics.jsonl", "summary.json"]
    )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["max_steps"] == 2 and cfg["model"]["r"] == 8 and cfg["resolved"]["n_train"] == 16
    assert cfg["resolved"]["qlora"]["quant_type"] == "nf4" and len(cfg["resolved"]["qlora"]["target_modules"]) == 210
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and 0.0 <= summary["exact_match_after"] <= 1.0
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["peft_type"] == "LORA"
    # a .gguf base is named by the HF directory converted from it, which PEFT's AutoPeftModel classes can load
    assert os.path.isfile(os.path.join(adapter["base_model_name_or_path"], "config.json")), adapter

    argv = ["eval", "--model", gguf, "--adapter", str(out / "adapter"), "--task", "--task-eval", "8", "--json"]
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["n"] == 8 and result["exact_match"] == summary["exact_match_after"]  # same held-out lists


def test_resume_generate_eval_and_adapter_mismatch_on_a_tiny_model(tiny_hf_dir, tmp_path, capsys, shared_dir):
    out = tmp_path / "run"
    data = str(shared_dir / "data" / "alpaca" / "alpaca_5000.json")
    argv = ["finetune", "--model", str(tiny_hf_dir), "--data", data, "--max-examples", "24", "--max-steps", "2",
            "--batch-size", "2", "--grad-accum", "2", "--r", "4", "--output-dir", str(out),
            "--no-progress"]  # fmt: skip
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    # resume the finished run to one more step: it continues at step 2 and the metrics keep steps 1 and 2
    code, stdout, err = run_cli([*argv[:8], "3", *argv[9:], "--resume"], capsys)
    assert code == 0, err
    assert "resumed from" in stdout and "at step 2" in stdout
    records = [json.loads(s) for s in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    first = json.loads((out / "summary.json").read_text())

    # Ctrl-C half-way through step 2 (its first micro-batch drawn): a checkpoint of step 1 and the base model's
    # scores stay in run.partial; --resume then makes step 2 exactly as the uninterrupted run did
    import backends.app.trainer as trainer_mod

    step = trainer_mod.Trainer.train_step

    def interrupted(self):
        if self.step == 1:
            self.stream.next_batch()
            raise KeyboardInterrupt
        return step(self)

    cut = tmp_path / "cut"
    argv_cut = [*argv[:-2], str(cut), "--no-progress"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_mod.Trainer, "train_step", interrupted)
        code, _, err = run_cli(argv_cut, capsys)
    assert code == 130 and "interrupted" in err
    partial = tmp_path / "cut.partial"
    assert json.loads((partial / "checkpoint" / "trainer_state.json").read_text())["step"] == 1
    assert json.loads((partial / "summary.json").read_text())["eval_loss_before"] == first["eval_loss_before"]
    code, _, err = run_cli([*argv_cut, "--resume"], capsys)
    assert code == 0, err
    resumed = json.loads((cut / "summary.json").read_text())
    assert resumed["eval_loss_before"] == first["eval_loss_before"] and resumed["steps"] == 2
    losses = lambda d: [json.loads(s)["loss"] for s in open(d / "metrics.jsonl") if '"loss"' in s]  # noqa: E731
    assert losses(cut) == losses(out)[:2]

    # the finished run is replaced only when told to
    code, _, err = run_cli(argv_cut, capsys)
    assert_one_line_error(code, err, "--overwrite")
    code, _, err = run_cli([*argv_cut[:8], "1", *argv_cut[9:], "--overwrite"], capsys)
    assert code == 0, err
    assert json.loads((cut / "summary.json").read_text())["steps"] == 1

    code, stdout, err = run_cli(["generate", "--model", str(tiny_hf_dir), "--adapter", str(out / "adapter"), "--prompt",
                             "Reverse the list: 1 2 3", "--max-new-tokens", "4"], capsys)  # fmt: skip
    assert code == 0, err
    assert "### prompt: Reverse the list: 1 2 3" in stdout

    txt = shared_dir / "data" / "wikitext-2" / "valid.txt"
    argv = ["eval", "--model", str(tiny_hf_dir), "--adapter", str(out / "adapter"), "--data", str(txt),
            "--max-len", "64", "--max-examples", "4", "--json"]  # fmt: skip
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["n"] == 4 and result["perplexity"] > 1.0

    # an adapter that does not match its base: trained with r=4, its config edited to claim r=8
    bad = tmp_path / "bad_adapter"
    bad.mkdir()
    conf = json.loads((out / "adapter" / "adapter_config.json").read_text())
    conf["r"] = 8
    (bad / "adapter_config.json").write_text(json.dumps(conf))
    os.link(out / "adapter" / "adapter_model.safetensors", bad / "adapter_model.safetensors")
    code, _, err = run_cli(
        ["eval", "--model", str(tiny_hf_dir), "--adapter", str(bad), "--task", "--task-eval", "4"], capsys
    )
    assert_one_line_error(code, err)

    # quantize: the model dir -> a bitsandbytes 4-bit checkpoint, written whole
    code, stdout, err = run_cli(["quantize", str(tiny_hf_dir), str(tmp_path / "q4")], capsys)
    assert code == 0, err
    qcfg = json.loads((tmp_path / "q4" / "config.json").read_text())["quantization_config"]
    assert qcfg["bnb_4bit_quant_type"] == "nf4" and qcfg["bnb_4bit_use_double_quant"] is True
    assert (tmp_path / "q4" / "model.safetensors").is_file() and not (tmp_path / "q4.partial").exists()

    # a sequence longer than the model allows (256 positions): one line, and no output directory
    code, _, err = run_cli(["finetune", "--model", str(tiny_hf_dir), "--data", data, "--max-len", "100000",
                        "--output-dir", str(tmp_path / "long"), "--max-steps", "1"], capsys)  # fmt: skip
    assert_one_line_error(code, err, "longer than the model")
    assert not (tmp_path / "long").exists() and not (tmp_path / "long.partial").exists()


@pytest.mark.parametrize("payload", [b"\x00\x01garbage", None], ids=["random-bytes", "truncated"])
def test_a_corrupt_adapter_file_is_one_line(payload, tiny_hf_dir, tmp_path, capsys):
    """A truncated or random adapter_model.safetensors ends in one line naming the file's trouble, exit 2."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear", "peft_type": "LORA"})
    )
    if payload is None:  # a real safetensors header cut short
        import torch
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(64)}, str(tmp_path / "whole.safetensors"))
        payload = (tmp_path / "whole.safetensors").read_bytes()[:40]
    (adapter / "adapter_model.safetensors").write_bytes(payload)
    argv = [
        "generate",
        "--model",
        str(tiny_hf_dir),
        "--adapter",
        str(adapter),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "1",
    ]
    code, _, err = run_cli(argv, capsys)
    assert_one_line_error(code, err)
