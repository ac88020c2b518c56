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
"""

from __future__ import annotations

import json

import numpy as np

from .codebooks import codebook, dynamic_map

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


def from_bnb_state_dict(cls, d: dict, prefix: str = "weight"):
    """Build a Quantized4bit from bitsandbytes entries under ``prefix`` (FMT-5).

    Values may be numpy arrays or anything ``np.asarray`` reads (torch CPU tensors).  A quant_map or nested map other
    than the standard tables, or entries that disagree with the JSON, are errors.
    """
    blob_keys = [k for k in d if k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
    if len(blob_keys) != 1:
        raise KeyError(
            f"expected exactly one '{prefix}.quant_state.bitsandbytes__<type>' entry, found {len(blob_keys)}; "
            f"keys under the prefix: {sorted(k for k in d if k.startswith(prefix))}"
        )
    meta = json.loads(bytes(np.asarray(d[blob_keys[0]], np.uint8)).decode("utf-8"))
    quant_type = meta["quant_type"]
    if quant_type not in BNB_QUANT_TYPES or blob_keys[0].rsplit("__", 1)[1] != quant_type:
        raise ValueError(f"quant_state blob {blob_keys[0]!r} says quant_type {quant_type!r}")

    def get(name):
        key = f"{prefix}.{name}" if name else prefix
        if key not in d:
            raise KeyError(f"missing state-dict entry {key!r}")
        return np.asarray(d[key])

    quant_map = get("quant_map").astype(np.float32)
    if not np.array_equal(quant_map.view(np.uint32), codebook(quant_type).view(np.uint32)):
        raise ValueError(f"{prefix}.quant_map is not the standard {quant_type} table; custom tables are not supported")
    common = dict(
        packed=np.ascontiguousarray(get(""), np.uint8).ravel(),
        shape=tuple(meta["shape"]),
        dtype=meta["dtype"],
        quant_type=quant_type,
        blocksize=int(meta["blocksize"]),
    )
    if "nested_offset" in meta:
        nested_map = get("nested_quant_map").astype(np.float32)
        if not np.array_equal(nested_map.view(np.uint32), dynamic_map(signed=True).view(np.uint32)):
            raise ValueError(f"{prefix}.nested_quant_map is not bitsandbytes' signed dynamic map")
        return cls(
            absmax_q=np.ascontiguousarray(get("absmax"), np.uint8).ravel(),
            nested_absmax=np.ascontiguousarray(get("nested_absmax"), np.float32).ravel(),
            offset=np.float32(meta["nested_offset"]),
            nested_blocksize=int(meta["nested_blocksize"]),
            **common,
        )
    return cls(absmax=np.ascontiguousarray(get("absmax"), np.float32).ravel(), **common)
