"""Command-line flags from the config dataclasses: one flag per field, its default, help and choices from the field
(``opt``), the task preset's or a recipe's values as defaults, and the namespace read back into the dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from .config import TASK_PRESET, DataConfig, ModelConfig, RunConfig, TrainConfig, flag_name

# --- flags from dataclasses ------------------------------------------------------------------------------------


def _base_type(tp):
    """int | None -> int; list[str] -> list; plain types pass through."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return origin or tp


def add_dataclass_args(
    parser: argparse.ArgumentParser, cls, *, defaults: dict | None = None, shown: dict | None = None
) -> None:
    """One argument per field of ``cls`` (module docstring); ``defaults`` overrides the default (a preset), ``shown``
    the words the help gives for a field's default (e.g. which applies when)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        help_text, choices = f.metadata.get("help", ""), f.metadata.get("choices")
        tp = _base_type(hints[f.name])
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if not has_default:
            if tp is list:
                group.add_argument(flag_name(f.name), dest=f.name, action="append", required=True, help=help_text)
            elif f.metadata.get("flag"):
                group.add_argument(
                    flag_name(f.name), dest=f.name, type=tp, required=True, help=help_text, metavar=tp.__name__
                )
            else:
                group.add_argument(f.name, type=tp, choices=choices, help=help_text)
            continue
        default = (defaults or {}).get(
            f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory()
        )
        help_text = f"{help_text} (default: {(shown or {}).get(f.name, repr(default))})"
        if tp is bool:
            group.add_argument(
                flag_name(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        elif tp is list:  # a repeatable flag; not given: the default (dataclass_from_args fills it in)
            group.add_argument(flag_name(f.name), dest=f.name, action="append", default=None, help=help_text)
        else:
            metavar = None if choices else tp.__name__
            group.add_argument(
                flag_name(f.name),
                dest=f.name,
                type=tp,
                default=default,
                choices=choices,
                help=help_text,
                metavar=metavar,
            )


def dataclass_from_args(cls, ns: argparse.Namespace):
    values = {}
    for f in dataclasses.fields(cls):
        v = getattr(ns, f.name)
        if v is None and f.default_factory is not dataclasses.MISSING:  # a defaulted list flag not given
            v = f.default_factory()
        values[f.name] = v
    return cls(**values)


def preset_defaults_shown() -> dict[str, str]:
    """finetune's help for a field the task preset sets: both defaults, and when each applies."""
    base = {**dataclasses.asdict(DataConfig()), **dataclasses.asdict(TrainConfig())}
    return {
        k: f"{v!r} with --data task (the task preset), {base[k]!r} with a data file"
        for k, v in TASK_PRESET.items()
        if not k.startswith("task_")  # the generated task's own sizes: nothing else uses them
    }


def add_run_args(parser: argparse.ArgumentParser, *, defaults: dict | None = None, recipe: str = "") -> None:
    """finetune's flags; ``defaults`` the task preset or a ``recipe``'s values (whose defaults the help then names)."""
    shown = preset_defaults_shown()
    if recipe:
        shown = {
            k: (f"{v!r}" if v is not None else "by the model's parameter count") + f", the {recipe} recipe's"
            for k, v in (defaults or {}).items()
        }
    for cls in (ModelConfig, DataConfig, TrainConfig):
        add_dataclass_args(parser, cls, defaults=defaults, shown=shown)


def run_config_from_args(ns: argparse.Namespace) -> RunConfig:
    return RunConfig(
        model=dataclass_from_args(ModelConfig, ns),
        data=dataclass_from_args(DataConfig, ns),
        train=dataclass_from_args(TrainConfig, ns),
    )
