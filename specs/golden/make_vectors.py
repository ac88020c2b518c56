"""Write specs/golden/vectors.json: small cases re-derived from the reference and checked against bitsandbytes' CUDA.

For the smallest case of each (kind, quant_type, double_quant) in ../shared/golden, the
reference recomputes every output; the script refuses to write unless they equal bitsandbytes' CUDA output byte for
byte.  tests/spec/test_specs.py re-derives the file from the reference and compares.

    python specs/golden/make_vectors.py [path/to/bnb_cuda_0.50.2.npz]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

import qlora_ref as Q

HERE = Path(__file__).resolve().parent
KINDS = ["normal", "zero_block", "midpoints", "ties", "tiny", "heavy"]
DTYPE = {32: "float32", 16: "bfloat16", 15: "float16"}


def case_from_reference(x_bits: list[int] | list[float], dtype: str, quant_type: str, blocksize: int, dq: bool) -> dict:
    """All outputs of the reference for one input, as hex strings (little-endian bytes)."""
    x = np.array(x_bits, np.uint16) if dtype == "bfloat16" else np.array(x_bits, dtype)
    q = Q.quantize_4bit(x, quant_type=quant_type, blocksize=blocksize, double_quant=dq, dtype=dtype)
    out = {"packed": q.packed.tobytes().hex(), "deq": Q.dequantize_4bit(q).tobytes().hex()}
    if dq:
        out |= {
            "absmax_q": q.absmax_q.tobytes().hex(),
            "nested_absmax": q.nested_absmax.tobytes().hex(),
            "offset": np.float32(q.offset).tobytes().hex(),
        }
    else:
        out["absmax"] = q.absmax.tobytes().hex()
    return out


def main(npz: Path) -> None:
    z = np.load(npz)
    names = sorted({k.split("_")[0] for k in z.files})
    smallest: dict[tuple, tuple[int, int, str]] = {}
    for index, name in enumerate(names):
        _, qt, dq, _ = (int(v) for v in z[f"{name}_meta"])
        key = (KINDS[(index // 12) % 6], qt, dq)
        smallest[key] = min(smallest.get(key, (1 << 62, 0, "")), (z[f"{name}_x"].size, index, name))
    chosen: dict[tuple, dict] = {}
    for key, (_, _index, name) in sorted(smallest.items()):
        blocksize, qt, dq, dt = (int(v) for v in z[f"{name}_meta"])
        kind = key[0]
        x = z[f"{name}_x"]
        dtype = DTYPE[dt]
        xs = x.view(np.uint16).tolist() if dtype == "bfloat16" else x.astype(dtype).tolist()
        case = {
            "name": name,
            "kind": kind,
            "dtype": dtype,
            "quant_type": ("nf4", "fp4")[qt],
            "blocksize": blocksize,
            "double_quant": bool(dq),
            "x": xs,
        }
        case["expect"] = case_from_reference(xs, dtype, case["quant_type"], blocksize, bool(dq))
        peer = {"packed": z[f"{name}_packed"].tobytes().hex()}
        peer_deq = z[f"{name}_deq"]
        deq = np.frombuffer(bytes.fromhex(case["expect"]["deq"]), np.uint16 if dtype == "bfloat16" else dtype)
        deq32 = Q.bf16_to_f32(deq) if dtype == "bfloat16" else deq.astype(np.float32)
        if peer["packed"] != case["expect"]["packed"] or not np.array_equal(
            deq32.view(np.uint32), peer_deq.view(np.uint32)
        ):
            raise SystemExit(f"{name}: the reference disagrees with bitsandbytes' CUDA output; not writing")
        chosen[key] = case
    (HERE / "vectors.json").write_text(json.dumps(list(chosen.values()), indent=1) + "\n")
    print(f"wrote {len(chosen)} cases to {HERE / 'vectors.json'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parents[2] / "shared" / "golden" / "bnb_cuda_0.50.2.npz")
