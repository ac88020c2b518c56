"""--gradient-checkpointing auto|on|off: 'auto' recomputes only where activation memory is scarce (the GPU)."""

from __future__ import annotations

import pytest
from conftest import assert_one_line_error, run_cli

from backends.app.cli import build_parser
from backends.app.config import ModelConfig
from backends.app.flags import run_config_from_args
from backends.app.model import checkpointing_of


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
