"""NF4 quantize / dequantize: the CuPy backend vs bitsandbytes vs a device-to-device copy, in one run on one GPU.

Ops (blocksize 64, NF4, double quantization, bf16 weights; LLaMA-7B and LLaMA-65B weight shapes):
  dequant   packed NF4 + nested absmax -> bf16 into a preallocated buffer.  Bytes: 0.5 read + 2 written per weight,
            + 1/64 B of absmax codes + 4/16384 B of nested absmax.
  quantize  bf16 -> packed NF4 + double-quantized absmax.  Bytes: 2 read + 0.5 written + 1/64 (+ the tiny nested state).
  copy      a device-to-device bf16 copy of the same n values (2 read + 2 written per value): the ceiling.
Timing: CUDA events after warm-up, median over `reps` timings of `inner` back-to-back calls, rotating over enough
buffer sets that the working set exceeds L2.  "eager" is the Python call as users make it (ours syncs once per
quantize to check for NaN/Inf); "graph" replays a CUDA graph of the same calls (GPU time, launch overhead removed)
where both sides can be captured; "kernels" sums the GPU time of one call's kernels and copies (CUPTI through
torch.profiler) for ops that cannot be captured (our quantize reads its status words back).
Rows: ours, bitsandbytes, ratio (bnb time / ours), our TB/s, % of the copy.

    python benchmarks/bench_quant.py [--reps 30] [--out benchmarks/results]      (on a GPU; QLORA_COMMIT=<sha>)
    python benchmarks/bench_quant.py --plot benchmarks/results/bench_quant_<device>.json   (PNG from saved JSON)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import commit, cuda_median_ms  # noqa: E402


@dataclasses.dataclass
class Config:
    shapes: tuple = ((4096, 4096), (11008, 4096), (8192, 8192), (22016, 8192))  # LLaMA-7B, LLaMA-65B weights
    blocksize: int = 64  # QLoRA's first-level block
    reps: int = 30  # timings per measurement (median reported)
    inner: int = 10  # back-to-back calls per timing
    warmup: int = 5  # untimed calls first (compilation, caches)
    l2_multiple: float = 3.0  # rotating buffer sets cover this many L2s
    out: str = "benchmarks/results"


def time_eager(torch, calls, cfg: Config) -> float:
    """Median milliseconds per call over rotating callables."""
    for i in range(cfg.warmup):
        calls[i % len(calls)]()
    torch.cuda.synchronize()
    times = []
    for r in range(cfg.reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for k in range(cfg.inner):
            calls[(r * cfg.inner + k) % len(calls)]()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / cfg.inner)
    return statistics.median(times)


def time_graph(torch, calls, cfg: Config) -> float | None:
    """Median milliseconds per call replaying a CUDA graph of `inner` rotating calls; None if capture fails."""
    try:
        for c in calls:
            c()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            with torch.cuda.graph(graph, stream=stream):
                for k in range(cfg.inner):
                    calls[k % len(calls)]()
        torch.cuda.current_stream().wait_stream(stream)
    except Exception as exc:
        print(f"    (graph capture failed: {exc.__class__.__name__}: {str(exc)[:120]})")
        torch.cuda.synchronize()
        return None
    return cuda_median_ms(graph.replay, warmup=cfg.warmup, reps=cfg.reps, per=cfg.inner)


def profile_kernels(torch, label: str, call, quiet: bool = False) -> list[dict]:
    """GPU kernels of one call (CUPTI through torch.profiler: CuPy's kernels included), printed and returned."""
    call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append({"name": e.key[:90], "us": t, "count": e.count})
    rows.sort(key=lambda r: -r["us"])
    if not quiet:
        print(
            f"  kernels of one {label} call: "
            + "; ".join(f"{r['name'][:48]} {r['us']:.1f}us x{r['count']}" for r in rows)
        )
    return rows


def bench_shape(torch, bnbf, be, build, ops, cfg: Config, shape, l2: int, rows: list) -> None:
    """All measurements of one weight shape, appended to rows (and printed)."""
    n = shape[0] * shape[1]
    bytes_deq = 0.5 * n + n / cfg.blocksize + 4 * math.ceil(n / cfg.blocksize / 256) + 2 * n
    bytes_q = 2 * n + 0.5 * n + n / cfg.blocksize + 4 * math.ceil(n / cfg.blocksize / 256)
    sets = max(2, math.ceil(cfg.l2_multiple * l2 / bytes_deq))
    g = torch.Generator(device="cuda").manual_seed(0)
    weights = [(torch.randn(shape, generator=g, device="cuda") * 0.02).to(torch.bfloat16) for _ in range(sets)]
    ours_q = [be.quantize_4bit(w, blocksize=cfg.blocksize) for w in weights]
    bnb_q = [
        bnbf.quantize_4bit(w, blocksize=cfg.blocksize, compress_statistics=True, quant_type="nf4") for w in weights
    ]
    outs = [torch.empty(shape, dtype=torch.bfloat16, device="cuda") for _ in range(sets)]
    outs_bnb = [torch.empty(shape, dtype=torch.bfloat16, device="cuda") for _ in range(sets)]
    srcs = [torch.randn(shape, generator=g, device="cuda").to(torch.bfloat16) for _ in range(sets)]

    copy_calls = [lambda i=i: outs[i].copy_(srcs[i]) for i in range(sets)]
    copy_ms = time_eager(torch, copy_calls, cfg)
    copy_tbs = 4 * n / copy_ms / 1e9

    def ours_deq(chunks):
        return [lambda i=i: ops.dequantize_4bit(ours_q[i], out=outs[i], chunks=chunks) for i in range(sets)]

    bnb_deq = [lambda i=i: bnbf.dequantize_4bit(bnb_q[i][0], bnb_q[i][1], out=outs_bnb[i]) for i in range(sets)]
    ours_quant = [lambda i=i: be.quantize_4bit(weights[i], blocksize=cfg.blocksize) for i in range(sets)]
    bnb_quant = [
        lambda i=i: bnbf.quantize_4bit(weights[i], blocksize=cfg.blocksize, compress_statistics=True, quant_type="nf4")
        for i in range(sets)
    ]
    measurements = [
        ("dequant", "eager", ours_deq(build.DEQUANT_CHUNKS_DEFAULT), bnb_deq, bytes_deq, time_eager),
        ("dequant", "graph", ours_deq(build.DEQUANT_CHUNKS_DEFAULT), bnb_deq, bytes_deq, time_graph),
        ("quantize", "eager", ours_quant, bnb_quant, bytes_q, time_eager),
    ]
    for chunks in build.DEQUANT_CHUNKS:
        if chunks != build.DEQUANT_CHUNKS_DEFAULT:
            measurements.append((f"deq_ch{chunks}", "graph", ours_deq(chunks), None, bytes_deq, time_graph))

    def kernel_time(calls):  # median over rotating calls of the summed GPU time of one call's kernels (ms)
        def timer(torch, calls_, cfg_):
            return statistics.median(
                sum(r["us"] for r in profile_kernels(torch, "", c, quiet=True)) / 1e3 for c in calls_[: min(3, sets)]
            )

        return timer

    measurements.append(("quantize", "kernels", ours_quant, bnb_quant, bytes_q, kernel_time(None)))
    for op, mode, ours_calls, bnb_calls, nbytes, timer in measurements:
        ours_ms = timer(torch, ours_calls, cfg)
        bnb_ms = timer(torch, bnb_calls, cfg) if bnb_calls is not None else None
        row = {
            "op": op,
            "mode": mode,
            "shape": list(shape),
            "n": n,
            "bytes": nbytes,
            "ours_ms": ours_ms,
            "bnb_ms": bnb_ms,
            "copy_ms": copy_ms,
            "copy_tbs": copy_tbs,
            "ours_tbs": nbytes / ours_ms / 1e9 if ours_ms else None,
            "bnb_tbs": nbytes / bnb_ms / 1e9 if bnb_ms else None,
        }
        row["ratio"] = bnb_ms / ours_ms if (ours_ms and bnb_ms) else None
        row["pct_copy"] = 100 * row["ours_tbs"] / copy_tbs if ours_ms else None
        rows.append(row)

        def fmt(v, spec):
            return format(v, spec) if v is not None else "-".rjust(len(format(1.0, spec)))

        print(
            f"{op:<10}{mode:<7}{'x'.join(map(str, shape)):>13}{fmt(ours_ms, '10.4f')}{fmt(bnb_ms, '10.4f')}"
            f"{fmt(row['ratio'], '10.2f')}{fmt(row['ours_tbs'], '11.3f')}{copy_tbs:11.3f}"
            f"{fmt(row['pct_copy'], '8.1f')}"
        )


def run(cfg: Config) -> dict:
    import bitsandbytes.functional as bnbf
    import torch

    from backends import get_backend
    from backends.cupy_backend import build, ops

    be = get_backend("cupy")
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    rows = []
    print(f"device: {props.name}  L2 {l2 / 2**20:.0f} MiB  commit {commit()}")
    header = f"{'op':<10}{'mode':<7}{'shape':>13}{'ours ms':>10}{'bnb ms':>10}{'bnb/ours':>10}{'ours TB/s':>11}"
    header += f"{'copy TB/s':>11}{'% copy':>8}"
    print(header)
    for shape in cfg.shapes:
        bench_shape(torch, bnbf, be, build, ops, cfg, shape, l2, rows)
        torch.cuda.empty_cache()
    profiles = {}
    shape = cfg.shapes[-1]
    w = (torch.randn(shape, device="cuda") * 0.02).to(torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    q = be.quantize_4bit(w, blocksize=cfg.blocksize)
    qb = bnbf.quantize_4bit(w, blocksize=cfg.blocksize, compress_statistics=True, quant_type="nf4")
    for label, call in [
        ("ours quantize", lambda: be.quantize_4bit(w, blocksize=cfg.blocksize)),
        (
            "bnb quantize",
            lambda: bnbf.quantize_4bit(w, blocksize=cfg.blocksize, compress_statistics=True, quant_type="nf4"),
        ),
        ("ours dequant", lambda: be.dequantize_4bit(q, out=out)),
        ("bnb dequant", lambda: bnbf.dequantize_4bit(qb[0], qb[1], out=out)),
    ]:
        profiles[label] = profile_kernels(torch, f"{label} {shape}", call)
    summary = {}
    for op, mode in (("dequant", "eager"), ("dequant", "graph"), ("quantize", "eager"), ("quantize", "kernels")):
        ratios = [r["ratio"] for r in rows if r["op"] == op and r["mode"] == mode and r["ratio"]]
        pct = [r["pct_copy"] for r in rows if r["op"] == op and r["mode"] == mode and r["pct_copy"]]
        if ratios:
            summary[f"{op}_{mode}"] = {
                "geomean_ratio": math.exp(sum(map(math.log, ratios)) / len(ratios)),
                "min_pct_copy": min(pct),
            }
    print("summary:", json.dumps(summary))
    return {
        "device": props.name,
        "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": dataclasses.asdict(cfg),
        "torch": torch.__version__,
        "bitsandbytes": __import__("bitsandbytes").__version__,
        "cupy": __import__("cupy").__version__,
        "rows": rows,
        "summary": summary,
        "kernel_profiles": profiles,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("dequant", "graph"), ("dequant", "eager"), ("quantize", "kernels"), ("quantize", "eager")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (op, mode) in zip(axes[0], panels, strict=True):
        rows = [r for r in result["rows"] if r["op"] == op and r["mode"] == mode]
        labels = ["x".join(map(str, r["shape"])) for r in rows]
        xs = range(len(rows))
        w = 0.27
        ax.bar([x - w for x in xs], [r["ours_tbs"] or 0 for r in rows], w, label="qlora-ref cupy")
        ax.bar(list(xs), [r["bnb_tbs"] or 0 for r in rows], w, label="bitsandbytes")
        ax.bar([x + w for x in xs], [r["copy_tbs"] for r in rows], w, label="D2D copy (ceiling)")
        ax.set_xticks(list(xs), labels, rotation=20)
        ax.set_ylabel("TB/s (bytes moved / time)")
        ax.set_title(f"NF4+DQ {op} ({mode})")
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['device']}  commit {result['commit'][:10]}  {result['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    defaults = Config()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        if f.name != "shapes":
            ap.add_argument(f"--{f.name}", type=type(getattr(defaults, f.name)), default=getattr(defaults, f.name))
    ap.add_argument("--small", action="store_true", help="only the two LLaMA-7B shapes")
    ap.add_argument("--plot", type=Path, help="only draw the PNG of a saved JSON result")
    args = ap.parse_args()
    if args.plot:
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        return
    cfg = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if f.name != "shapes"})
    if args.small:
        cfg.shapes = cfg.shapes[:2]
    print("config:", json.dumps(dataclasses.asdict(cfg)))
    result = run(cfg)
    out = REPO / cfg.out
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench_quant_" + "".join(c if c.isalnum() else "_" for c in result["device"]).strip("_")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / stem}.json")
    try:
        plot(result, out / f"{stem}.png")
    except ImportError:
        print("matplotlib not installed here: draw the PNG later with --plot")


if __name__ == "__main__":
    main()
