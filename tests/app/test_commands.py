"""Issue 16, the rest: real datasets through `qlora finetune`, progress bars on the long loops, the "before" point in
the loss curve, finetune's help saying which defaults apply when, `qlora export` (merged or 4-bit + adapter), and an
adapter whose base_model_name_or_path PEFT can load."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import assert_one_line_error, run_cli

from backends.app.config import TASK_PRESET, ModelConfig, TrainConfig


def test_finetune_help_says_which_defaults_apply_when(capsys):
    for argv in (["finetune", "--help"], ["finetune", "--data", "x.json", "--help"]):
        code, out, _ = run_cli(argv, capsys)
        assert code == 0
        flat = " ".join(out.split())
        assert "With --data task (the default) the task preset" in flat
        for name in ("lr", "max_steps", "batch_size", "grad_accum", "eval_batches"):
            guanaco = getattr(TrainConfig(), name)
            assert f"{TASK_PRESET[name]!r} with --data task (the task preset), {guanaco!r} with a data file" in flat


def test_loss_curve_starts_at_the_before_point(tmp_path):
    from backends.app.evaluate import loss_curve_points, plot_loss_curve

    history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "eval_loss": 1.4}]
    train, ev = loss_curve_points(history, eval_loss_before=1.9)
    assert train == [(1, 2.0), (2, 1.5)] and ev == [(0, 1.9), (2, 1.4)]
    assert loss_curve_points(history)[1] == [(2, 1.4)]  # no eval set: no point invented
    plot_loss_curve(history, str(tmp_path / "c.png"), eval_loss_before=1.9)
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tiny_hf_dir, shared_dir, tmp_path_factory):
    """A 2-step finetune of the tiny model on the whole Alpaca file (cut to the model's 256 positions)."""
    import backends.app.evaluate as evaluate_mod

    out = tmp_path_factory.mktemp("runs") / "run"
    data = str(shared_dir / "data" / "alpaca" / "alpaca_5000.json")
    plotted = {}
    plot = evaluate_mod.plot_loss_curve

    def record(history, path, **kw):
        plotted.update(kw)
        return plot(history, path, **kw)

    logs: list[str] = []
    from backends.app.cli import finetune_config_from_argv
    from backends.app.finetune import finetune

    cfg = finetune_config_from_argv(["--model", str(tiny_hf_dir), "--data", data, "--max-len", "256",
                                     "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--r", "4",
                                     "--eval-batches", "2", "--output-dir", str(out), "--no-progress"])  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate_mod, "plot_loss_curve", record)
        summary = finetune(cfg, log=logs.append)
    return out, summary, plotted, logs


def test_the_real_alpaca_file_trains_and_the_cut_examples_are_reported(trained):
    out, summary, plotted, logs = trained
    notes = [line for line in logs if "examples cut" in line]
    assert len(notes) == 2 and "train (" in notes[0] and "eval (" in notes[1], logs
    assert all("limit 256" in n for n in notes)
    # "<source>: C of N examples cut, D dropped (...)": the kept and the dropped make up the file
    dropped = sum(int(n.split(" cut, ")[1].split(" dropped")[0]) for n in notes)
    assert sum(int(n.split(" of ")[1].split(" examples")[0]) for n in notes) == 5000
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["resolved"]["n_train"] + cfg["resolved"]["n_eval"] + dropped == 5000 and summary["steps"] == 2
    assert plotted["eval_loss_before"] == summary["eval_loss_before"] is not None  # the plot's step-0 point


def test_the_real_oasst_file_gets_through_finetune(tiny_hf_dir, shared_dir, tmp_path, capsys):
    data = str(shared_dir / "data" / "oasst" / "oa_questions.jsonl")
    argv = ["finetune", "--model", str(tiny_hf_dir), "--data", data, "--max-len", "256", "--max-steps", "1",
            "--batch-size", "2", "--grad-accum", "1", "--r", "4", "--eval-batches", "1",
            "--output-dir", str(tmp_path / "run"), "--no-progress"]  # fmt: skip
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    notes = [line for line in out.splitlines() if "examples cut" in line]
    assert len(notes) == 2 and all("examples cut, 0 dropped" in n for n in notes), out
    code, out, err = run_cli([*argv[:-2], str(tmp_path / "run2"), "--no-progress", "--drop-long"], capsys)
    assert code == 0, err
    notes = [line for line in out.splitlines() if "examples cut" in line]
    assert len(notes) == 2 and all(": 0 of " in n and " 0 dropped" not in n for n in notes), out


def test_the_adapter_names_a_base_peft_can_load(trained, tiny_hf_dir):
    out, *_ = trained
    adapter = out / "adapter"
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == os.path.abspath(tiny_hf_dir)
    readme = (adapter / "README.md").read_text()
    assert "AutoPeftModelForCausalLM.from_pretrained" in readme and str(adapter) in readme

    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file

    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(adapter), dtype=torch.float32).eval()
    assert set(peft_model.peft_config["default"].target_modules) == set(conf["target_modules"])
    # PEFT's base is the float32 model (ours trains on its NF4 copy); the LoRA weights it loaded are the adapter's
    loaded = {k.replace(".default.weight", ".weight"): v for k, v in peft_model.state_dict().items() if "lora_" in k}
    saved = load_file(adapter / "adapter_model.safetensors")
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert any(bool(v.abs().sum()) for k, v in saved.items() if "lora_B" in k)  # trained: B is no longer zero


def trained_logits(trained, tiny_hf_dir):
    """(adapter dir, the base + adapter model, a token batch x, its logits) of the trained fixture's run."""
    from backends.app.model import load_with_adapter

    out, *_ = trained
    adapter = str(out / "adapter")
    ours, _ = load_with_adapter(ModelConfig(dropout=0.0), str(tiny_hf_dir), adapter)
    x = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.no_grad():
        return adapter, ours, x, ours(input_ids=x).logits


def test_export_merged_and_4bit_with_adapter(trained, tiny_hf_dir, tmp_path, capsys):
    import transformers

    from backends.app.model import load_with_adapter
    from backends.torchlib.export import merged_state_dict

    out, *_ = trained
    adapter, ours, x, want = trained_logits(trained, tiny_hf_dir)

    merged = tmp_path / "merged"
    code, stdout, err = run_cli(["export", "--adapter", adapter, "--out", str(merged), "--merged", "--dtype", "fp32"],
                            capsys)  # fmt: skip
    assert code == 0, err
    assert "the merged model in float32" in stdout and not (tmp_path / "merged.partial").exists()
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(os.listdir(merged))
    from safetensors.torch import load_file

    written = load_file(merged / "model.safetensors")
    expected = merged_state_dict(ours, "float32")
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)
    plain = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        got = plain(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # W_hat + s B A in one weight = base + adapter

    four = tmp_path / "four"
    code, stdout, err = run_cli(["export", "--adapter", adapter, "--out", str(four), "--dtype", "float32"], capsys)
    assert code == 0, err
    assert "the 4-bit base (nf4) + adapter/" in stdout
    qconf = json.loads((four / "config.json").read_text())["quantization_config"]
    assert qconf["load_in_4bit"] and qconf["bnb_4bit_quant_type"] == "nf4"
    conf = json.loads((four / "adapter" / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == os.path.abspath(four)
    reloaded, _ = load_with_adapter(ModelConfig(dropout=0.0), str(four), str(four / "adapter"))
    with torch.no_grad():
        again = reloaded(input_ids=x).logits
    assert torch.equal(again, want)  # the stored 4-bit states and the adapter: the same model, bit for bit

    # bad input: one line, exit 2, nothing written
    code, _, err = run_cli(["export", "--adapter", adapter, "--out", str(four)], capsys)
    assert_one_line_error(code, err, "--overwrite")
    code, _, err = run_cli(["export", "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "x")], capsys)
    assert_one_line_error(code, err, "adapter directory not found", "nope")
    code, _, err = run_cli(["export", "--out", str(tmp_path / "x")], capsys)
    assert_one_line_error(code, err, "--adapter")
    code, _, err = run_cli(["export", "--adapter", adapter, "--out", str(tmp_path / "x"), "--dtype", "int8"], capsys)
    assert_one_line_error(code, err, "--dtype")
    lost = tmp_path / "lost_base"
    lost.mkdir()
    conf = json.loads((out / "adapter" / "adapter_config.json").read_text())
    (lost / "adapter_config.json").write_text(json.dumps({**conf, "base_model_name_or_path": str(tmp_path / "gone")}))
    code, _, err = run_cli(["export", "--adapter", str(lost), "--out", str(tmp_path / "x")], capsys)
    assert_one_line_error(code, err, "is not there; pass --model")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_export_gguf_loads_back_as_the_trained_model(trained, tiny_hf_dir, tmp_path, capsys):
    from backends.torchlib.load import load_model

    adapter, _, x, want = trained_logits(trained, tiny_hf_dir)
    g = tmp_path / "gguf"
    code, stdout, err = run_cli(["export", "--adapter", adapter, "--out", str(g), "--gguf", "--dtype", "float32"],
                                capsys)  # fmt: skip
    assert code == 0, err
    assert "model.gguf (the merged model in float32" in stdout and os.listdir(g) == ["model.gguf"]
    plain = load_model(str(g / "model.gguf"), prepare=False).eval()  # transformers' GGUF reader
    with torch.no_grad():
        got = plain(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # as the merged safetensors export above
    capsys.readouterr()  # transformers' GGUF reader drew its bar on stderr
    code, _, err = run_cli(["export", "--adapter", adapter, "--out", str(g), "--gguf"], capsys)
    assert_one_line_error(code, err, "--overwrite")


def test_long_commands_show_progress(trained, tiny_hf_dir, shared_dir, capsys, monkeypatch):
    # tqdm redraws at most every 0.1 s, so on a fast machine a short bar may close (and vanish, leave=False) before
    # it ever draws its last count; drawing on every update makes what reaches stderr independent of the clock.
    import functools

    import tqdm.auto

    monkeypatch.setattr(tqdm.auto, "tqdm", functools.partial(tqdm.auto.tqdm, mininterval=0, miniters=1))
    out, *_ = trained
    adapter = str(out / "adapter")
    txt = str(shared_dir / "data" / "wikitext-2" / "valid.txt")
    base = ["--model", str(tiny_hf_dir), "--adapter", adapter]
    argv = ["eval", *base, "--data", txt, "--max-len", "32", "--max-examples", "6", "--batch-size", "2"]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "eval loss" in err and "3/3" in err  # 6 chunks in batches of 2
    code, _, err = run_cli(["eval", *base, "--task", "--task-eval", "4", "--batch-size", "2"], capsys)
    assert code == 0, err
    assert "exact match" in err and "4/4" in err
    code, _, err = run_cli(["generate", *base, "--prompt", "hi", "--max-new-tokens", "3"], capsys)
    assert code == 0, err
    assert "generate" in err and "token" in err
    code, _, err = run_cli(["eval", *base, "--task", "--task-eval", "4", "--no-progress"], capsys)
    assert code == 0 and err == ""
