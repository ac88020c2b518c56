"""--gradient-checkpointing auto|on|off: 'auto' recomputes only where activation memory is scarce (the GPU)."""

from __future__ import annotations

import pytest
from conftest import assert_one_line_error, run_cli

from backends.app.cli import build_parser
from backends.app.config import ModelConfig
from backends.app.flags import run_config_from_args
from backends.app.model import checkpointing_of, recomputes


@pytest.mark.parametrize(
    ("value", "backend", "want"),
    [
        ("auto", "numpy", False),
        ("auto", "cupy", True),
        ("on", "numpy", True),
        ("off", "cupy", False),
        (True, "numpy", True),
        (False, "cupy", False),
    ],  # fmt: skip
)
def test_checkpointing_resolves(value, backend, want):
    assert checkpointing_of(ModelConfig(backend=backend, gradient_checkpointing=value)) is want


def test_the_flag_parses_and_defaults_to_auto():
    argv = ["finetune", "--gradient-checkpointing", "on"]
    assert run_config_from_args(build_parser(argv).parse_args(argv)).model.gradient_checkpointing == "on"
    argv = ["finetune"]
    assert run_config_from_args(build_parser(argv).parse_args(argv)).model.gradient_checkpointing == "auto"


def test_a_bad_value_is_one_line(capsys):
    code, _, err = run_cli(["finetune", "--gradient-checkpointing", "maybe"], capsys)
    assert_one_line_error(code, err, "gradient-checkpointing")


def test_an_older_config_json_with_a_bool_reads_as_on_or_off():
    from backends.app.config import RunConfig, validate

    for old, new in ((True, "on"), (False, "off")):
        cfg = RunConfig.from_dict({"model": {"gradient_checkpointing": old}})
        assert cfg.model.gradient_checkpointing == new
        validate(cfg)  # a resumed old run passes the same checks as a new one


# --- 'auto' on the GPU: the memory ledger decides (settle_checkpointing) ------------------------------------------


def _prepared(checkpointing: bool):
    import torch
    import transformers
    from conftest import TINY_DECODER

    from backends.torchlib import prepare_model

    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_DECODER))
    return prepare_model(m, r=4, alpha=8, dropout=0.05, gradient_checkpointing=checkpointing)


def _stored_activation_bytes(model, batch: int, seq_len: int) -> int:
    from backends.torchlib.ledger import Runtime, activation_bytes
    from qlora_ref import memory

    q = model.qlora_config
    recipe = memory.Recipe(seq_len=seq_len, batch=batch, r=q.r, checkpointing=False, compute_dtype=q.compute_dtype,
                           lora_dtype=q.lora_dtype, lora_dropout=q.dropout)  # fmt: skip
    return activation_bytes(memory.shape_from_dict(model.config.to_dict()), recipe, Runtime())


def test_auto_stores_the_activations_exactly_when_the_ledger_puts_them_under_half_the_free_memory():
    from backends.app.model import STORED_ACTIVATIONS_SHARE, settle_checkpointing

    need = _stored_activation_bytes(_prepared(True), batch=8, seq_len=48)
    assert need > 0
    at_edge = int(need / STORED_ACTIVATIONS_SHARE)
    m = ModelConfig(backend="cupy", gradient_checkpointing="auto")

    kept = _prepared(True)
    line = settle_checkpointing(kept, m, batch=8, seq_len=48, free_bytes=at_edge - 1)
    assert line.startswith("gradient checkpointing on:") and "8 x 48 tokens" in line
    assert recomputes(kept) and kept.qlora_config.gradient_checkpointing

    dropped = _prepared(True)
    line = settle_checkpointing(dropped, m, batch=8, seq_len=48, free_bytes=at_edge)
    assert line.startswith("gradient checkpointing off:")
    assert not recomputes(dropped) and not dropped.qlora_config.gradient_checkpointing


@pytest.mark.parametrize(("value", "checkpointing"), [("on", True), ("off", False), ("auto", False)])
def test_nothing_is_decided_when_the_flag_says_so_or_the_model_does_not_recompute(value, checkpointing):
    from backends.app.model import settle_checkpointing

    model = _prepared(checkpointing)
    m = ModelConfig(backend="cupy", gradient_checkpointing=value)
    assert settle_checkpointing(model, m, batch=8, seq_len=48, free_bytes=1 << 50) is None
    assert recomputes(model) is checkpointing


def test_lora_dtype_flag_reaches_the_layers():
    argv = ["finetune", "--lora-dtype", "bfloat16"]
    assert run_config_from_args(build_parser(argv).parse_args(argv)).model.lora_dtype == "bfloat16"
    argv = ["finetune"]
    assert run_config_from_args(build_parser(argv).parse_args(argv)).model.lora_dtype == "float32"
