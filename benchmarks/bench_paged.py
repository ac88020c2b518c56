"""PagedAdamW on the GPU: spike survival, step time with states resident, and page-out/page-in cost.

Shapes: the LoRA parameters of LLaMA-7B at r = 64 on every linear layer (32 layers; per layer q, k, v, o 4096x4096,
gate and up 11008x4096, down 4096x11008): 448 tensors, 159,907,840 float32 parameters, 1.28 GB of 32-bit state.

(1) Spike survival.  An emulated device of X bytes (X = params + grads + spike + 512 MiB): torch's allocator is capped
    with set_per_process_memory_fraction, and PagedAdamW sees the same budget through free_memory_fn (managed memory
    is outside torch's allocator, so the cap given to torch is X minus the state bytes while they are resident).
    Every third step allocates a temporary spike.  torch.optim.AdamW(fused=True) keeps its states in the allocator and
    must OOM; PagedAdamW pages its states out after the step (free < page_threshold_bytes) and must finish with params
    bit-identical to an uncapped run that never pages.
(2) Step time, states resident: ours (fused multi-tensor launch, 32-bit and 8-bit) vs torch.optim.AdamW fused and
    foreach, and bitsandbytes' PagedAdamW32bit / PagedAdamW8bit when the wheel is installed.  CUDA events around
    step(), after warm-up, median of `iters`.  Floor: bytes moved / the device-to-device copy bandwidth measured here.
(3) Page-out + page-in of the 1.28 GB arena vs pinned host<->device copies of the same size (the host link).

Run on the device:  python3 benchmarks/bench_paged.py --out "$OUT"   (prints a table, writes paged_<gpu>.json)
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.torchlib import PagedAdamW  # noqa: E402
from benchmarks.common import cuda_median_ms  # noqa: E402


@dataclass
class BenchConfig:
    layers: int = 32  # LLaMA-7B
    hidden: int = 4096
    intermediate: int = 11008
    r: int = 64  # LoRA rank on every linear layer
    warmup: int = 5
    iters: int = 30
    spike_steps: int = 6
    spike_every: int = 3
    spike_gib: float = 2.0  # the temporary allocation
    slack_mib: int = 512  # emulated device = params + grads + spike + slack
    page_reps: int = 3
    out: str = "benchmarks/results"


def lora_shapes(c: BenchConfig) -> list[tuple[int, int]]:
    """(A, B) shapes of every LoRA adapter: A [r, in], B [out, r] (PEFT layout)."""
    h, i, r = c.hidden, c.intermediate, c.r
    per_layer = [(h, h)] * 4 + [(h, i), (h, i), (i, h)]  # (in, out): q k v o, gate up, down
    shapes = []
    for _ in range(c.layers):
        for fan_in, fan_out in per_layer:
            shapes += [(r, fan_in), (fan_out, r)]
    return shapes


def make_params(shapes, seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, device="cuda", generator=gen) * 0.02)
        p.grad = torch.zeros_like(p)
        params.append(p)
    return params


def fill_grads(params, gen: torch.Generator) -> None:
    for p in params:
        p.grad.normal_(0.0, 1e-3, generator=gen)  # in place: no new memory during the run


def time_steps(opt, params, c: BenchConfig) -> float:
    """Median milliseconds of opt.step() by CUDA events (grads fixed; the step still does the full update)."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    fill_grads(params, gen)
    return cuda_median_ms(opt.step, warmup=c.warmup, reps=c.iters)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (the memory ceiling measured in this run)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    del a, b
    torch.cuda.empty_cache()
    return 2 * (1 << 30) / (statistics.median(times) / 1e3)


# ---- (1) spike survival --------------------------------------------------------------------------------------------


def spike_run(kind: str, shapes, c: BenchConfig, budget: int | None) -> dict:
    """kind: "reference" (ours, uncapped, never pages), "paged" (ours under the budget), "torch" (fused AdamW)."""
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    params = make_params(shapes, seed=0)
    gen = torch.Generator(device="cuda").manual_seed(2)
    spike_bytes = int(c.spike_gib * 2**30)
    holder: dict = {"opt": None}
    state_bytes = 8 * sum(p.numel() for p in params)

    def free_fn() -> int:
        opt = holder["opt"]
        resident = state_bytes if (opt is not None and opt.resident) else 0  # nothing allocated before the ctor
        return budget - torch.cuda.memory_reserved() - resident

    def cap(nbytes: int) -> None:
        torch.cuda.set_per_process_memory_fraction(min(1.0, max(nbytes, 0) / total))

    result = {"kind": kind, "budget_bytes": budget, "spike_bytes": spike_bytes, "page_outs": 0, "oom_at": None}
    try:
        if kind == "torch":
            cap(budget)
            opt = torch.optim.AdamW(params, lr=2e-4, fused=True)
        elif kind == "paged":
            cap(budget - state_bytes)
            opt = PagedAdamW(
                params, lr=2e-4, page_threshold_bytes=spike_bytes + (256 << 20), margin_bytes=64 << 20,
                free_memory_fn=free_fn, check_finite=False,
            )  # fmt: skip
        else:
            opt = PagedAdamW(params, lr=2e-4, page_threshold_bytes=0, check_finite=False)
        holder["opt"] = opt
        for step in range(1, c.spike_steps + 1):
            fill_grads(params, gen)
            if kind == "paged":
                cap(budget - state_bytes)  # the states come back in this step
            result["oom_at"] = f"step {step}"
            opt.step()
            if kind == "paged":
                result["page_outs"] += int(not opt.resident)
                cap(budget - (state_bytes if opt.resident else 0))
            if step % c.spike_every == 0:
                result["oom_at"] = f"spike after step {step}"
                spike = torch.empty(spike_bytes, dtype=torch.uint8, device="cuda")
                spike.fill_(1)
                del spike
                torch.cuda.empty_cache()
            result["oom_at"] = None
        torch.cuda.synchronize()
        result["params"] = [p.detach().cpu() for p in params]
        result["peak_reserved"] = torch.cuda.max_memory_reserved()
    except Exception as e:  # torch.OutOfMemoryError expected for the unpaged run; anything else is reported
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    finally:
        cap(total)
        del params
        holder["opt"] = None
        opt = None
        gc.collect()
        torch.cuda.empty_cache()
    return result


def _location(opt) -> str:
    try:
        return opt.state_location()
    except Exception as e:  # reported, not fatal: the timings below do not depend on it
        return f"unknown ({type(e).__name__}: {e})"


# ---- (3) paging cost -----------------------------------------------------------------------------------------------


def paging_cost(shapes, c: BenchConfig) -> dict:
    params = make_params(shapes, seed=0)
    opt = PagedAdamW(params, lr=2e-4, page_threshold_bytes=0, check_finite=False)
    fill_grads(params, torch.Generator(device="cuda").manual_seed(3))
    opt.step()
    torch.cuda.synchronize()
    import cupy

    free_resident = cupy.cuda.runtime.memGetInfo()[0]
    opt.page_out(sync=True)
    free_paged = cupy.cuda.runtime.memGetInfo()[0]
    where_out = _location(opt)
    opt.page_in()
    torch.cuda.synchronize()
    where_in = _location(opt)
    torch.cuda.synchronize()
    outs, ins = [], []
    for _ in range(c.page_reps):
        t0 = time.perf_counter()
        opt.page_out(sync=True)
        t1 = time.perf_counter()
        opt.page_in()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        outs.append(t1 - t0)
        ins.append(t2 - t1)
    nbytes = opt.state_bytes
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    d2h, h2d = [], []
    for _ in range(c.page_reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        host.copy_(dev, non_blocking=True)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        d2h.append(t1 - t0)
        h2d.append(t2 - t1)
    del host, dev, opt, params
    gc.collect()
    torch.cuda.empty_cache()
    out_s, in_s = statistics.median(outs), statistics.median(ins)
    return {
        "bytes": nbytes,
        "device_bytes_freed_by_page_out": free_paged - free_resident,  # cudaMemGetInfo's view
        "location_after_page_out": where_out,
        "location_after_page_in": where_in,
        "page_out_ms": 1e3 * out_s,
        "page_in_ms": 1e3 * in_s,
        "page_out_GBps": nbytes / out_s / 1e9,
        "page_in_GBps": nbytes / in_s / 1e9,
        "pinned_d2h_GBps": nbytes / statistics.median(d2h) / 1e9,
        "pinned_h2d_GBps": nbytes / statistics.median(h2d) / 1e9,
    }


# ---- main ----------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in asdict(BenchConfig()).items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    c = BenchConfig(**vars(ap.parse_args()))
    print("config:", asdict(c))
    shapes = lora_shapes(c)
    n = sum(a * b for a, b in shapes)
    device = torch.cuda.get_device_name(0)
    print(f"device: {device}; {len(shapes)} LoRA tensors, {n:,} params, {8 * n / 1e9:.2f} GB of 32-bit state")
    results: dict = {"device": device, "config": asdict(c), "n_params": n, "n_tensors": len(shapes)}
    try:
        results["commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        results["commit"] = "none (uncommitted tree)"
    results["torch"] = torch.__version__

    # (1) spike survival
    params_bytes = 4 * n
    budget = 2 * params_bytes + int(c.spike_gib * 2**30) + (c.slack_mib << 20)
    ref = spike_run("reference", shapes, c, None)
    paged = spike_run("paged", shapes, c, budget)
    unpaged = spike_run("torch", shapes, c, budget)
    same = "params" in paged and all(torch.equal(a, b) for a, b in zip(ref["params"], paged["params"], strict=True))
    results["spike"] = {
        "budget_bytes": budget,
        "paged": {k: v for k, v in paged.items() if k != "params"},
        "torch_fused_adamw": {k: v for k, v in unpaged.items() if k != "params"},
        "paged_equals_uncapped_reference": bool(same),
    }

    # (2) step time, states resident
    ceiling = copy_bandwidth()
    params = make_params(shapes, seed=0)
    bytes_32 = 28 * n  # read p, g, m, v; write p, m, v (float32)
    bytes_8 = 14 * n  # read p, g, m, v codes; write p and codes (absmax negligible)
    rows = []

    def row(name, make, nbytes, params=params):
        try:
            opt = make(params)
            ms = time_steps(opt, params, c)
            del opt
            gc.collect()  # optimizers hold reference cycles; free their states before the next row
            torch.cuda.empty_cache()
            floor = nbytes / ceiling * 1e3
            rows.append({"optimizer": name, "ms": ms, "GBps": nbytes / (ms / 1e3) / 1e9, "floor_ms": floor})
        except Exception as e:  # a peer that fails to run is reported, not fatal
            rows.append({"optimizer": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})

    ours = dict(lr=2e-4, page_threshold_bytes=0)
    row("PagedAdamW 32-bit (ours, fused launch)", lambda ps: PagedAdamW(ps, check_finite=False, **ours), bytes_32)
    row("PagedAdamW 32-bit (ours, + non-finite check)", lambda ps: PagedAdamW(ps, **ours), bytes_32)
    row("torch AdamW fused=True", lambda ps: torch.optim.AdamW(ps, lr=2e-4, fused=True), bytes_32)
    row("torch AdamW foreach=True", lambda ps: torch.optim.AdamW(ps, lr=2e-4, foreach=True), bytes_32)
    row("PagedAdamW 8-bit (ours, fused launch)",
        lambda ps: PagedAdamW(ps, state_bits=8, check_finite=False, **ours), bytes_8)  # fmt: skip
    try:
        import bitsandbytes as bnb

        results["bitsandbytes"] = bnb.__version__
        row("bnb PagedAdamW32bit", lambda ps: bnb.optim.PagedAdamW32bit(ps, lr=2e-4, weight_decay=0.0), bytes_32)
        row("bnb PagedAdamW8bit", lambda ps: bnb.optim.PagedAdamW8bit(ps, lr=2e-4, weight_decay=0.0), bytes_8)
    except ImportError:
        results["bitsandbytes"] = "not installed"
    del params
    gc.collect()
    torch.cuda.empty_cache()
    results["step_time"] = {"copy_ceiling_GBps": ceiling / 1e9, "rows": rows}

    # (3) paging cost
    results["paging"] = paging_cost(shapes, c)

    # report
    print(
        f"\n(1) spike survival, emulated device {budget / 2**30:.2f} GiB, spike {c.spike_gib} GiB every {c.spike_every}"
    )
    print(f"    torch AdamW(fused): {'OOM at ' + str(unpaged['oom_at']) if 'error' in unpaged else 'survived'}")
    print(f"    PagedAdamW: {'OOM at ' + str(paged['oom_at']) if 'error' in paged else 'survived'}, "
          f"page-outs {paged['page_outs']}, params == uncapped reference: {same}")  # fmt: skip
    print(f"\n(2) step time, {n / 1e6:.1f}M params, states resident (copy ceiling {ceiling / 1e12:.2f} TB/s)")
    fused = next((r["ms"] for r in rows if r["optimizer"].startswith("torch AdamW fused") and "ms" in r), None)
    print(f"    {'optimizer':48s} {'ms':>8s} {'GB/s':>8s} {'floor ms':>9s} {'x fused':>8s}")
    for r in rows:
        if "ms" in r:
            rel = f"{r['ms'] / fused:8.2f}" if fused else "       -"
            print(f"    {r['optimizer']:48s} {r['ms']:8.2f} {r['GBps']:8.0f} {r['floor_ms']:9.2f} {rel}")
        else:
            print(f"    {r['optimizer']:48s} {r['error']}")
    pg = results["paging"]
    freed = pg["device_bytes_freed_by_page_out"] / 1e9
    where = (
        f"on the {pg['location_after_page_out']} after page-out, on the {pg['location_after_page_in']} after page-in"
    )
    print(f"\n(3) paging {pg['bytes'] / 1e9:.2f} GB; states {where}; cudaMemGetInfo free grew {freed:.2f} GB")
    print(f"    page-out {pg['page_out_ms']:.1f} ms ({pg['page_out_GBps']:.1f} GB/s), in {pg['page_in_ms']:.1f} ms "
          f"({pg['page_in_GBps']:.1f} GB/s); pinned d2h {pg['pinned_d2h_GBps']:.1f} GB/s, "
          f"h2d {pg['pinned_h2d_GBps']:.1f} GB/s")  # fmt: skip
    out = Path(c.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "paged_" + "".join(ch if ch.isalnum() else "_" for ch in device).strip("_") + ".json"
    (out / name).write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {out / name}")


if __name__ == "__main__":
    main()
