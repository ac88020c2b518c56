"""Greedy decoding: tokens/s and ms per token, ours (static KV cache + captured decode step) vs transformers' generate
on ours, on bitsandbytes Linear4bit and on bf16 nn.Linear.

Variants (LoRA r 64 / alpha 16 in bf16 on all seven linears of every layer, dropout 0, bf16 compute):
    ours-generate  QLoRALinear (cupy backend, NF4 + double quant) under transformers' model.generate (dynamic cache)
    ours-static    the same model, backends.torchlib.decode with capture=False: static KV cache, eager steps
    ours-graph     the same, the one-token step captured once and replayed (what `qlora generate --backend cupy` runs)
    bnb-generate   bitsandbytes Linear4bit (NF4, double quant, bf16 compute) + a PEFT LoRA pair, model.generate
    bnb-graph      the same model under our captured decode (eager, with the reason in the row, if refused)
    bf16-generate  nn.Linear in bf16 + a PEFT LoRA pair, model.generate
    bf16-graph     the same under our captured decode: the 16-bit floor of a decode step
Models: llama7b-4 (LLaMA-7B dimensions, 4 decoder layers, random weights: backends.torchlib.synthetic for ours, a
random transformers LlamaForCausalLM for the peers) and, with --smollm2 PATH (HF dir or .gguf), SmolLM2.
Shapes: a PROMPT-token prompt of random ids, NEW new tokens, batch 1 and 8, no end token (every run makes all NEW).

Timing: one call = the whole decode (prefill, the capture where there is one, every step).  GPU ms: CUDA events
around the call after WARMUP untimed calls, median of REPS; host ms: perf_counter around the same call (the Python
and launch work; a loop that never waits for the GPU returns before the GPU is done). ms per token = (call with NEW
tokens - call with H = NEW / 2 tokens, at least 4) / (NEW - H): the steady decode step (both calls pay the prefill,
the warm-up steps and the capture once, so the difference is decode steps only); ``ms_per_token_amortised`` = (call
with NEW - call with 1 token) / (NEW - 1): the prefill taken out, the warm-up and the capture spread over the NEW
tokens (what a NEW-token generation pays per token); tokens/s = B * NEW / call seconds (end to end).
``tokens_match_static``: the graph's tokens equal the same model's eager static decode (they must:
tests/torchlib/test_decode.py).

    python benchmarks/bench_decode.py           # table + benchmarks/results/bench_decode_<device>.{json,png}
    python benchmarks/bench_decode.py --smollm2 ~/.cache/qlora-ref/SmolLM2-135M-Instruct.Q4_1.gguf
    python benchmarks/bench_decode.py --smoke --out /tmp/x        # CPU, a tiny model, seconds (the test's mode)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import RESULTS, commit  # noqa: E402

R, ALPHA = 64, 16
PROMPT, NEW, BATCHES, WARMUP, REPS = 64, 128, (1, 8), 2, 5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ("ours-generate", "ours-static", "ours-graph", "bnb-generate", "bnb-graph", "bf16-generate", "bf16-graph")


@dataclasses.dataclass
class Setup:
    device: str = "cuda"  # "cpu" in --smoke
    backend: str = "cupy"  # ours' dequantization backend ("numpy" in --smoke)
    dtype: str = "bfloat16"  # compute, LoRA and peer weights ("float32" in --smoke: the CPU's)
    r: int = R
    prompt: int = PROMPT  # prompt tokens per row
    new: int = NEW  # tokens generated per row
    batches: tuple = BATCHES
    warmup: int = WARMUP
    reps: int = REPS


SMOKE = Setup(device="cpu", backend="numpy", dtype="float32", r=4, prompt=8, new=4, batches=(1, 2), warmup=1, reps=2)


MODELS = ("llama7b", "llama7b-4")


def shapes(smoke: bool, models=MODELS) -> dict:
    """The random models by name: llama7b (LLaMA-7B, all 32 layers), llama7b-4 (its first 4); tiny in --smoke."""
    from qlora_ref.memory import llama_7b
    from qlora_ref.shapes import ModelShape

    if smoke:
        return {"tiny": ModelShape("tiny", hidden=64, intermediate=192, layers=2, heads=4, kv_heads=2, vocab=128)}
    known = {"llama7b": llama_7b, "llama7b-4": dataclasses.replace(llama_7b, name="llama-7b x4 layers", layers=4)}
    return {m: known[m] for m in models}


# --- the models ---------------------------------------------------------------------------------------------------


def dense_model(shape, path: str | None, s: Setup):
    """A transformers LlamaForCausalLM in s.dtype on s.device: random (shape) or loaded (path)."""
    import torch

    from backends.torchlib.dtypes import as_torch_dtype

    dt = as_torch_dtype(s.dtype)
    if path is not None:
        from backends.torchlib.load import load_model

        return load_model(path, backend=s.backend, dtype=s.dtype, prepare=False).to(s.device).eval()
    import transformers

    from backends.torchlib.synthetic import llama_config

    torch.manual_seed(0)
    with torch.device(s.device):
        model = transformers.LlamaForCausalLM(llama_config(shape, max_positions=4096))
    return model.to(dt).eval()


def to_bnb(model, s: Setup):
    """Every decoder nn.Linear -> bitsandbytes Linear4bit (NF4, double quant, compute in s.dtype), quantized where
    the weight is when moved to s.device (Params4bit quantizes on its first move to a device)."""
    import bitsandbytes as bnb
    import torch

    from backends.torchlib.dtypes import as_torch_dtype

    dt = as_torch_dtype(s.dtype)
    for _, module in list(model.model.named_modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                lin = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                        compute_dtype=dt, compress_statistics=True, quant_type="nf4")  # fmt: skip
                lin.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True
                )  # fmt: skip (quantized on the device)
                setattr(module, name, lin.to(s.device))
    return model


def with_peft_lora(model, s: Setup):
    """A PEFT LoRA pair (r, alpha, dropout 0, in s.dtype) on the seven targets; returns the injected base model
    (a LlamaForCausalLM whose forward our decode can call)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    from backends.torchlib.dtypes import as_torch_dtype

    peft_model = get_peft_model(model, LoraConfig(r=s.r, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS))
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            for adapters in (module.lora_A, module.lora_B):
                adapters.to(as_torch_dtype(s.dtype))
    return peft_model.get_base_model().eval()


def build(kind: str, shape, path: str | None, s: Setup):
    """The model of a variant's kind: 'ours', 'bnb' or 'bf16'."""
    if kind == "ours":
        if path is not None:
            from backends.torchlib.load import load_model

            return load_model(path, backend=s.backend, r=s.r, alpha=ALPHA, dropout=0.0, lora_dtype=s.dtype,
                              gradient_checkpointing=False).eval()  # fmt: skip
        from backends.torchlib.synthetic import random_qlora_model

        return random_qlora_model(shape, backend=s.backend, r=s.r, alpha=ALPHA, lora_dtype=s.dtype,
                                  gradient_checkpointing=False).eval()  # fmt: skip
    model = dense_model(shape, path, s)
    if kind == "bnb":
        model = to_bnb(model, s)
    return with_peft_lora(model, s)


# --- the timing ---------------------------------------------------------------------------------------------------


def timed(call, s: Setup) -> tuple[float | None, float]:
    """(GPU ms by CUDA events or None on the CPU, host ms), medians of s.reps after s.warmup calls."""
    import torch

    cuda = s.device == "cuda"
    for _ in range(s.warmup):
        call()
    gpu, host = [], []
    for _ in range(s.reps):
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        call()
        t1 = time.perf_counter()
        if cuda:
            end.record()
            end.synchronize()
            gpu.append(start.elapsed_time(end))
        host.append((t1 - t0) * 1e3)
    return (statistics.median(gpu) if cuda else None), statistics.median(host)


def steady_from(new: int) -> int:
    """The shorter call's token count for the steady step: half of ``new``, and past the prefill, the warm-up steps
    and the capture (greedy_decode's default warm-up is 2), so both calls pay those once and their difference is
    only decode steps (graph replays for ours-graph)."""
    return min(new - 1, max(4, new // 2)) if new > 1 else 1


def decoder(model, variant: str, x, mask, new: int, last: dict):
    """A call that decodes ``new`` tokens for (x, mask) with the variant's decoder; ``last`` keeps its tokens and,
    for ours, the Decoded's accounting."""
    import torch

    from backends.torchlib.decode import greedy_decode

    mode = variant.split("-", 1)[1]
    if mode == "generate":

        def call():
            with torch.no_grad():
                out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                     do_sample=False, pad_token_id=0, use_cache=True)  # fmt: skip
            last["tokens"] = out[:, x.shape[1] :]

        return call

    def call():
        d = greedy_decode(model, x, mask, max_new_tokens=new, capture=mode == "graph", say=last.setdefault("said", [])
                          .append)  # fmt: skip
        last.update(tokens=d.tokens, captured=d.captured, replays=d.replays, why=d.why_not_captured)

    return call


def run_model(model_name: str, shape, path: str | None, variants: list[str], s: Setup) -> list[dict]:
    import torch

    rows = []
    statics: dict[int, torch.Tensor] = {}  # batch -> ours-static's tokens
    kinds = list(dict.fromkeys(v.split("-")[0] for v in variants))
    for kind in kinds:
        if kind == "bnb":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError as e:
                print(f"skipped bnb-*: bitsandbytes is not installed ({e})")
                rows += [dict(model=model_name, variant=v, skipped="bitsandbytes is not installed")
                         for v in variants if v.startswith("bnb")]  # fmt: skip
                continue
        try:
            model = build(kind, shape, path, s)
        except Exception as e:
            rows += [dict(model=model_name, variant=v, error=f"{type(e).__name__}: {e}"[:300])
                     for v in variants if v.startswith(kind)]  # fmt: skip
            continue
        vocab = model.config.vocab_size
        for B in s.batches:
            g = torch.Generator().manual_seed(B)
            x = torch.randint(0, vocab, (B, s.prompt), generator=g)  # (B, T) random ids, on the host
            mask = torch.ones_like(x)  # (B, T)
            for v in (v for v in variants if v.startswith(kind)):
                # generate takes its inputs on the model's device; our decode checks them on the host, then moves them
                xs, ms = (x.to(s.device), mask.to(s.device)) if v.endswith("generate") else (x, mask)
                last: dict = {}
                try:
                    full_gpu, full_host = timed(decoder(model, v, xs, ms, s.new, last), s)
                    tokens = last["tokens"]
                    one_gpu, one_host = timed(decoder(model, v, xs, ms, 1, {}), s)
                    half = steady_from(s.new)
                    half_gpu, half_host = timed(decoder(model, v, xs, ms, half, {}), s)
                except Exception as e:
                    rows.append(dict(model=model_name, variant=v, batch=B, error=f"{type(e).__name__}: {e}"[:300]))
                    continue
                gpu = full_gpu is not None
                full, one, mid = (full_gpu, one_gpu, half_gpu) if gpu else (full_host, one_host, half_host)
                row = dict(model=model_name, variant=v, batch=B, prompt=s.prompt, new=s.new, call_ms=full,
                           call_host_ms=full_host, ms_per_token=(full - mid) / (s.new - half),
                           host_ms_per_token=(full_host - half_host) / (s.new - half),
                           ms_per_token_amortised=(full - one) / (s.new - 1),
                           tokens_per_s=B * s.new / (full * 1e-3))  # fmt: skip
                if "captured" in last:
                    row.update(captured=last["captured"], replays=last["replays"], why_not_captured=last["why"])
                if v == "ours-static":
                    statics[B] = tokens.cpu()
                if v == "ours-graph" and B in statics:
                    row["tokens_match_static"] = bool(torch.equal(tokens.cpu(), statics[B]))
                rows.append(row)
                print(f"{model_name} B={B} {v}: {row['ms_per_token']:.3f} ms/token, {row['tokens_per_s']:.1f} tokens/s"
                      f"{'' if 'captured' not in row else ', captured' if row['captured'] else ', eager'}",
                      file=sys.stderr, flush=True)  # fmt: skip
        del model
        gc.collect()
        if s.device == "cuda":
            from backends.torchlib.scratch import release_scratch

            release_scratch()
            torch.cuda.empty_cache()
    return rows


def headlines(rows: list[dict]) -> dict:
    """decode_7b_*: the full LLaMA-7B shape at batch 1, ours captured vs transformers + bitsandbytes generate and vs
    the bf16 model under the same static cache and capture (tokens/s ratios = ms per token ratios)."""

    def ms(variant):
        return next((r["ms_per_token"] for r in rows if r.get("model") == "llama7b" and r.get("batch") == 1
                     and r.get("variant") == variant and "ms_per_token" in r), None)  # fmt: skip

    ours = ms("ours-graph")
    out = {}
    for key, peer in (("decode_7b_speedup_vs_bnb", "bnb-generate"), ("decode_7b_speedup_vs_bf16_graph", "bf16-graph")):
        theirs = ms(peer)
        out[key] = theirs / ours if ours and theirs else None
    return out


def device_info(s: Setup) -> dict:
    import platform

    import torch

    from benchmarks.common import cpu_name, package_versions

    info = {"device": torch.cuda.get_device_name(0) if s.device == "cuda" else cpu_name(), "torch": torch.__version__,
            "python": platform.python_version()}  # fmt: skip
    return {**info, **package_versions(("transformers", "bitsandbytes", "peft", "cupy"))}


def plot(doc: dict, path: Path) -> None:
    """Left: ms per decode step by model and batch; right (with --part kernel): us per 4-bit matvec call under graph
    replay by shape and token count, against bitsandbytes, bf16 cuBLAS and the copy-bandwidth floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["rows"] if "ms_per_token" in r]
    groups = list(dict.fromkeys((r["model"], r["batch"]) for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    kernel = doc.get("kernel", {}).get("rows", [])
    panels = [p for p, have in (("decode", rows), ("kernel", kernel)) if have] or ["decode"]
    widths = {"decode": max(6, 2.2 * len(groups) + 2), "kernel": max(6, 0.9 * len(kernel) + 2)}
    fig, axes = plt.subplots(1, len(panels), figsize=(sum(widths[p] for p in panels), 4.4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "decode":
            w = 0.8 / max(1, len(variants))
            for j, v in enumerate(variants):
                vals = [next((r["ms_per_token"] for r in rows if r["variant"] == v and (r["model"], r["batch"]) == gr),
                             0.0) for gr in groups]  # fmt: skip
                ax.bar([i + j * w for i in range(len(groups))], vals, w, label=v)
            ax.set_xticks([i + 0.4 - w / 2 for i in range(len(groups))], [f"{m}\nbatch {b}" for m, b in groups])
            ax.set(ylabel="ms per decode step (lower is better)", title=f"greedy decode on {doc['info']['device']}")
        else:
            names = [("ours", "ours (any order, v3/v4)"), ("ours_spec", "ours (spec order, v2)"),
                     ("bnb", "bitsandbytes"), ("bf16", "bf16 cuBLAS"),
                     ("floor", "4-bit bytes at copy bandwidth")]  # fmt: skip
            w = 0.8 / len(names)
            for j, (key, label) in enumerate(names):
                vals = [r.get("floor_us" if key == "floor" else f"{key}_graph_us") or 0.0 for r in kernel]
                ax.bar([i + j * w for i in range(len(kernel))], vals, w, label=label)
            ticks = [f"{r['shape'][0]}x{r['shape'][1]}\nT={r['tokens']}" for r in kernel]
            ax.set_xticks([i + 0.4 - w / 2 for i in range(len(kernel))], ticks, fontsize=7)
            ax.set_yscale("log")
            ax.set(ylabel="us per call, CUDA-graph replay (log)", title="4-bit matvec, one call")
        ax.legend(fontsize=7)
    fig.suptitle(f"commit {doc.get('commit', '?')}, {doc['setup']['new']} new tokens after {doc['setup']['prompt']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--smollm2", default=None, help="SmolLM2 model dir or .gguf: also benchmark it")
    ap.add_argument("--new", type=int, default=None, help=f"new tokens per row (default {NEW})")
    ap.add_argument("--reps", type=int, default=None, help=f"timed calls per row (default {REPS})")
    ap.add_argument("--warmup", type=int, default=None, help=f"untimed calls first (default {WARMUP})")
    ap.add_argument("--models", default=",".join(MODELS), help=f"random models to decode ({', '.join(MODELS)})")
    ap.add_argument("--part", default="decode,kernel", help="decode (whole models), kernel (the 4-bit matvec alone)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8)")
    ap.add_argument("--smoke", action="store_true", help="CPU, a tiny random LLaMA, seconds: checks the plumbing")
    ap.add_argument("--out", default=str(RESULTS), help="folder for bench_decode[_smoke].{json,png}")
    args = ap.parse_args(argv)
    given = {k: v for k, v in (("new", args.new), ("reps", args.reps), ("warmup", args.warmup)) if v}
    if args.batches:
        given["batches"] = tuple(int(b) for b in args.batches.split(","))
    s = dataclasses.replace(SMOKE if args.smoke else Setup(), **given)
    parts = {p for p in args.part.split(",") if p}
    if parts - {"decode", "kernel"}:
        ap.error(f"unknown --part {sorted(parts - {'decode', 'kernel'})}; choose decode, kernel")
    models = [m for m in args.models.split(",") if m]
    if set(models) - set(MODELS):
        ap.error(f"unknown --models {sorted(set(models) - set(MODELS))}; choose from {', '.join(MODELS)}")
    if s.new < 2:
        ap.error("--new must be >= 2 (ms per token is a difference of two lengths)")
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")

    rows = []
    doc = {"info": device_info(s), "commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "setup": dataclasses.asdict(s)}  # fmt: skip
    doc["device"] = doc["info"]["device"]
    if "kernel" in parts and not args.smoke:
        from benchmarks.decode_kernels import run_kernels

        doc["kernel"] = run_kernels()
        doc["gemv_11008x4096_t1_graph_us"] = doc["kernel"]["gemv_11008x4096_t1_graph_us"]
    if "decode" in parts:
        for name, shape in shapes(args.smoke, models).items():
            rows += run_model(name, shape, None, variants, s)
        if args.smollm2:
            rows += run_model("smollm2", None, args.smollm2, variants, s)
    doc["rows"] = rows
    doc.update(headlines(rows))

    print(f"greedy decode on {doc['device']} ({s.prompt} prompt tokens, {s.new} new, commit {doc['commit']})")
    print(f"{'model':<10}{'B':>3} {'variant':<15}{'tokens/s':>10}{'ms/token':>10}{'host ms/tok':>12}  captured")
    for r in rows:
        head = f"{r['model']:<10}{r.get('batch', ''):>3} {r['variant']:<15}"
        if "ms_per_token" not in r:
            print(f"{head} {'SKIPPED ' + r['skipped'] if 'skipped' in r else 'ERROR ' + r['error'][:90]}")
            continue
        cap = "" if "captured" not in r else "yes" if r["captured"] else f"no ({r['why_not_captured'] or 'eager'})"
        match = "" if "tokens_match_static" not in r else f"; tokens == static: {r['tokens_match_static']}"
        nums = f"{r['tokens_per_s']:>10,.1f}{r['ms_per_token']:>10.3f}{r['host_ms_per_token']:>12.3f}"
        print(f"{head}{nums}  {cap[:70]}{match}")
    for k, v in doc.items():
        if k.startswith(("gemv_", "decode_")):
            print(f"{k}: {v if v is None else round(v, 3)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "bench_decode_smoke" if args.smoke else f"bench_decode_{doc['device'].replace(' ', '_')}"
    (out / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc, out / f"{name}.png")
    print(f"wrote {out / (name + '.json')} and {out / (name + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
