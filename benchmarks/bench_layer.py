"""One QLoRA layer's forward + backward: GPU time and host time per call, ours vs bitsandbytes vs bf16, side by side.

Variants (x requires grad, base weight frozen, LoRA r 64 / alpha 16 in bf16, dropout 0, bf16 compute):
    ours-eager     QLoRALinear (cupy backend), eager autograd
    ours-graph     the same layer's forward + backward captured once in a torch.cuda.CUDAGraph, replayed
    ours-compile   torch.compile(QLoRALinear) through the qlora:: custom operators (no graph break), eager launch
    bnb            bitsandbytes Linear4bit (NF4, double quant, bf16 compute) + a PEFT LoRA pair
    bf16           torch nn.Linear (bf16) + a PEFT LoRA pair
Shapes (out x in): SmolLM2-135M's 576x576, 1536x576, 576x1536 at 2048 tokens; LLaMA-7B's 4096x4096, 11008x4096,
4096x11008 at 4096 tokens.

Timing: a call = forward, backward of sum-free grad (y.backward(dY)).  GPU ms: CUDA events around CALLS calls queued
behind a long torch.cuda._sleep, so the GPU runs them back to back (its time alone); host ms: perf_counter around the
same enqueue (the Python and launch cost; the GPU never blocks it).  Median of REPS.  The ceiling: the layer's GEMM
FLOPs at this run's measured bf16 GEMM rate (8192^3).

    python benchmarks/bench_layer.py             # table + benchmarks/results/bench_layer.{json,png}
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import RESULTS, commit, save  # noqa: E402

SHAPES = [(576, 576, 2048), (1536, 576, 2048), (576, 1536, 2048), (4096, 4096, 4096), (11008, 4096, 4096),
          (4096, 11008, 4096)]  # fmt: skip
R, ALPHA = 64, 16
CALLS, REPS = 20, 15


def gemm_tflops() -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return 2 * 8192**3 / (statistics.median(times) * 1e-3) / 1e12


def layer_flops(out_f: int, in_f: int, tokens: int) -> float:
    """fwd: x W^T, x A^T, u B^T; bwd: dY W, dY B, dY^T u, du^T x, du A."""
    base = 2 * tokens * out_f * in_f
    lora = 2 * tokens * R * (in_f + out_f)
    return 2 * base + 3 * lora


def timed(call, *, calls=CALLS, reps=REPS) -> tuple[float, float]:
    """(gpu ms, host ms) per call, medians over reps."""
    import torch

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    gpu, host = [], []
    for _ in range(reps):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU spin: the queue never drains while we enqueue
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        t1 = time.perf_counter()
        e.record()
        e.synchronize()
        gpu.append(s.elapsed_time(e) / calls)
        host.append((t1 - t0) * 1e3 / calls)
    return statistics.median(gpu), statistics.median(host)


def make_ours(out_f, in_f):
    import torch

    from backends.torchlib import QLoRALinear

    lin = torch.nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16, device="cuda")
    torch.nn.init.normal_(lin.weight, std=0.02)
    m = QLoRALinear.from_linear(lin, backend="cupy", r=R, alpha=ALPHA, lora_dtype="bfloat16")
    torch.nn.init.normal_(m.lora_B, std=0.02)
    return m


def make_peft(out_f, in_f, quantized: bool):
    import torch
    from peft import LoraConfig, get_peft_model

    class One(torch.nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(x)

    if quantized:
        import bitsandbytes as bnb

        src = torch.nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16)
        torch.nn.init.normal_(src.weight, std=0.02)
        lin = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                                quant_type="nf4")  # fmt: skip
        lin.weight = bnb.nn.Params4bit(src.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True)
        lin = lin.cuda()
    else:
        lin = torch.nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16, device="cuda")
        torch.nn.init.normal_(lin.weight, std=0.02)
        lin.weight.requires_grad_(False)
    model = get_peft_model(One(lin), LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["lin"]))
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.to("cuda", torch.bfloat16)  # the Guanaco recipe: LoRA in bf16
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    return model


def fwd_bwd(module, x, dY):
    def call():
        module(x).backward(dY)

    return call


def graphed(module, x, dY):
    """Capture forward + backward once (static x, dY; grads accumulate into the parameters' .grad), replay."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up on the side stream, as torch's CUDA-graph docs do
            module(x).backward(dY)
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        module(x).backward(dY)
    return g.replay


def run(variants: list[str]) -> dict:
    import torch

    tflops = gemm_tflops()
    rows = []
    for out_f, in_f, tokens in SHAPES:
        x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dY = torch.randn(tokens, out_f, device="cuda", dtype=torch.bfloat16)
        bound_ms = layer_flops(out_f, in_f, tokens) / (tflops * 1e12) * 1e3
        for v in variants:
            try:
                if v.startswith("ours"):
                    m = make_ours(out_f, in_f)
                    if v == "ours-eager":
                        call = fwd_bwd(m, x, dY)
                    elif v == "ours-graph":
                        call = graphed(m, x, dY)
                    else:
                        call = fwd_bwd(torch.compile(m, fullgraph=True), x, dY)
                else:
                    call = fwd_bwd(make_peft(out_f, in_f, quantized=v == "bnb"), x, dY)
                gpu_ms, host_ms = timed(call)
                row = dict(variant=v, out=out_f, inp=in_f, tokens=tokens, gpu_ms=gpu_ms, host_ms=host_ms,
                           flop_bound_ms=bound_ms, per_call_ms=max(gpu_ms, host_ms))  # fmt: skip
            except Exception as e:  # a peer missing on this machine: say so in the table
                row = dict(variant=v, out=out_f, inp=in_f, tokens=tokens, error=f"{type(e).__name__}: {e}"[:300])
            rows.append(row)
            x.grad = None
            torch.cuda.empty_cache()
    return {"device": torch.cuda.get_device_name(0), "bf16_gemm_tflops": tflops, "rows": rows}


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["rows"] if "error" not in r]
    shapes = sorted({(r["out"], r["inp"], r["tokens"]) for r in rows}, key=lambda s: s[0] * s[1])
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    w = 0.8 / max(1, len(variants))
    for ax, key in zip(axes, ("host_ms", "gpu_ms"), strict=True):
        for j, v in enumerate(variants):
            vals = [next((r[key] for r in rows if r["variant"] == v and (r["out"], r["inp"], r["tokens"]) == s),
                         0.0) for s in shapes]  # fmt: skip
            ax.bar([i + j * w for i in range(len(shapes))], vals, w, label=v)
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(shapes))], [f"{o}x{i}\n{t} tok" for o, i, t in shapes])
        ax.set(ylabel=f"{key.replace('_ms', '')} ms per fwd+bwd", title=key.replace("_", " "))
    axes[0].axhline(0.25, color="k", lw=0.8, ls="--", label="target host 0.25 ms")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"one layer fwd+bwd on {doc['device']} (commit {doc.get('commit', '?')})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="ours-eager,ours-graph,ours-compile,bnb,bf16")
    args = ap.parse_args(argv)
    doc = run(args.variants.split(","))
    doc["commit"] = commit()
    print(f"bf16 GEMM {doc['bf16_gemm_tflops']:.0f} TFLOP/s on {doc['device']}")
    print(f"{'shape':>18} {'variant':<13}{'gpu ms':>8}{'host ms':>9}{'bound ms':>9}")
    for r in doc["rows"]:
        shape = f"{r['out']}x{r['inp']}@{r['tokens']}"
        if "error" in r:
            print(f"{shape:>18} {r['variant']:<13} ERROR {r['error'][:90]}")
        else:
            print(f"{shape:>18} {r['variant']:<13}{r['gpu_ms']:>8.3f}{r['host_ms']:>9.3f}{r['flop_bound_ms']:>9.3f}")
    path = save("bench_layer", doc)
    plot(doc, RESULTS / "bench_layer.png")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
