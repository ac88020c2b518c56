"""bitsandbytes / Hugging Face 4-bit state-dict entries (specs/formats.md, rules FMT-1 .. FMT-5).

Under a prefix (a Linear4bit's ``<module>.weight``), bitsandbytes' ``QuantState.as_dict(packed=True)`` writes:

    weight                                   uint8 [(n + 1) // 2, 1]   packed codes                      (FMT-1)
    weight.absmax                            uint8 [nblocks] when double-quantized, else float32 [nblocks]
    weight.quant_map                         float32 [16]            the 4-bit table
    weight.nested_absmax                     float32 [ceil(nblocks / 256)]            (double quant only)
    weight.nested_quant_map                  float32 [256]           signed dynamic map (double quant only)
    weight.quant_state.bitsandbytes__nf4     uint8 [len]             UTF-8 JSON                         (FMT-2)

FMT-2  The JSON is ``json.dumps`` with default separators and this key order: quant_type, blocksize, dtype, shape,
       then nested_blocksize, nested_dtype, nested_offset (double quant only).  ``nested_offset`` is the float32
       offset written as a Python float.

FMT-5 (reading) checks, never casts: each entry must have the dtype bitsandbytes writes and the size the JSON's shape
and block size give, the JSON must be bitsandbytes' object, the constants finite and non-negative.  Whatever breaks a
rule is one ValueError naming the key, what was expected and what was found (a non-dict is a TypeError).  The packed
codes may also arrive in a float quant_storage (bitsandbytes' ``quant_storage=torch.bfloat16`` etc.): its bytes are
the same, and are read as bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np

from .checks import check_blocksize, check_constants
from .codebooks import codebook, dynamic_map
from .dtypes import as_numpy, resolve_dtype

BNB_QUANT_TYPES = ("nf4", "fp4")


def to_bnb_state_dict(q, prefix: str = "weight") -> dict[str, np.ndarray]:
    """The entries bitsandbytes writes for q under ``prefix`` (FMT-1, FMT-2)."""
    if q.quant_type not in BNB_QUANT_TYPES:
        raise ValueError(f"bitsandbytes has no {q.quant_type!r} type; only {BNB_QUANT_TYPES} can be exported")
    meta = {"quant_type": q.quant_type, "blocksize": q.blocksize, "dtype": q.dtype, "shape": list(q.shape)}
    d = {prefix: q.packed.reshape(-1, 1).copy(), f"{prefix}.quant_map": codebook(q.quant_type)}
    if q.double_quant:
        d[f"{prefix}.absmax"] = q.absmax_q.copy()
        d[f"{prefix}.nested_absmax"] = q.nested_absmax.copy()
        d[f"{prefix}.nested_quant_map"] = dynamic_map(signed=True)
        meta.update(nested_blocksize=q.nested_blocksize, nested_dtype="float32", nested_offset=float(q.offset))
    else:
        d[f"{prefix}.absmax"] = q.absmax.copy()
    blob = json.dumps(meta).encode("utf-8")
    d[f"{prefix}.quant_state.bitsandbytes__{q.quant_type}"] = np.frombuffer(blob, np.uint8).copy()
    return d


_META_KEYS = ("quant_type", "blocksize", "dtype", "shape")
_NESTED_META_KEYS = ("nested_blocksize", "nested_dtype", "nested_offset")
_STORAGE_DTYPES = ("float16", "bfloat16", "float32")  # bitsandbytes' float quant_storage: the same bytes, viewed


def from_bnb_state_dict(cls, d: Mapping, prefix: str = "weight"):
    """Build a Quantized4bit from bitsandbytes entries under ``prefix`` (FMT-5).

    Values may be numpy arrays, torch CPU tensors or anything ``np.asarray`` reads; their dtypes are checked, never
    cast.  A quant_map or nested map other than the standard tables, entries that disagree with the JSON, a JSON that
    is not bitsandbytes', and non-finite or negative constants are ValueErrors naming the key.
    """
    if not isinstance(d, Mapping):
        raise TypeError(f"a state dict maps keys to arrays (dict or Mapping), got {type(d).__name__}")
    blob_key, meta = _read_blob(d, prefix)
    quant_type = meta["quant_type"]
    double_quant = "nested_offset" in meta
    shape = tuple(meta["shape"])
    n = int(np.prod(shape, dtype=np.int64))
    blocksize = meta["blocksize"]
    nblocks = -(-n // blocksize)

    def get(name: str, dtype: str, size: int, field: str | None, why: str) -> np.ndarray:
        """The entry ``prefix.name`` as a flat array of ``dtype`` and ``size`` elements, or a ValueError naming it.

        field: the Quantized4bit field it fills (None for the fixed tables, whose size does not depend on the data).
        """
        key = f"{prefix}.{name}" if name else prefix
        if key not in d:
            raise KeyError(f"missing state-dict entry {key!r} ({why}); keys under the prefix: {_keys(d, prefix)}")
        arr, got = as_numpy(d[key], key)
        if name == "" and got in _STORAGE_DTYPES:  # packed codes in a float quant_storage: read its bytes
            arr, got = np.ascontiguousarray(arr).view(np.uint8), "uint8"
        if got != dtype:
            values = ""
            if arr.dtype.kind in "iu" and arr.size:
                values = f" (values {int(arr.min())}..{int(arr.max())}; a uint8 holds 0..255)"
            raise ValueError(f"{key!r} must be {dtype} ({why}), got {got}{values}; the entry is not bitsandbytes'")
        if arr.size != size and field is None:
            raise ValueError(f"{key!r} must hold {size} {dtype} values ({why}), got shape {arr.shape}")
        if arr.size != size:
            raise ValueError(
                f"{key!r} holds the {field}, and {field} does not match its data: a tensor of shape {shape} at "
                f"blocksize {blocksize} needs {dtype} ({size},), got {dtype} {arr.shape}"
            )
        return np.ascontiguousarray(arr).ravel()

    quant_map = get("quant_map", "float32", 16, None, f"the 16-entry {quant_type} table")
    if not np.array_equal(quant_map.view(np.uint32), codebook(quant_type).view(np.uint32)):
        raise ValueError(f"{prefix}.quant_map is not the standard {quant_type} table; custom tables are not supported")
    common = dict(
        packed=get("", "uint8", (n + 1) // 2, "packed", "two 4-bit codes a byte"),
        shape=shape,
        dtype=meta["dtype"],
        quant_type=quant_type,
        blocksize=blocksize,
    )
    if not double_quant:
        stray = [k for k in (f"{prefix}.nested_absmax", f"{prefix}.nested_quant_map") if k in d]
        if stray:
            raise ValueError(f"{stray} given but {blob_key!r} has no nested_offset: an incomplete double-quant state")
        absmax = get("absmax", "float32", nblocks, "absmax", "a plain state's scales; no nested_offset in the JSON")
        check_constants(absmax, f"{prefix}.absmax")
        return cls(absmax=absmax, **common)
    nested_map = get("nested_quant_map", "float32", 256, None, "the signed dynamic map")
    if not np.array_equal(nested_map.view(np.uint32), dynamic_map(signed=True).view(np.uint32)):
        raise ValueError(f"{prefix}.nested_quant_map is not bitsandbytes' signed dynamic map")
    nested_absmax = get(
        "nested_absmax", "float32", -(-nblocks // 256), "nested_absmax", "one float32 scale per 256 absmax codes"
    )
    check_constants(nested_absmax, f"{prefix}.nested_absmax")
    return cls(
        absmax_q=get("absmax", "uint8", nblocks, "absmax_q", "8-bit absmax codes: the JSON has nested_offset"),
        nested_absmax=nested_absmax,
        offset=np.float32(meta["nested_offset"]),
        nested_blocksize=meta["nested_blocksize"],
        **common,
    )


def _keys(d: Mapping, prefix: str) -> list:
    return sorted(str(k) for k in d if str(k).startswith(prefix))


def _read_blob(d: Mapping, prefix: str) -> tuple[str, dict]:
    """(key, JSON object) of the one quant_state blob under prefix, checked against FMT-2's keys and types."""
    blob_keys = [k for k in d if isinstance(k, str) and k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
    if len(blob_keys) != 1:
        raise KeyError(
            f"expected exactly one '{prefix}.quant_state.bitsandbytes__<type>' entry, found {len(blob_keys)}; "
            f"keys under the prefix: {_keys(d, prefix)}"
        )
    key = blob_keys[0]
    raw, got = as_numpy(d[key], key)
    if got != "uint8":
        raise ValueError(f"{key!r} must be uint8 bytes of UTF-8 JSON, got {got}")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{key!r} is not UTF-8 JSON ({e}); the quant_state blob is corrupt") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{key!r} must hold a JSON object, got {type(meta).__name__}")
    double_quant = "nested_offset" in meta
    expected = _META_KEYS + (_NESTED_META_KEYS if double_quant else ())
    missing = [k for k in expected if k not in meta]
    if missing:
        raise ValueError(f"{key!r} has no {missing}: bitsandbytes writes {list(expected)}; found {list(meta)}")
    stray = [k for k in _NESTED_META_KEYS if k in meta and not double_quant]
    if stray:
        raise ValueError(f"{key!r} has {stray} but no nested_offset: an incomplete double-quant state")
    quant_type = meta["quant_type"]
    if quant_type not in BNB_QUANT_TYPES or key.rsplit("__", 1)[1] != quant_type:
        raise ValueError(f"quant_state blob {key!r} says quant_type {quant_type!r}")
    shape = meta["shape"]
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"{key!r} shape must be a list of positive ints, got {shape!r}")
    for name in ("blocksize", "nested_blocksize"):
        if name in meta and (not isinstance(meta[name], int) or isinstance(meta[name], bool)):
            raise ValueError(f"{key!r} {name} must be an int, got {meta[name]!r}")
    try:
        check_blocksize(meta["blocksize"])
        if not isinstance(meta["dtype"], str):
            raise ValueError(f"dtype must be a name such as 'bfloat16', got {meta['dtype']!r}")
        resolve_dtype(meta["dtype"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{key!r}: {e}") from None
    if double_quant:
        offset = meta["nested_offset"]
        if isinstance(offset, bool) or not isinstance(offset, (int, float)):
            raise ValueError(f"{key!r} nested_offset must be a number, got {offset!r}")
        if meta["nested_dtype"] != "float32":
            raise ValueError(f"{key!r} nested_dtype must be 'float32', got {meta['nested_dtype']!r}")
        if meta["nested_blocksize"] != 256:
            raise ValueError(f"{key!r} nested_blocksize must be 256, got {meta['nested_blocksize']}")
        with np.errstate(over="ignore"):  # an offset beyond float32 becomes inf, refused as not finite
            check_constants(np.float32(offset), f"{key!r} nested_offset")
    return key, meta
