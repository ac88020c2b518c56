"""The corruptions a state-dict reader must refuse (RT-4, FMT-5): one named change each to a bitsandbytes state
dict, and the check that reading it raises one clear error.  Re-exported by qlora_ref.testing.
"""

from __future__ import annotations

import json
import re

import numpy as np
from hypothesis import strategies as st

from .quantized import Quantized4bit


def _blob_key(d: dict, prefix: str) -> str:
    return next(k for k in d if k.startswith(f"{prefix}.quant_state.bitsandbytes__"))


def _with_meta(change):
    """A corruption that edits the JSON blob: change(meta) -> meta (or any JSON value, or raw bytes)."""

    def corrupt(d, prefix):
        key = _blob_key(d, prefix)
        meta = json.loads(bytes(d[key]).decode("utf-8"))
        new = change(meta)
        raw = new if isinstance(new, bytes) else json.dumps(new).encode("utf-8")
        return {**d, key: np.frombuffer(raw, np.uint8).copy()}

    return corrupt


def _with_entry(name, change):
    """A corruption that replaces entry ``prefix.name`` (name "" = the packed codes) by change(old array)."""

    def corrupt(d, prefix):
        key = f"{prefix}.{name}" if name else prefix
        return {**d, key: change(np.asarray(d[key]))}

    return corrupt


def _poison(value):
    def change(a):
        a = a.copy()
        a.reshape(-1)[-1] = value
        return a

    return change


def _drop(name):
    def corrupt(d, prefix):
        return {k: v for k, v in d.items() if k != f"{prefix}.{name}"}

    return corrupt


def _packed_above_255(a):
    wide = a.astype(np.int64)
    wide.reshape(-1)[0] += 256
    return wide


# name -> (applies to: "dq" | "plain" | "both", corrupt(d, prefix) -> d', exception, message regex).  FMT-5.
CORRUPTIONS = {
    "float32 absmax under a double-quant blob": (
        "dq",
        _with_entry("absmax", lambda a: a.astype(np.float32)),
        ValueError,
        r"absmax' must be uint8 \(8-bit absmax codes",
    ),
    "uint8 absmax in a plain state": (
        "plain",
        _with_entry("absmax", lambda a: np.minimum(a, 255).astype(np.uint8)),
        ValueError,
        r"absmax' must be float32 \(a plain state's scales",
    ),
    "int64 packed values above 255": (
        "both",
        _with_entry("", _packed_above_255),
        ValueError,
        r"got int64 \(values \d+\.\.\d+; a uint8 holds 0\.\.255\)",
    ),
    "int64 packed values": (
        "both",
        _with_entry("", lambda a: a.astype(np.int64)),
        ValueError,
        r"must be uint8 .*got int64",
    ),
    "uint16 packed values": (
        "both",
        _with_entry("", lambda a: a.astype(np.uint16)),
        ValueError,
        "must be uint8 .*got uint16",
    ),
    "float64 absmax": ("plain", _with_entry("absmax", lambda a: a.astype(np.float64)), ValueError, "got float64"),
    "NaN in absmax": ("plain", _with_entry("absmax", _poison(np.nan)), ValueError, r"absmax must hold finite"),
    "Inf in absmax": ("plain", _with_entry("absmax", _poison(np.inf)), ValueError, r"absmax must hold finite"),
    "negative absmax": ("plain", _with_entry("absmax", _poison(-1.0)), ValueError, r"absmax must hold finite, non-neg"),
    "NaN in nested_absmax": (
        "dq",
        _with_entry("nested_absmax", _poison(np.nan)),
        ValueError,
        r"nested_absmax must hold finite",
    ),
    "Inf in nested_absmax": (
        "dq",
        _with_entry("nested_absmax", _poison(np.inf)),
        ValueError,
        r"nested_absmax must hold finite",
    ),
    "NaN offset": ("dq", _with_meta(lambda m: {**m, "nested_offset": float("nan")}), ValueError, "nested_offset must"),
    "Inf offset": ("dq", _with_meta(lambda m: {**m, "nested_offset": float("inf")}), ValueError, "nested_offset must"),
    "offset beyond float32": ("dq", _with_meta(lambda m: {**m, "nested_offset": 1e300}), ValueError, "nested_offset"),
    "string offset": ("dq", _with_meta(lambda m: {**m, "nested_offset": "0.1"}), ValueError, "must be a number"),
    "blob without shape": (
        "both",
        _with_meta(lambda m: {k: v for k, v in m.items() if k != "shape"}),
        ValueError,
        r"has no \['shape'\]",
    ),
    "blob without quant_type": (
        "both",
        _with_meta(lambda m: {k: v for k, v in m.items() if k != "quant_type"}),
        ValueError,
        r"has no \['quant_type'\]",
    ),
    "blob with nested keys but no offset": (
        "dq",
        _with_meta(lambda m: {k: v for k, v in m.items() if k != "nested_offset"}),
        ValueError,
        "no nested_offset",
    ),
    "non-JSON blob": ("both", _with_meta(lambda m: b"{quant_type: nf4"), ValueError, "is not UTF-8 JSON"),
    "non-UTF-8 blob": ("both", _with_meta(lambda m: b"\xff\xfe{}"), ValueError, "is not UTF-8 JSON"),
    "JSON array blob": (
        "both",
        _with_meta(lambda m: list(m.values())),
        ValueError,
        "must hold a JSON object, got list",
    ),
    "blob of int64": (
        "both",
        lambda d, p: {**d, _blob_key(d, p): np.asarray(d[_blob_key(d, p)]).astype(np.int64)},
        ValueError,
        "must be uint8 bytes of UTF-8 JSON",
    ),
    "shape of floats": (
        "both",
        _with_meta(lambda m: {**m, "shape": [float(s) for s in m["shape"]]}),
        ValueError,
        "shape",
    ),
    "shape of another size": (
        "both",
        _with_meta(lambda m: {**m, "shape": [int(np.prod(m["shape"])) + 64]}),
        ValueError,
        "does not match its data",
    ),
    "unsupported dtype": ("both", _with_meta(lambda m: {**m, "dtype": "float64"}), ValueError, "got 'float64'"),
    "unknown blocksize": ("both", _with_meta(lambda m: {**m, "blocksize": 48}), ValueError, "blocksize must be one of"),
    "nested_blocksize 128": ("dq", _with_meta(lambda m: {**m, "nested_blocksize": 128}), ValueError, "must be 256"),
    "quant_type disagrees with the key": (
        "both",
        _with_meta(lambda m: {**m, "quant_type": "fp4" if m["quant_type"] == "nf4" else "nf4"}),
        ValueError,
        "says quant_type",
    ),
    "custom quant_map": ("both", _with_entry("quant_map", lambda a: a[::-1].copy()), ValueError, "not the standard"),
    "absmax one short": ("both", _with_entry("absmax", lambda a: a[:-1]), ValueError, "does not match its data"),
    "nested_absmax one long": (
        "dq",
        _with_entry("nested_absmax", lambda a: np.concatenate([a, a[:1]])),
        ValueError,
        "nested_absmax does not match its data",
    ),
    "nested entries in a plain state": (
        "plain",
        lambda d, p: {**d, f"{p}.nested_absmax": np.ones(1, np.float32)},
        ValueError,
        "incomplete double-quant state",
    ),
    "missing absmax": ("both", _drop("absmax"), KeyError, "missing state-dict entry"),
    "not a dict": ("both", lambda d, p: list(d.items()), TypeError, "a state dict maps keys to arrays"),
}


def corruptions(double_quant: bool | None = None) -> st.SearchStrategy[str]:
    """Names of `CORRUPTIONS` that apply to a state with (True) / without (False) double quantization, or any."""
    if double_quant is None:
        return st.sampled_from(sorted(CORRUPTIONS))
    kind = "dq" if double_quant else "plain"
    return st.sampled_from(sorted(n for n, (applies, *_) in CORRUPTIONS.items() if applies in (kind, "both")))


def check_refused(d: dict, prefix: str, name: str) -> None:
    """RT-4: the corruption ``name`` of a valid state dict is refused with its one clear error, naming the entry."""
    applies, corrupt, error, message = CORRUPTIONS[name]
    double_quant = f"{prefix}.nested_absmax" in d
    if applies != "both" and applies != ("dq" if double_quant else "plain"):
        raise ValueError(f"corruption {name!r} applies to {applies} states only")
    bad = corrupt(d, prefix)
    try:
        Quantized4bit.from_bnb_state_dict(bad, prefix)
    except error as e:
        text = str(e)
        assert re.search(message, text), f"{name}: message {text!r} does not match {message!r}"
        assert "\n" not in text, f"{name}: the error is not one line: {text!r}"
        return
    raise AssertionError(f"corruption {name!r} was accepted")
