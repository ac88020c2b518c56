"""The 4-bit matvec of decoding, one kernel call at a time: ours vs bitsandbytes vs bf16 cuBLAS vs the copy ceiling.

Per weight shape (out, in) and token count T (x [T, in] bf16 -> y [T, out] bf16; NF4, blocksize 64, double quant):
    ours           the cupy backend's ``matvec_4bit(order="any")`` (kernels/matvec_4bit.cu as launch.matvec_kernel
                   picks: v4 for one token up to MATVEC_V4_MAX_WEIGHTS weights, v3 otherwise; MV-8), into y, every
                   argument checked per call
    ours_bound     the same kernel through ``bind_matvec_4bit(q, T, order="any")(x, y)``: resolved once, a call reads
                   two addresses and launches; what QLoRALinear decodes with up to layer.MATVEC_TOKENS rows
    ours_spec      the same in the spec's order (v2: MV-1 .. MV-5, the spec's bits)
    ours_deq_gemm  dequantize_4bit into a scratch bf16 weight + torch.mm: the layer's path for more rows
    bnb     ``bitsandbytes.matmul_4bit(x, W.t(), quant_state)``: its GEMV kernel for one token, dequantize + GEMM
            for more (what ``Linear4bit`` runs in inference)
    bf16    ``torch.mm(x, W.t(), out=y)`` with W in bf16 (cuBLAS): the 16-bit layer it replaces
Modes: ``graph`` replays a CUDA graph of ``inner`` back-to-back calls (GPU time per call, no launch cost); ``eager``
times ``inner`` Python calls back to back with CUDA events (the launch path as a decode loop meets it).  Every
measurement rotates over enough weight sets that they do not fit the L2 cache, so each call reads its weight from
HBM, as a decode step's layers do.
Ceiling: a device-to-device copy of a 1 GiB buffer measured in the same run (TB/s = bytes read + written / time);
``pct_copy`` = the 4-bit bytes one call must read (packed codes, absmax codes, nested absmax) at that rate / our time.

    from benchmarks.decode_kernels import run_kernels     (bench_decode.py --part kernel calls it)
"""

from __future__ import annotations

import dataclasses
import math
import sys

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192))  # LLaMA-7B's linears and a 65B-class square
TOKENS = (1, 4, 16)


@dataclasses.dataclass
class KernelConfig:
    shapes: tuple = SHAPES
    tokens: tuple = TOKENS
    blocksize: int = 64
    reps: int = 30  # timings per measurement (median)
    inner: int = 20  # back-to-back calls per timing
    warmup: int = 5
    l2_multiple: float = 3.0  # rotating weight sets cover this many L2 caches


def four_bit_bytes(out_f: int, in_f: int, blocksize: int) -> int:
    """Bytes a 4-bit matvec must read: packed codes, one absmax code per block, one float32 per 256 blocks."""
    n = out_f * in_f
    blocks = math.ceil(n / blocksize)
    return n // 2 + blocks + 4 * math.ceil(blocks / 256)


def copy_tbs(torch, cfg: KernelConfig) -> float:
    """Device-to-device copy bandwidth of a 1 GiB buffer, TB/s (read + written bytes per second)."""
    from benchmarks.bench_quant import time_eager

    n = 1 << 29  # bf16 values: 1 GiB
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = time_eager(torch, [lambda: dst.copy_(src)], dataclasses.replace(cfg, inner=5))
    return 4 * n / ms / 1e9  # the buffers go with this frame


def bench_shape(torch, be, bnb, cfg: KernelConfig, shape, l2: int, tbs: float) -> list[dict]:
    from benchmarks.bench_quant import time_eager, time_graph

    out_f, in_f = shape
    nbytes = four_bit_bytes(out_f, in_f, cfg.blocksize)
    sets = max(2, math.ceil(cfg.l2_multiple * l2 / (2 * out_f * in_f)))  # bf16 weights (the largest) spill L2 too
    g = torch.Generator(device="cuda").manual_seed(0)
    weights = [(torch.randn(shape, generator=g, device="cuda") * 0.02).to(torch.bfloat16) for _ in range(sets)]
    ours_q = [be.quantize_4bit(w, blocksize=cfg.blocksize) for w in weights]
    bnb_q = [bnb.functional.quantize_4bit(w, blocksize=cfg.blocksize, compress_statistics=True, quant_type="nf4")
             for w in weights] if bnb is not None else None  # fmt: skip
    scratch = torch.empty(shape, dtype=torch.bfloat16, device="cuda")  # the layer's dequantize buffer
    rows = []
    for T in cfg.tokens:
        xs = [torch.randn(T, in_f, generator=g, device="cuda").to(torch.bfloat16) for _ in range(sets)]
        ys = [torch.empty(T, out_f, dtype=torch.bfloat16, device="cuda") for _ in range(sets)]
        bound = [be.bind_matvec_4bit(q, T, order="any") for q in ours_q]  # the decode layer's path
        calls = {
            "ours": [
                lambda i=i, xs=xs, ys=ys: be.matvec_4bit(xs[i], ours_q[i], out=ys[i], check_finite=False, order="any")
                for i in range(sets)
            ],
            "ours_bound": [lambda i=i, xs=xs, ys=ys, f=bound[i]: f(xs[i], ys[i]) for i in range(sets)],
            "ours_spec": [
                lambda i=i, xs=xs, ys=ys: be.matvec_4bit(xs[i], ours_q[i], out=ys[i], check_finite=False)
                for i in range(sets)
            ],
            "ours_deq_gemm": [
                lambda i=i, xs=xs, ys=ys: torch.mm(xs[i], be.dequantize_4bit(ours_q[i], out=scratch).t(), out=ys[i])
                for i in range(sets)
            ],
            "bf16": [lambda i=i, xs=xs, ys=ys: torch.mm(xs[i], weights[i].t(), out=ys[i]) for i in range(sets)],
        }
        if bnb is not None:
            calls["bnb"] = [lambda i=i, xs=xs: bnb.matmul_4bit(xs[i], bnb_q[i][0].t(), quant_state=bnb_q[i][1])
                            for i in range(sets)]  # fmt: skip
        row = dict(shape=[out_f, in_f], tokens=T, bytes_4bit=nbytes, copy_tbs=tbs, sets=sets)
        with torch.no_grad():
            for name, fns in calls.items():
                row[f"{name}_graph_us"] = _us(time_graph(torch, fns, cfg))
                row[f"{name}_eager_us"] = _us(time_eager(torch, fns, cfg))
        floor_us = nbytes / (tbs * 1e12) * 1e6
        row["floor_us"] = floor_us
        row["pct_copy"] = 100 * floor_us / row["ours_graph_us"] if row["ours_graph_us"] else None
        for peer in ("bnb", "bf16"):
            ours, theirs = row["ours_graph_us"], row.get(f"{peer}_graph_us")
            row[f"speedup_vs_{peer}_graph"] = theirs / ours if ours and theirs else None
        rows.append(row)
        print(f"  {out_f}x{in_f} T={T:<2} ours {_f(row['ours_graph_us'])} graph / {_f(row['ours_eager_us'])} eager us"
              f" (bound {_f(row['ours_bound_eager_us'])} eager)"
              f"  (spec order {_f(row['ours_spec_graph_us'])}, dequantize + GEMM {_f(row['ours_deq_gemm_graph_us'])})"
              f"  bnb {_f(row.get('bnb_graph_us'))} / {_f(row.get('bnb_eager_us'))}"
              f"  bf16 {_f(row['bf16_graph_us'])} / {_f(row['bf16_eager_us'])}"
              f"  floor {floor_us:.1f}  {_f(row['pct_copy'])}% of copy", file=sys.stderr, flush=True)  # fmt: skip
    return rows


def _us(ms):
    return None if ms is None else 1e3 * ms


def _f(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def run_kernels(cfg: KernelConfig | None = None) -> dict:
    """Every shape x token count; returns {"copy_tbs", "rows", headline keys} (gemv_<out>x<in>_t<T>_graph_us, ...)."""
    import torch

    from backends import get_backend

    cfg = cfg or KernelConfig()
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        print(f"  bitsandbytes is not installed ({e}): its columns stay empty", file=sys.stderr)
        bnb = None
    be = get_backend("cupy")
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    tbs = copy_tbs(torch, cfg)
    print(f"  copy {tbs:.2f} TB/s, L2 {l2 / 2**20:.0f} MiB", file=sys.stderr, flush=True)
    rows = []
    for shape in cfg.shapes:
        rows += bench_shape(torch, be, bnb, cfg, shape, l2, tbs)
        torch.cuda.empty_cache()
    doc = {"copy_tbs": tbs, "config": dataclasses.asdict(cfg), "rows": rows}
    for r in rows:
        key = f"gemv_{r['shape'][0]}x{r['shape'][1]}_t{r['tokens']}"
        doc[f"{key}_graph_us"] = r["ours_graph_us"]
        doc[f"{key}_eager_us"] = r["ours_eager_us"]
        doc[f"{key}_bound_eager_us"] = r["ours_bound_eager_us"]
        doc[f"{key}_speedup_vs_bnb_graph"] = r["speedup_vs_bnb_graph"]
    return doc
