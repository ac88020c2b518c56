"""Issue 12 item 3 through the command line: `qlora quantize` writes a bitsandbytes 4-bit checkpoint, and
`qlora finetune --model <that checkpoint>` trains on its stored 4-bit state (not re-quantized), on a tiny LLaMA.

FMT-5: the checkpoint's 4-bit entries are read as they are; the finetune's model holds exactly the saved states.
"""

from __future__ import annotations

import json

import pytest
from conftest import require
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")


def test_quantize_then_finetune_on_the_checkpoint(tiny_hf_dir, tmp_path, capsys, shared_dir):
    from backends.app.cli import main
    from backends.torchlib.load import load_model

    ckpt = tmp_path / "q"
    assert main(["quantize", str(tiny_hf_dir), str(ckpt), "--dtype", "float32"]) == 0
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    saved = load_file(str(next(ckpt.glob("*.safetensors"))))
    model = load_model(ckpt, dropout=0.0)  # the stored states, as they are
    for name, m in model.named_modules():
        if hasattr(m, "q"):
            assert (m.q.to_bnb_state_dict(f"{name}.weight")[f"{name}.weight"] == saved[f"{name}.weight"]).all(), name

    data = shared_dir / "data" / "alpaca" / "alpaca_5000.json"
    require(data.is_file(), f"{data} is missing")
    out = tmp_path / "run"
    argv = ["finetune", "--model", str(ckpt), "--data", str(data), "--max-examples", "16", "--max-steps", "1",
            "--batch-size", "2", "--grad-accum", "1", "--r", "4", "--output-dir", str(out)]  # fmt: skip
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1
    assert (out / "adapter" / "adapter_model.safetensors").is_file() or any(out.rglob("adapter_model.safetensors"))
