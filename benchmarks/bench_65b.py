"""The LLaMA-65B-shaped QLoRA step side by side: ours under the memory levers vs bitsandbytes + PEFT, one run.

Shape and setup as bench_memory.py (80 layers x 8192, MLP 22016, random N(0, 0.02^2) weights quantized as they are
made, NF4 + double quantization, block 64; LoRA r 64 / alpha 16 in bf16 on all seven linears; seq 512, batch 1;
lr 2e-4).  Variants, each in a fresh process, one after the other:

    ours          bench_memory's levers (states in host memory, steps inside backward, checkpoints and the input
                  embedding in host memory), the hooks' NaN/Inf check on the device (check_finite="deferred"), up to
                  16 tensors per AdamW launch (backends/torchlib/in_backward.py)
    ours-group1   the same, one launch per tensor
    ours-overlap  the same with the steps on a side stream beside backward
    ours-sync     one launch per tensor and check_finite=True: one host wait per LoRA tensor (the hooks before
                  in_backward.py)
    ours-nostep   the same with the hooks freeing each gradient without a step: what the step costs without AdamW
    ours-device-states  ours with the states in device memory (+6.4 GB: over the 38 GB target; a reference)
    optimizer     AdamW alone over the shape's 1,120 LoRA tensors (bf16 params and gradients): one fused step with
                  the states in host memory, the same one tensor per launch (as the hooks step), one fused step with
                  the states on the device, and the states' migration host -> device -> host (page_in / page_out)
    bnb+peft      bitsandbytes Linear4bit (nf4, double quant, bf16 compute) + PEFT LoRA, artidoro/qlora's casts
                  (norms float32, LoRA / embeddings / head bf16), non-re-entrant gradient checkpointing, bf16
                  autocast, bitsandbytes PagedAdamW32bit (states paged in managed memory, on the device)

Per variant: step seconds (each step timed from a synchronised start to the end of its optimizer work; the first
step is warm-up and is left out of the median), peak device memory in use (cudaMemGetInfo total - free sampled after
build, every forward, backward and step) beside torch.cuda.max_memory_allocated, and the losses.  Before each
variant the script checks that the card has the memory it will use free (plus a margin) and skips it otherwise.

    python benchmarks/bench_65b.py                  # table + results/bench_65b_<device>.{json,png}
    python benchmarks/bench_65b.py --variants ours bnb+peft --steps 4
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

from benchmarks.common import RESULTS, cuda_median_ms, save  # noqa: E402

SHAPE = "llama-65b"
SEQ, BATCH, R, ALPHA, LR = 512, 1, 64, 16, 2e-4
VARIANTS = ("ours", "ours-group1", "ours-overlap", "ours-sync", "ours-nostep", "ours-device-states", "bnb+peft",
            "optimizer")  # fmt: skip
NEEDS_GB = dict.fromkeys(VARIANTS, 40.0) | {"ours-device-states": 47.0, "bnb+peft": 55.0, "optimizer": 16.0}
TARGET_GB = 38.0
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_bnb_peft_model(shape, seed: int = 0, std: float = 0.02):
    """A LLaMA-shaped transformers model on the GPU, every decoder linear a bitsandbytes Linear4bit quantized from
    N(0, std^2) bf16 drawn on the device one at a time (never the whole model in 16 bits), wrapped by PEFT."""
    import bitsandbytes as bnb
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    from backends.torchlib.synthetic import llama_config

    cfg = llama_config(shape)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear and name in TARGETS:
                w = torch.empty(child.out_features, child.in_features, device="cuda", dtype=torch.bfloat16)
                w.normal_(0.0, std, generator=gen)
                lin = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=torch.bfloat16,
                                        compress_statistics=True, quant_type="nf4", device="meta")  # fmt: skip
                lin.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                               module=lin).to("cuda")  # fmt: skip
                del w
                setattr(module, name, lin)
    for mname, module in model.named_modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            if p.device.type != "meta":
                continue
            norm = "norm" in mname
            data = torch.empty(p.shape, device="cuda", dtype=torch.float32 if norm else torch.bfloat16)
            if norm:
                data.fill_(1.0)
            else:
                data.normal_(0.0, std, generator=gen)
            module._parameters[pname] = torch.nn.Parameter(data, requires_grad=False)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg).to("cuda")
    torch.cuda.empty_cache()
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(TARGETS),
                                             task_type="CAUSAL_LM"))  # fmt: skip
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.to(torch.bfloat16)  # artidoro/qlora's casts with --bf16 (the norms are float32 above)
    return model


def run_bnb(shape_name: str, steps: int) -> dict:
    import bitsandbytes as bnb
    import torch

    from qlora_ref import memory

    torch.cuda.init()
    free, total = torch.cuda.mem_get_info()
    context = total - free
    samples = [("context", context)]

    def sample(what):
        torch.cuda.synchronize()
        f, t = torch.cuda.mem_get_info()
        samples.append((what, t - f))

    t0 = time.perf_counter()
    model = random_bnb_peft_model(memory.PRESETS[shape_name])
    model.train()
    sample("built")
    build_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.PagedAdamW32bit(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    losses, step_s = [], []
    for _ in range(steps):
        ids = torch.randint(0, memory.PRESETS[shape_name].vocab, (BATCH, SEQ), device="cuda", generator=gen)
        torch.cuda.synchronize()
        ts = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        sample("forward")
        loss.backward()
        sample("backward")
        opt.step()
        opt.zero_grad(set_to_none=True)
        sample("step")
        step_s.append(time.perf_counter() - ts)
        losses.append(float(loss))
    return {
        "variant": "bnb+peft",
        "shape": shape_name,
        "device": torch.cuda.get_device_name(0),
        "context_gb": context / 1e9,
        "peak_device_used_gb": max(v for _, v in samples) / 1e9,
        "samples_gb": [(w, round(v / 1e9, 4)) for w, v in samples],
        "torch_max_allocated_gb": torch.cuda.max_memory_allocated() / 1e9,
        "torch_max_reserved_gb": torch.cuda.max_memory_reserved() / 1e9,
        "build_s": build_s,
        "step_s": step_s,
        "losses": losses,
        "settings": {
            "seq_len": SEQ,
            "batch": BATCH,
            "r": R,
            "alpha": ALPHA,
            "optimizer": "bnb PagedAdamW32bit",
            "checkpointing": "non-re-entrant",
            "autocast": "bfloat16",
        },  # fmt: skip
    }


def run_ours(variant: str, shape_name: str, steps: int) -> dict:
    from benchmarks.bench_memory import CAPS, run_one

    check = True if variant == "ours-sync" else "deferred"
    states = "device" if variant == "ours-device-states" else "host"
    group = 1 if variant in ("ours-group1", "ours-sync") else 16
    res = run_one(shape_name, CAPS[shape_name], steps, states, True, True, True, check_finite=check,
                  overlap=variant == "ours-overlap", group=group, optimizer=variant != "ours-nostep")  # fmt: skip
    res["variant"] = variant
    return res


def lora_sizes(shape) -> list[tuple[int, int]]:
    """(rows, cols) of every LoRA A (r, in) and B (out, r) of the shape, in the model's order."""
    kv = shape.hidden * shape.kv_heads // shape.heads
    linears = [(shape.hidden, shape.hidden), (kv, shape.hidden), (kv, shape.hidden), (shape.hidden, shape.hidden),
               (shape.intermediate, shape.hidden), (shape.intermediate, shape.hidden),
               (shape.hidden, shape.intermediate)]  # fmt: skip
    return [s for _ in range(shape.layers) for out, inp in linears for s in ((R, inp), (out, R))]


def run_optimizer(shape_name: str, reps: int = 5) -> dict:
    """AdamW alone over the shape's LoRA tensors (module docstring's `optimizer` variant), CUDA-event medians."""
    import torch

    from backends.torchlib import PagedAdamW
    from qlora_ref import memory

    sizes = lora_sizes(memory.PRESETS[shape_name])
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.nn.Parameter(torch.empty(s, device="cuda", dtype=torch.bfloat16).normal_(0, 0.01, generator=gen))
              for s in sizes]  # fmt: skip
    for p in params:
        p.grad = torch.empty_like(p).normal_(0, 1e-3, generator=gen)

    def timed(fn) -> float:
        return cuda_median_ms(fn, warmup=1, reps=reps)

    out = {"variant": "optimizer", "shape": shape_name, "device": torch.cuda.get_device_name(0),
           "tensors": len(params), "params": sum(p.numel() for p in params)}  # fmt: skip
    host = PagedAdamW(params, lr=LR, placement="host", check_finite=False, page_threshold_bytes=0)
    out["state_gb"] = host.state_bytes / 1e9
    out["fused_host_ms"] = timed(host.step)

    def one_by_one(opt=host):
        for i, p in enumerate(params):
            opt._step_tensors([p], [i], None)

    out["per_tensor_host_ms"] = timed(one_by_one)
    del host
    dev = PagedAdamW(params, lr=LR, placement="device", check_finite=False, page_threshold_bytes=0)
    out["fused_device_ms"] = timed(dev.step)
    t0 = time.perf_counter()
    dev.page_out(sync=True)
    out["page_out_ms"] = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    dev.page_in()
    torch.cuda.synchronize()
    out["page_in_ms"] = (time.perf_counter() - t0) * 1e3
    traffic = 2 * out["state_gb"]  # m and v read and written once each
    out["bus_gbps_fused_host"] = traffic / (out["fused_host_ms"] * 1e-3)
    out["migrate_gbps"] = out["state_gb"] / ((out["page_out_ms"] + out["page_in_ms"]) / 2 * 1e-3)
    return out


def median_step(r: dict) -> float:
    timed = sorted(r["step_s"][1:] or r["step_s"])
    return timed[len(timed) // 2]


def free_gb() -> float:
    """Free device memory now, from a child process (this one never opens a CUDA context)."""
    code = "import torch; print(torch.cuda.mem_get_info()[0])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1e9


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["variant"] for r in results]
    a1.bar(names, [median_step(r) for r in results], color="tab:blue")
    a1.set_ylabel("s per step (median after the first)")
    a2.bar(names, [r["peak_device_used_gb"] for r in results], color="tab:gray", label="peak device used")
    a2.bar(names, [r["torch_max_allocated_gb"] for r in results], 0.4, color="tab:orange", label="torch max alloc")
    a2.axhline(TARGET_GB, color="r", ls="--", lw=1, label=f"{TARGET_GB:g} GB target")
    a2.set_ylabel("GB (10^9 B)")
    a2.legend(fontsize=7)
    for ax in (a1, a2):
        ax.tick_params(axis="x", labelsize=8)
    shape, device = results[0].get("shape", SHAPE), results[0]["device"]
    fig.suptitle(f"{shape} shape, seq {SEQ} x batch {BATCH}, r {R} ({device})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--shape", default=SHAPE, help="a qlora_ref.memory preset (a smaller one for a quick check)")
    ap.add_argument("--suffix", default="", help="appended to the result's file name (e.g. _repeat)")
    ap.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one variant in this process
    args = ap.parse_args(argv)
    if args.one:
        if args.one == "optimizer":
            res = run_optimizer(args.shape)
        elif args.one == "bnb+peft":
            res = run_bnb(args.shape, args.steps)
        else:
            res = run_ours(args.one, args.shape, args.steps)
        print("RESULT " + json.dumps(res))
        return 0
    results, skipped, optimizer = [], [], None
    for v in args.variants:
        free = free_gb()
        if free < NEEDS_GB[v]:
            print(f"{v}: skipped, {free:.1f} GB free on the card, it needs {NEEDS_GB[v]:g}")
            skipped.append({"variant": v, "skipped": f"{free:.1f} GB free < {NEEDS_GB[v]:g} GB"})
            continue
        cmd = [sys.executable, __file__, "--one", v, "--steps", str(args.steps), "--shape", args.shape]
        env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{v}: FAILED (exit {proc.returncode})\n{proc.stderr[-3000:]}")
            skipped.append({"variant": v, "failed": proc.stderr[-3000:]})
            continue
        res = json.loads(lines[-1][len("RESULT ") :])
        res["process_s"] = time.perf_counter() - t0
        if v == "optimizer":
            optimizer = res
            print("optimizer alone: " + ", ".join(f"{k} {x:.4g}" for k, x in res.items() if isinstance(x, float)))
            continue
        results.append(res)
        print(f"{v}: {median_step(res):.3f} s/step, peak {res['peak_device_used_gb']:.2f} GB", flush=True)
    if not results:
        return 1
    by = {r["variant"]: r for r in results}
    print(f"\n{'variant':<13}{'s/step':>8}{'fwd s':>7}{'bwd s':>7}{'peak used GB':>14}{'torch alloc GB':>16}  losses")
    for r in results:
        ph = r.get("phase_s", {})
        print(f"{r['variant']:<13}{median_step(r):>8.3f}{ph.get('forward', 0):>7.3f}{ph.get('backward', 0):>7.3f}"
              f"{r['peak_device_used_gb']:>14.2f}{r['torch_max_allocated_gb']:>16.2f}  "
              f"{', '.join(f'{x:.3f}' for x in r['losses'])}")  # fmt: skip
    summary = {}
    if "ours" in by and "bnb+peft" in by:
        o, b = by["ours"], by["bnb+peft"]
        summary = {
            "ours_step_s": median_step(o),
            "bnb_step_s": median_step(b),
            "step_time_ratio_vs_bnb": median_step(o) / median_step(b),
            "ours_peak_used_gb": o["peak_device_used_gb"],
            "bnb_peak_used_gb": b["peak_device_used_gb"],
            "fits_target": o["peak_device_used_gb"] <= TARGET_GB,
            "as_fast_as_bnb": median_step(o) <= median_step(b),
        }
        print(f"ours / bnb+peft step time {summary['step_time_ratio_vs_bnb']:.2f}x; peak {o['peak_device_used_gb']:.2f}"
              f" GB (target <= {TARGET_GB:g}: {'met' if summary['fits_target'] else 'MISSED'}); step time target "
              f"(<= bnb's): {'met' if summary['as_fast_as_bnb'] else 'MISSED'}")  # fmt: skip
    device = results[0]["device"]
    payload = {"device": device, "command": " ".join(sys.argv), "summary": summary, "results": results,
               "optimizer": optimizer, "not_run": skipped}  # fmt: skip
    name = f"bench_65b_{device.replace(' ', '_')}" + ("" if args.shape == SHAPE else f"_{args.shape}") + args.suffix
    path = save(name, payload)
    plot(results, RESULTS / f"{name}.png")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
