"""QLoRA fine-tuning memory of LLaMA-7B / 33B / 65B shapes on one GPU, measured under a cap, against the ledger.

Setup (issue 6, claim 1): a LLaMA-shaped model (qlora_ref.memory presets: 65B = 80 layers, hidden 8192, MLP 22016,
64 heads, vocab 32000) with N(0, 0.02^2) weights drawn on the GPU one linear at a time and quantized as they are
made (NF4 + double quantization, blocksize 64; backends.torchlib.synthetic), LoRA r 64 / alpha 16 in bf16 on all seven
linears of every layer, sequence 512, batch 1, gradient checkpointing, PagedAdamW 32-bit, lr 2e-4: real forward +
backward + optimizer steps.  Three memory levers, each switchable:

    --states host       optimizer m, v in managed memory that stays in host RAM (PagedAdamW placement="host")
    --step-in-backward  each LoRA tensor is stepped and its gradient freed as soon as it is accumulated
    --offload           re-entrant checkpointing under torch.autograd.graph.save_on_cpu: block inputs in host RAM
    --embed-on-host     the (frozen) input embedding table in pinned host RAM; lookups copy only the T rows used

The optimizer checks the gradients for NaN/Inf on the device (check_finite="deferred": no host wait inside backward)
and, stepping inside backward, steps up to 16 tensors per launch (backends/torchlib/in_backward.py). The 65B step
beside bitsandbytes + PEFT's, in one run: bench_65b.py.

The cap (48 GB for 65B, 24 GB for 33B, 48 GB for 7B; GB = 10^9 bytes) binds both allocators: CuPy's pool (the 4-bit
weights) gets a limit of cap, and after the model is built torch gets set_per_process_memory_fraction of what is
left of the cap.  A run that does not fit raises OutOfMemoryError instead of finishing.

Measured, per shape, in a fresh process: "peak device used" = max of (total - free) from cudaMemGetInfo sampled
after the build and after every forward, backward and step — it includes the CUDA context, torch's and CuPy's cached
blocks and any resident managed pages (both allocators keep their high-water mark cached, so a transient peak inside
a step is still held at the next sample); beside it torch.cuda.max_memory_allocated / max_memory_reserved and CuPy's
pool.  The ledger predicts the peak: `qlora memory --model <shape> --seq-len 512 --batch 1 --r 64` with the run's
switches (layer "qlora-ref", bf16 LoRA, the measured CUDA overhead MEM-14); its resident total and error are printed.

    python benchmarks/bench_memory.py                       # 7B, 33B, 65B; table + results/bench_memory.{json,png}
    python benchmarks/bench_memory.py --shapes llama-7b --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import RESULTS, commit, save  # noqa: E402

CAPS = {"llama-7b": 48.0, "llama-33b": 24.0, "llama-65b": 48.0}
PAPER = {"llama-7b": "about 5 GB", "llama-33b": "(fits 24 GB)", "llama-65b": "41 GB"}
TARGET = {"llama-65b": 38.0}
SEQ, BATCH, R, ALPHA, LR = 512, 1, 64, 16, 2e-4


def ledger_for(shape_name: str, *, step_in_backward: bool, offload: bool, embed_on_host: bool):
    """What `qlora memory` predicts for this run (the CLI's defaults plus the run's switches); see cli_command()."""
    from backends.torchlib.ledger import CUDA_OVERHEAD_BYTES, Runtime, estimate
    from qlora_ref import memory

    recipe = memory.Recipe(seq_len=SEQ, batch=BATCH, r=R, lora_dtype="bfloat16", optimizer="paged_adamw_32bit")
    runtime = Runtime(layer="qlora-ref", step_in_backward=step_in_backward, offload_checkpoints=offload,
                      embeddings_on_host=embed_on_host, overhead_bytes=CUDA_OVERHEAD_BYTES)  # fmt: skip
    return estimate(memory.PRESETS[shape_name], recipe, runtime)


def cli_command(shape_name: str, *, step_in_backward: bool, offload: bool, embed_on_host: bool) -> str:
    flags = [f for f, on in (("--step-in-backward", step_in_backward), ("--offload-checkpoints", offload),
                             ("--embeddings-on-host", embed_on_host)) if on]  # fmt: skip
    return " ".join(["qlora memory --model", shape_name, f"--seq-len {SEQ} --batch {BATCH} --r {R}", *flags])


def run_one(
    shape_name,
    cap_gb,
    steps,
    states,
    step_in_backward,
    offload,
    embed_on_host,
    check_finite="deferred",
    overlap=False,
    group=16,
    optimizer=True,
) -> dict:
    """Build, train `steps` steps, and sample device memory; runs in its own process (clean context and pools)."""
    import contextlib

    import cupy
    import torch

    from backends.torchlib import PagedAdamW
    from backends.torchlib.prepare import enable_checkpointing
    from backends.torchlib.synthetic import random_qlora_model
    from qlora_ref import memory

    torch.cuda.init()
    torch.ones(1, device="cuda").matmul(torch.ones(1, 1, device="cuda"))  # context + cuBLAS handle
    cupy.zeros(1)
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    context = total - free
    samples = [("context", context)]

    phases: dict[str, list[float]] = {}
    mark = [time.perf_counter()]

    def sample(what: str) -> None:
        torch.cuda.synchronize()
        f, t = torch.cuda.mem_get_info()
        samples.append((what, t - f))
        now = time.perf_counter()
        phases.setdefault(what, []).append(now - mark[0])
        mark[0] = now

    cap = int(cap_gb * memory.GB)
    pool = cupy.get_default_memory_pool()
    pool.set_limit(size=cap)
    shape = memory.PRESETS[shape_name]
    t0 = time.perf_counter()
    model = random_qlora_model(shape, backend="cupy", r=R, alpha=ALPHA, dropout=0.0, lora_dtype="bfloat16",
                               gradient_checkpointing=not offload, embeddings_on_host=embed_on_host)  # fmt: skip
    if offload:  # re-entrant checkpoints save their inputs through saved-tensor hooks: save_on_cpu can take them
        enable_checkpointing(model, use_reentrant=True)
        model.enable_input_require_grads()
    model.train()
    sample("built")
    build_s = time.perf_counter() - t0
    left = cap - (samples[-1][1] - torch.cuda.memory_reserved())  # what torch may still take under the cap
    torch.cuda.set_per_process_memory_fraction(max(left, 0) / total)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = PagedAdamW(params, lr=LR, placement=states, page_threshold_bytes=0, check_finite=check_finite)
    if step_in_backward and optimizer:
        opt.hook_into_backward(overlap=overlap, group=group)
    elif step_in_backward:  # the step without AdamW (bench_65b's ours-nostep): each gradient freed as it lands
        for p in params:
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    sample("optimizer")
    gen = torch.Generator(device="cuda").manual_seed(0)
    losses, step_s = [], []
    for _ in range(steps):
        ids = torch.randint(0, shape.vocab, (BATCH, SEQ), device="cuda", generator=gen)
        torch.cuda.synchronize()
        ts = mark[0] = time.perf_counter()
        ctx = torch.autograd.graph.save_on_cpu(pin_memory=True) if offload else contextlib.nullcontext()
        with ctx:
            loss = model(input_ids=ids, labels=ids).loss
        sample("forward")
        loss.backward()
        sample("backward")
        if not step_in_backward:
            opt.step()
            opt.zero_grad(set_to_none=True)
        sample("step")
        step_s.append(time.perf_counter() - ts)
        losses.append(float(loss))
    opt.raise_if_nonfinite()
    switches = dict(step_in_backward=step_in_backward, offload=offload, embed_on_host=embed_on_host)
    ledger = ledger_for(shape_name, **switches)
    peak = max(v for _, v in samples)
    return {
        "shape": shape_name,
        "cap_gb": cap_gb,
        "settings": dict(
            seq_len=SEQ,
            batch=BATCH,
            r=R,
            alpha=ALPHA,
            lora_dtype="bfloat16",
            states=states,
            step_in_backward=step_in_backward,
            offload_checkpoints=offload,
            optimizer="PagedAdamW 32-bit",
            check_finite=check_finite,
            overlap=overlap,
            group=group,
            quant="nf4+dq, blocksize 64",
        ),  # fmt: skip
        "device": torch.cuda.get_device_name(0),
        "device_total_gb": total / 1e9,
        "context_gb": context / 1e9,
        "peak_device_used_gb": peak / 1e9,
        "peak_at": max(samples, key=lambda s: s[1])[0],
        "samples_gb": [(w, round(v / 1e9, 4)) for w, v in samples],
        "torch_max_allocated_gb": torch.cuda.max_memory_allocated() / 1e9,
        "torch_max_reserved_gb": torch.cuda.max_memory_reserved() / 1e9,
        "cupy_pool_gb": pool.total_bytes() / 1e9,
        "optimizer_state_gb": opt.state_bytes / 1e9,
        "optimizer_state_location": opt.state_location(),
        "build_s": build_s,
        "step_s": step_s,
        "phase_s": {k: sorted(v[1:] or v)[len(v[1:] or v) // 2] for k, v in phases.items()},  # medians after step 1
        "losses": losses,
        "ledger_gb": {k: v / 1e9 for k, v in ledger.components.items()},
        "ledger_resident_gb": ledger.resident / 1e9,
        "ledger_command": cli_command(shape_name, **switches),
        "ledger_error": (ledger.resident - peak) / peak,
        "fits_cap": peak <= cap,
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = list(results[0]["ledger_gb"])
    x = range(len(results))
    bottom = [0.0] * len(results)
    for name in names:
        vals = [0.0 if (name == "optimizer") else r["ledger_gb"][name] for r in results]
        ax.bar([i - 0.2 for i in x], vals, 0.38, bottom=bottom, label=f"ledger: {name}")
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.bar([i + 0.2 for i in x], [r["peak_device_used_gb"] for r in results], 0.38, color="k", label="measured peak")
    for i, r in enumerate(results):
        ax.hlines(r["cap_gb"], i - 0.45, i + 0.45, colors="r", linestyles="--")
        ax.text(i + 0.2, r["peak_device_used_gb"] + 0.5, f"{r['peak_device_used_gb']:.1f}", ha="center", fontsize=8)
    ax.set_xticks(list(x), [f"{r['shape']}\ncap {r['cap_gb']:g} GB" for r in results])
    ax.set_ylabel("device memory, GB (10^9 B)")
    ax.set_title(f"QLoRA memory, seq {SEQ} x batch {BATCH}, r {R} ({results[0]['device']})", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(CAPS), choices=list(CAPS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--states", choices=("host", "device"), default="host")
    ap.add_argument("--step-in-backward", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--offload", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--embed-on-host", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one shape in this process, print JSON
    ap.add_argument("--cap-gb", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--out-name", default="bench_memory")
    args = ap.parse_args(argv)
    if args.one:
        res = run_one(
            args.one, args.cap_gb, args.steps, args.states, args.step_in_backward, args.offload, args.embed_on_host
        )
        print("RESULT " + json.dumps(res))
        return 0
    results = []
    for name in args.shapes:
        cmd = [sys.executable, __file__, "--one", name, "--cap-gb", str(CAPS[name]), "--steps", str(args.steps),
               "--states", args.states, "--step-in-backward" if args.step_in_backward else "--no-step-in-backward",
               "--offload" if args.offload else "--no-offload",
               "--embed-on-host" if args.embed_on_host else "--no-embed-on-host"]  # fmt: skip
        env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{name}: FAILED (exit {proc.returncode})\n{proc.stderr[-3000:]}")
            results.append({"shape": name, "cap_gb": CAPS[name], "failed": proc.stderr[-3000:]})
            continue
        results.append(json.loads(lines[-1][len("RESULT ") :]))
    ok = [r for r in results if "failed" not in r]
    print(f"\n{'shape':<11}{'cap':>5}{'peak used':>11}{'torch alloc':>12}{'cupy pool':>10}{'context':>9}"
          f"{'ledger':>8}{'error':>8}{'step s':>8}  paper")  # fmt: skip
    for r in ok:
        step = sorted(r["step_s"])[len(r["step_s"]) // 2]
        print(f"{r['shape']:<11}{r['cap_gb']:>5g}{r['peak_device_used_gb']:>11.2f}{r['torch_max_allocated_gb']:>12.2f}"
              f"{r['cupy_pool_gb']:>10.2f}{r['context_gb']:>9.2f}{r['ledger_resident_gb']:>8.2f}"
              f"{r['ledger_error']:>+8.1%}{step:>8.2f}  {PAPER[r['shape']]}")  # fmt: skip
    for r in ok:
        if r["shape"] in TARGET:
            verdict = "met" if r["peak_device_used_gb"] <= TARGET[r["shape"]] else "MISSED"
            print(f"{r['shape']}: target <= {TARGET[r['shape']]:g} GB peak: {verdict}")
    if ok:
        payload = {"commit": commit(), "device": ok[0]["device"], "command": " ".join(sys.argv), "results": results}
        path = save(args.out_name, payload)
        plot(ok, RESULTS / f"{args.out_name}.png")
        print(f"wrote {path}")
    return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
