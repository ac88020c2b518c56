"""End-to-end QLoRA training throughput and peak memory: ours (CuPy backend) vs bitsandbytes + PEFT vs bf16 LoRA.

Setup (issue 5, fixed shapes): LLaMA-7B dimensions (hidden 4096, MLP 11008, 32 heads, vocab 32000), 4 decoder
layers of random weights (one safetensors dir, loaded by all three), sequence 1024 x batch 4, LoRA r 64 / alpha 16 on
all seven linears of every layer, LoRA weights in bf16 in all three (the Guanaco recipe: artidoro/qlora's qlora.py
casts LoRA layers to bf16, norms to fp32 and embeddings / LM head back to bf16 after PEFT's k-bit preparation, and
the HF Trainer runs the forward under bf16 autocast; the same is done here for the PEFT variants), dropout 0 (so the
three loss curves can be compared step for step), gradient checkpointing, paged AdamW 32-bit, lr 2e-4, max grad
norm 0.3.  Same initialisation everywhere: the saved base weights, and every lora_A filled from a generator seeded
by its module name (B = 0).

    ours       backends.torchlib.load_model(dir, backend="cupy")  NF4 + double quant, bf16 compute, PagedAdamW; the
               RMSNorms, SwiGLU, RoPE and the loss as own kernels (prepare_model's fuse, fuse.fuse_kernels)
    ours-no-fuse  transformers' numerics, qlora finetune's default (fuse="exact": RoPE's kernel, eager RMSNorm and
               SwiGLU): what the norm and activation kernels are worth
    ours-graph the same, forward + backward captured once as a CUDA graph (backends.torchlib.CapturedStep) and
               replayed; clipping and the optimizer step eager after each replay
               (every ours variant runs under masks.causal_only: the batches are unpadded and unpacked, so SDPA's
               causal kernel with no mask and no packed-sequence read, eager and captured)
    ours-fused ours-no-fuse with each block's attention, MLP and norms compiled by inductor (fuse.fuse_blocks):
               RMSNorm, RoPE, SwiGLU fused around the qlora::linear operators
    ours-fused-graph  both
    bnb+peft   transformers + BitsAndBytesConfig(nf4, double quant, bf16) + prepare_model_for_kbit_training + PEFT,
               bitsandbytes PagedAdamW32bit (the QLoRA repository's recipe)
    bnb+peft-causal  bnb+peft under masks.causal_only too: what the same promise is worth to the peer
    bf16-lora  transformers bf16 model + PEFT LoRA, no quantization, bitsandbytes PagedAdamW32bit

Each variant runs in its own process (clean allocator and context).  Timing: WARMUP steps, then STEPS steps between
two CUDA events after a synchronize; tokens/s = STEPS * batch * seq / elapsed.  The loop reads no value back between
steps (the losses are kept on the device and read after the last, as the HF Trainer keeps its running loss), so the
host may run ahead into the next step wherever a variant lets it: ours clips without a host check
(error_if_nonfinite=False) and PagedAdamW checks the gradients on the device (check_finite="deferred": a NaN/Inf
step writes nothing and raises at the next step), the PEFT variants use torch's clip and bitsandbytes' optimizer,
which do not check.  host_ms_per_step: the host's median time to issue a step.  Memory: torch.cuda.max_memory_allocated
(the allocator's peak) and the device-wide used memory total - free from cudaMemGetInfo, sampled before and after
every step (includes the CUDA context, cached blocks and managed-memory pages resident on the GPU).

    python benchmarks/bench_train.py                 # all three; table + benchmarks/results/bench_train.{json,png}
    python benchmarks/bench_train.py --steps 10      # shorter
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

HIDDEN, MLP, HEADS, VOCAB, LAYERS = 4096, 11008, 32, 32000, 4
SEQ, BATCH, R, ALPHA, LR, MAX_NORM = 1024, 4, 64, 16, 2e-4, 0.3
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = (
    "ours",
    "ours-no-fuse",
    "ours-graph",
    "ours-fused",
    "ours-fused-graph",
    "bnb+peft",
    "bnb+peft-causal",
    "bf16-lora",
)
FUSE = {"ours": True, "ours-graph": True, "ours-no-fuse": "exact"}  # prepare_model's fuse; the rest False
INDUCTOR = ("ours-fused", "ours-fused-graph")  # blocks compiled by inductor (fuse_blocks), transformers' own modules
LOSS_BOUND = 0.02  # stated bound: |loss_ours - loss_bnb| / loss_bnb at every step (NF4 codes agree; bf16 GEMM order)


def step_flops() -> dict[str, float]:
    """The training step's matrix FLOPs, by term (checkpointing: forward, recomputed forward, input gradients).

    Per token, P = 4 h^2 + 3 h m base weights per layer: 2P forward, 2P recomputed, 2P for dX (the base is frozen: no
    weight gradient).  LoRA r(in + out) per linear: 2 forward + 2 recomputed + 4 backward (dA, dB, du; dX's LoRA term)
    per parameter.  Attention (causal, half the square): 4 S h per token for QK^T and PV, x 4 (forward, recompute,
    two backward products).  LM head (not checkpointed, frozen): 2 h V forward + 2 h V for dX."""
    T = SEQ * BATCH
    P = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * MLP
    lora = R * (4 * 2 * HIDDEN + 3 * (HIDDEN + MLP))
    terms = {
        "base": 6 * P * T * LAYERS,
        "lora": 8 * lora * T * LAYERS,
        "attention": 4 * (4 * SEQ * HIDDEN / 2) * T * LAYERS,
        "lm_head": 4 * HIDDEN * VOCAB * T,
    }
    terms["total"] = sum(terms.values())
    return terms


def gemm_tflops() -> float:
    """This run's bf16 GEMM rate: 8192^3 on random data, median of 10 after warm-up."""
    import torch

    from benchmarks.common import cuda_median_ms

    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192**3 / (cuda_median_ms(lambda: a @ b, warmup=3, reps=10) * 1e-3) / 1e12


def make_model_dir(path: Path) -> None:
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=2048,
        tie_word_embeddings=False, torch_dtype="bfloat16",
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    del model
    torch.cuda.empty_cache()


def batches(n: int):
    """Deterministic structured tokens: a random 64-token motif repeated to 1024 (copying is learnable)."""
    import numpy as np
    import torch

    rng = np.random.default_rng(1234)
    out = []
    for _ in range(n):
        motifs = rng.integers(0, VOCAB, size=(BATCH, 64))
        out.append(torch.from_numpy(np.tile(motifs, (1, SEQ // 64))).long())  # (B, T)
    return out


def init_lora_A(named_A) -> None:
    """lora_A = U(-1/sqrt(in), 1/sqrt(in)) from a generator seeded by the module path (PEFT's kaiming bound)."""
    import torch

    for name, A in named_A:
        key = name.replace("base_model.model.", "").replace(".default", "").split(".lora_A")[0]
        g = torch.Generator(device="cuda").manual_seed(zlib.crc32(key.encode()))
        bound = 1.0 / A.shape[1] ** 0.5
        with torch.no_grad():
            w = torch.rand(A.shape, generator=g, device="cuda", dtype=torch.float32) * (2 * bound) - bound
            A.copy_(w.to(A.dtype))


def captured_step(model, params, ids):
    """The ``*-graph`` variants' CapturedStep of ``model(input_ids=ids, labels=ids).loss``; the callers (run_variant,
    profile_step) hold the model under masks.causal_only, so the graph has SDPA's causal kernel, as eager."""
    from backends.torchlib.graph import CapturedStep

    return CapturedStep(lambda ids: model(input_ids=ids, labels=ids).loss, params, {"ids": ids})


def build(variant: str, model_dir: str):
    """(model, optimizer, clip function) for one variant, LoRA initialised identically."""
    import torch

    from backends.torchlib.prepare import enable_checkpointing

    if variant.startswith("ours"):
        from backends.torchlib import PagedAdamW, clip_grad_norm_, load_model, qlora_layers

        model = load_model(model_dir, backend="cupy", r=R, alpha=ALPHA, dropout=0.0, target="all-linear",
                           quant_type="nf4", double_quant=True, blocksize=64, gradient_checkpointing=True,
                           lora_dtype="bfloat16", fuse=FUSE.get(variant, False))  # fmt: skip
        init_lora_A([(n + ".lora_A", m.lora_A) for n, m in qlora_layers(model).items()])
        if variant in INDUCTOR:
            from backends.torchlib.fuse import fuse_blocks

            fuse_blocks(model)
        if variant.endswith("graph"):  # no dropout, so no RNG state for the checkpoints to replay
            enable_checkpointing(model, use_reentrant=False, preserve_rng_state=False)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = PagedAdamW(params, lr=LR, paged=True, check_finite="deferred")
        return model, opt, lambda ps: clip_grad_norm_(ps, MAX_NORM, error_if_nonfinite=False)

    import bitsandbytes as bnb
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if variant.startswith("bnb+peft"):
        q = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, quantization_config=q, dtype=torch.bfloat16, device_map={"": 0}
        )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})  # fmt: skip
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map={"": 0})
        enable_checkpointing(model, use_reentrant=False)
        model.enable_input_require_grads()
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))  # fmt: skip
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():  # artidoro/qlora's qlora.py casts, with --bf16
        if isinstance(module, LoraLayer):
            module.to(torch.bfloat16)
        if "norm" in name:
            module.to(torch.float32)
        if ("lm_head" in name or "embed_tokens" in name) and getattr(module, "weight", None) is not None:
            module.to(torch.bfloat16)
    init_lora_A([(n, p) for n, p in model.named_parameters() if "lora_A" in n])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.PagedAdamW32bit(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    return model, opt, lambda ps: torch.nn.utils.clip_grad_norm_(ps, MAX_NORM)


def run_variant(variant: str, model_dir: str, steps: int, warmup: int) -> dict:
    import torch

    from backends.torchlib.masks import causal_only

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, opt, clip = build(variant, model_dir)
    unpadded = contextlib.ExitStack()  # every batch below is unpadded and unpacked
    if variant.startswith("ours") or variant.endswith("-causal"):
        unpadded.enter_context(causal_only(model))
    # PEFT variants run as the HF Trainer runs them with --bf16 (autocast); ours computes in bf16 by construction
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=not variant.startswith("ours"))
    setup_s = time.perf_counter() - t0
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    data = [b.cuda() for b in batches(warmup + steps)]
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    free, total = torch.cuda.mem_get_info()
    used = [total - free]
    losses, step_ms = [], []
    captured = None
    if variant.endswith("graph"):
        t0 = time.perf_counter()
        captured = captured_step(model, params, data[0])
        setup_s += time.perf_counter() - t0
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        used.append(total - free)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for i, ids in enumerate(data):
        if i == warmup:
            torch.cuda.synchronize()
            start.record()
        ts = time.perf_counter()
        if captured is not None:
            loss = captured({"ids": ids})
        else:
            with autocast:
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        clip(params)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().clone())  # read after the loop: no synchronisation between steps
        step_ms.append((time.perf_counter() - ts) * 1e3)
        free, total = torch.cuda.mem_get_info()
        used.append(total - free)
    end.record()
    torch.cuda.synchronize()
    unpadded.close()
    if hasattr(opt, "raise_if_nonfinite"):
        opt.raise_if_nonfinite()  # the last step's deferred check
    elapsed = start.elapsed_time(end) / 1e3
    losses = [float(v) for v in losses]
    return {
        "variant": variant,
        "tokens_per_s": steps * BATCH * SEQ / elapsed,
        "step_ms": elapsed * 1e3 / steps,  # the timed steps' mean (CUDA events)
        "host_ms_per_step": sorted(step_ms[warmup:])[len(step_ms[warmup:]) // 2],
        "peak_allocated_gb": torch.cuda.max_memory_allocated() / 1e9,
        "peak_device_used_gb": max(used) / 1e9,
        "losses": losses,
        "trainable_params": sum(p.numel() for p in params),
        "setup_s": setup_s,
    }


def device_info() -> dict:
    import torch

    from benchmarks.common import commit, package_versions

    info = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "commit": commit()}
    return {**info, **package_versions(("bitsandbytes", "peft", "transformers", "cupy"))}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        if "losses" in r:
            a.plot(range(1, len(r["losses"]) + 1), r["losses"], label=r["variant"], lw=1.4)
    a.set(xlabel="step", ylabel="loss", title="loss, same init and data")
    a.legend()
    ok = [r for r in results if "tokens_per_s" in r]
    b.bar([r["variant"] for r in ok], [r["tokens_per_s"] / 1e3 for r in ok], color=[f"C{i}" for i in range(len(ok))])
    for i, r in enumerate(ok):
        b.text(i, r["tokens_per_s"] / 1e3, f"{r['peak_device_used_gb']:.1f} GB", ha="center", va="bottom")
    b.set(ylabel="k tokens/s", title=f"{LAYERS}-layer LLaMA-7B dims, seq {SEQ} x batch {BATCH}, r {R}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--model-dir", default="/tmp/qlora-bench-llama7b-4layers")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # child process: run one, print its JSON
    args = ap.parse_args(argv)

    if args.variant:
        try:
            res = run_variant(args.variant, args.model_dir, args.steps, args.warmup)
        except Exception as e:
            res = {"variant": args.variant, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"}
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    md = Path(args.model_dir)
    if not (md / "config.json").exists():
        make_model_dir(md)
    flops, tflops = step_flops(), gemm_tflops()
    flop_bound_ms = flops["total"] / (tflops * 1e12) * 1e3
    results = []
    for v in args.variants.split(","):
        cmd = [sys.executable, __file__, "--variant", v, "--model-dir", str(md), "--steps", str(args.steps),
               "--warmup", str(args.warmup)]  # fmt: skip
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        res = json.loads(line[-1][7:]) if line else {"variant": v, "error": f"exit {p.returncode}: {p.stderr[-800:]}"}
        results.append(res)
        print(f"{v}: {res.get('tokens_per_s', res.get('error'))}", flush=True)

    by = {r["variant"]: r for r in results}
    print(
        f"\n{'variant':<17}{'tokens/s':>12}{'step ms':>10}{'host ms':>9}{'peak alloc GB':>15}{'peak used GB':>14}"
        f"{'final loss':>12}"
    )
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<17} ERROR {r['error'][:200]}")
            continue
        print(f"{r['variant']:<17}{r['tokens_per_s']:>12,.0f}{r['step_ms']:>10.1f}{r['host_ms_per_step']:>9.1f}"
              f"{r['peak_allocated_gb']:>15.2f}{r['peak_device_used_gb']:>14.2f}{r['losses'][-1]:>12.4f}")  # fmt: skip
    summary = {}
    if "ours" in by and "bnb+peft" in by and "error" not in by["ours"] and "error" not in by["bnb+peft"]:
        o, b = by["ours"], by["bnb+peft"]
        rel = max(abs(x - y) / abs(y) for x, y in zip(o["losses"], b["losses"], strict=True))
        summary = {
            "speedup_vs_bnb": o["tokens_per_s"] / b["tokens_per_s"],
            "bf16_gemm_tflops": tflops,
            "step_tflop": flops["total"] / 1e12,
            "flop_bound_ms": flop_bound_ms,
            "fraction_of_flop_bound": flop_bound_ms / (1e3 * BATCH * SEQ / o["tokens_per_s"]),
            "target_speedup": 2.0,
            "peak_used_ratio_vs_bnb": o["peak_device_used_gb"] / b["peak_device_used_gb"],
            "max_rel_loss_diff_vs_bnb": rel,
            "loss_bound": LOSS_BOUND,
            "loss_within_bound": rel <= LOSS_BOUND,
        }
        if "tokens_per_s" in by.get("bnb+peft-causal", {}):
            summary["speedup_vs_bnb_causal"] = o["tokens_per_s"] / by["bnb+peft-causal"]["tokens_per_s"]
        if "bf16-lora" in by and "error" not in by["bf16-lora"]:
            summary["speedup_vs_bf16_lora"] = o["tokens_per_s"] / by["bf16-lora"]["tokens_per_s"]
        for name in ("ours-no-fuse", "ours-graph", "ours-fused", "ours-fused-graph"):
            g, key = by.get(name, {}), name.removeprefix("ours-").replace("-", "_")
            if "tokens_per_s" in g:
                summary[f"{key}_speedup_vs_bnb"] = g["tokens_per_s"] / b["tokens_per_s"]
                summary[f"{key}_fraction_of_flop_bound"] = flop_bound_ms / (1e3 * BATCH * SEQ / g["tokens_per_s"])
                summary[f"{key}_peak_used_ratio_vs_bnb"] = g["peak_device_used_gb"] / b["peak_device_used_gb"]
                rel = max(abs(x - y) / abs(y) for x, y in zip(g["losses"], o["losses"], strict=True))
                summary[f"{key}_max_rel_loss_diff_vs_ours"] = rel
        print("\n" + "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setup = dict(hidden=HIDDEN, mlp=MLP, heads=HEADS, vocab=VOCAB, layers=LAYERS, seq=SEQ, batch=BATCH, r=R,
                 alpha=ALPHA, lr=LR, max_grad_norm=MAX_NORM, lora_dropout=0.0, gradient_checkpointing=True,
                 steps=args.steps, warmup=args.warmup)  # fmt: skip
    doc = {"info": device_info(), "setup": setup, "flops": flops, "results": results, "summary": summary}
    (out / "bench_train.json").write_text(json.dumps(doc, indent=1) + "\n")
    plot(results, out / "bench_train.png")
    print(f"wrote {out / 'bench_train.json'} and {out / 'bench_train.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
