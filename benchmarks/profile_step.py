"""Where a training step's time goes on a GPU: the main job's phases, and the GPU kernels of both steps by kind.

    python -m benchmarks.profile_step [--job main,train7b] [--steps 12]

- ``main``: the real ``qlora finetune --backend cupy`` (the embedded default) run in this process, every phase of
  ``Trainer.train_step`` timed with a device synchronisation before and after it (so each phase's time is its own,
  host and GPU): collate, the micro-steps (graph replays, their GPU time by CUDA events), clipping, the optimizer
  step, zero_grad, and what the fit loop does between steps.  Medians over the steps after the first two; then a
  cProfile of the optimizer step and the clip.  ``--model DIR`` for another model (e.g. a random one of its shape).
- ``train7b`` (``train7b-no-fuse``, ``train7b-graph``): bench_train's ``ours`` (``ours-no-fuse``, ``ours-graph``)
  variant (LLaMA-7B dims x 4 layers, 4 x 1024 tokens) under torch.profiler for two steps: GPU time by kernel kind
  (GEMM, the backend's CuPy kernels, attention, elementwise, reductions, copies), the GPU's idle gaps (inflated in
  eager steps: the profiler slows the host), and a cProfile of three steps.  ``train7b-unchecked``: without the
  clip's and the optimizer's finite checks, what the checks cost.
- main as well: its step under torch.profiler (the last steps, unsynchronised).

Prints a table per job; saves benchmarks/results/profile_step_<device>.json.  The synchronisations make the phase
times an upper bound of what each costs inside an unsynchronised step (nothing overlaps across a phase boundary).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KINDS = (  # (kind, substrings of a kernel name), first match wins: cuDNN's attention names hold "sm90_" too
    ("attention", ("flash", "fmha", "attention", "efficient", "sdpa")),
    ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "sm90_", "cublas")),
    (  # before "reduction": rmsnorm_* would match its "norm"
        "cupy backend",
        (
            "quantize_4bit",
            "adamw",
            "matvec_4bit",
            "absmax",
            "dropout",
            "clip",
            "lora_",
            "check_finite",
            "rmsnorm_",
            "swiglu_",
            "rope_v",
            "cross_entropy_fwd",
            "cross_entropy_bwd",
        ),
    ),
    ("reduction", ("reduce", "norm", "softmax", "cross_entropy", "nll", "sum")),
    ("copy / cast", ("copy", "cat", "memcpy", "memset", "fill")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "pointwise", "triton")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def is_annotation(name: str) -> bool:
    """A profiler range shown on the GPU's timeline (e.g. "Optimizer.step#PagedAdamW.step"), not a kernel."""
    return "#" in name or name.startswith("ProfilerStep")


def idle_table(spans: list[tuple[float, float, str]], steps: int, top: int = 12) -> dict:
    """Where the GPU waits: gaps between one kernel's end (the latest so far) and the next kernel's start.

    ``spans``: (start us, end us, name) of every kernel / copy in the profiled window (back-to-back steps, one
    synchronize at the end).  Per step: the window, the idle sum, the idle by gap size; the largest gaps with the
    kernels either side (a gap after a reduction and before the next step's work is a host synchronisation)."""
    spans = sorted(spans)
    gaps, t_end, prev = [], spans[0][1], spans[0][2]
    for s, e, n in spans[1:]:
        if s > t_end:
            gaps.append((s - t_end, prev[:90], n[:90]))
        if e > t_end:
            t_end, prev = e, n
    buckets = {"<5us": 0.0, "5-50us": 0.0, "50-500us": 0.0, ">500us": 0.0}
    for g, _, _ in gaps:
        key = "<5us" if g < 5 else "5-50us" if g < 50 else "50-500us" if g < 500 else ">500us"
        buckets[key] += g / steps / 1e3
    return {
        "window_ms_per_step": (t_end - spans[0][0]) / steps / 1e3,
        "idle_ms_per_step": sum(g for g, _, _ in gaps) / steps / 1e3,
        "idle_ms_by_gap": buckets,
        "largest_gaps_us": [(round(g, 1), a, b) for g, a, b in sorted(gaps, key=lambda x: -x[0])[:top]],
    }


def kernel_table(prof, steps: int) -> dict:
    """GPU microseconds per step by kind, the top kernels, the kernel count per step and the GPU's idle time, from a
    torch.profiler run (profiler ranges on the GPU timeline are not kernels: left out)."""
    by_kind, by_name, count, spans = defaultdict(float), defaultdict(float), 0, []
    for e in prof.events():
        if getattr(e, "device_type", None) is None or str(e.device_type) != "DeviceType.CUDA":
            continue
        if is_annotation(e.name):
            continue
        us = e.device_time if hasattr(e, "device_time") else e.cuda_time
        by_kind[kind_of(e.name)] += us / steps
        by_name[e.name[:150]] += us / steps
        spans.append((e.time_range.start, e.time_range.end, e.name))
        count += 1
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:25]
    return {
        "gpu_ms_per_step": sum(by_kind.values()) / 1e3,
        "kernels_per_step": count / steps,
        "ms_by_kind": {k: v / 1e3 for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels_ms": [(n, v / 1e3) for n, v in top],
        "idle": idle_table(spans, steps) if spans else {},
    }


def profiled(fn, steps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    return kernel_table(prof, steps)


class Phases:
    """Synchronised wall time of named phases, per step."""

    def __init__(self):
        self.now: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        self.on = True

    def wrap(self, name, fn):
        import torch

        def timed(*a, **k):
            if not self.on:
                return fn(*a, **k)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*a, **k)
            torch.cuda.synchronize()
            self.now[name] += (time.perf_counter() - t0) * 1e3
            return out

        return timed

    def end_step(self, total_ms: float):
        rec = dict(self.now, total=total_ms)
        rec["untimed"] = total_ms - sum(self.now.values())
        self.steps.append(rec)
        self.now = defaultdict(float)

    def medians(self, skip: int = 2) -> dict[str, float]:
        rows = self.steps[skip:] or self.steps
        return {k: statistics.median(r.get(k, 0.0) for r in rows) for k in rows[0]}


def job_main(steps: int, profile_steps: int, model: str | None) -> dict:
    """The main job in-process, its train_step's phases timed (module docstring)."""
    import tempfile

    import torch

    import backends.torchlib as TL
    from backends.app import cli, gpu_step, trainer
    from backends.torchlib.graph import StepGraphs
    from backends.torchlib.optim import PagedAdamW

    ph = Phases()
    replay_gpu = []
    trainer.collate = ph.wrap("collate", trainer.collate)
    gpu_step.GpuMicroSteps.run = ph.wrap("micro-steps (fwd+bwd)", gpu_step.GpuMicroSteps.run)
    TL.clip_grad_norm_ = ph.wrap("clip", TL.clip_grad_norm_)
    PagedAdamW.step = ph.wrap("optimizer step", PagedAdamW.step)
    PagedAdamW.zero_grad = ph.wrap("zero_grad", PagedAdamW.zero_grad)
    call = StepGraphs.__call__

    def replay(self, batch):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = call(self, batch)
        b.record()
        replay_gpu.append((a, b))
        return out

    StepGraphs.__call__ = replay
    step = trainer.Trainer.train_step
    prof_out, held = {}, {}

    def timed_step(self):
        held["trainer"] = self
        if self.step == steps - profile_steps - 1 and profile_steps:  # profile the last steps, unsynchronised
            ph.on = False
            prof_out.update(profiled(lambda: step(self), profile_steps))
            ph.on = True
            return step(self)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = step(self)
        torch.cuda.synchronize()
        ph.end_step((time.perf_counter() - t0) * 1e3)
        return r

    trainer.Trainer.train_step = timed_step
    out_dir = Path(tempfile.mkdtemp(prefix="qlora-profile-")) / "run"
    t0 = time.perf_counter()
    extra = ["--model", model] if model else []
    rc = cli.main(["finetune", "--backend", "cupy", "--output-dir", str(out_dir), "--no-progress",
                   "--max-steps", str(steps), *extra])  # fmt: skip
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"finetune failed ({rc})")
    torch.cuda.synchronize()
    gpu = [a.elapsed_time(b) for a, b in replay_gpu[4:]]
    host = host_profile(held["trainer"]) if "trainer" in held else {}
    return {
        "command": " ".join(["qlora finetune --backend cupy --max-steps", str(steps), *extra]),
        "wall_s_in_process": wall,
        "phase_ms_median": ph.medians(),
        "phase_ms_steps": ph.steps,
        "replay_gpu_ms_median": statistics.median(gpu) if gpu else None,
        "replays_timed": len(gpu),
        "profile": prof_out,
        "host_profile": host,
    }


def host_top(fn, calls: int, rows: int = 12) -> tuple[float, list[str]]:
    """(host ms per call, the cProfile lines of the functions with the most own time) over ``calls`` calls of fn,
    the device synchronised before and after."""
    import cProfile
    import io
    import pstats

    import torch

    torch.cuda.synchronize()
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    pr.disable()
    ms = (time.perf_counter() - t0) * 1e3 / calls
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(rows)
    return ms, buf.getvalue().splitlines()[-(rows + 12) :]


def host_profile(tr, calls: int = 20) -> dict:
    """cProfile of the optimizer step and the clip over the trained model's parameters (gradients of zeros): the
    functions with the most own time, and the host milliseconds per call (GPU work is microseconds at this size)."""
    import torch

    import backends.torchlib as TL

    params = list(tr.params.values())
    out = {}
    for name, fn in (("optimizer step", tr.optimizer.step), ("clip", lambda: TL.clip_grad_norm_(params, 0.3))):
        for p in params:
            p.grad = torch.zeros_like(p)
        fn()
        ms, top = host_top(fn, calls)
        out[name] = {"ms_per_call": ms, "top": top}
        print(f"== host profile: {name}, {ms:.2f} ms per call")
        print("\n".join(top))
    return out


def unchecked_clip(params, max_norm: float):
    """The clip's arithmetic (float64 foreach norms, one float32 norm, one _foreach_mul_) with no finite check: no
    host synchronisation.  For measuring what the checks' synchronisations cost, not for training."""
    import torch

    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64))).float()
    torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norm


def job_train7b(profile_steps: int, variant: str = "ours", checks: bool = True) -> dict:
    """bench_train's ``ours`` (or ``ours-no-fuse``) step under torch.profiler, and the host's cProfile of it.
    ``checks=False``: the clip and the optimizer without their finite checks (no synchronisation in the step)."""
    import tempfile

    from backends.torchlib.masks import causal_only
    from benchmarks import bench_train as B
    from benchmarks.common import cuda_median_ms

    model_dir = Path(tempfile.gettempdir()) / "qlora-bench-llama7b-4layers"
    if not (model_dir / "config.json").exists():
        B.make_model_dir(model_dir)
    model, opt, clip = B.build(variant, str(model_dir))
    if not checks:
        opt.check_finite = False
        clip = lambda ps: unchecked_clip(ps, B.MAX_NORM)  # noqa: E731
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    ids = B.batches(1)[0].cuda()
    with causal_only(model):  # as bench_train runs every ours variant: unpadded, unpacked batches
        captured = B.captured_step(model, params, ids) if variant.endswith("graph") else None

        def step():
            if captured is not None:
                captured({"ids": ids})
            else:
                model(input_ids=ids, labels=ids).loss.backward()
            clip(params)
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        ms = cuda_median_ms(step, warmup=1, reps=5)
        _, top = host_top(step, 3, rows=15)
        print("\n".join(top))
        return {"step_ms_events": ms, "flop_bound_terms": B.step_flops(), "profile": profiled(step, profile_steps),
                "host_top": top}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--job", default="main,train7b", help="comma-separated: main, train7b, train7b-no-fuse, train7b-unchecked"
    )
    ap.add_argument("--steps", type=int, default=12, help="main job: optimizer steps (the last 2 profiled)")
    ap.add_argument("--profile-steps", type=int, default=2)
    ap.add_argument("--model", default=None, help="main job: --model (default: the embedded default)")
    args = ap.parse_args(argv)
    import torch

    from benchmarks.common import save

    payload = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for job in args.job.split(","):
        if job == "main":
            r = job_main(args.steps, args.profile_steps, args.model)
        elif job.startswith("train7b"):
            variant = "ours-no-fuse" if "no-fuse" in job else "ours-graph" if "graph" in job else "ours"
            r = job_train7b(args.profile_steps, variant, checks="unchecked" not in job)
        else:
            raise SystemExit(f"unknown job {job!r}: main, train7b, train7b-no-fuse, train7b-unchecked")
        payload[job] = r
        print(f"== {job}")
        for k, v in r.get("phase_ms_median", {}).items():
            print(f"  phase {k:28s} {v:9.2f} ms")
        if "replay_gpu_ms_median" in r:
            print(f"  one replay, GPU (events)       {r['replay_gpu_ms_median']}")
        if "step_ms_events" in r:
            print(f"  step (CUDA events)             {r['step_ms_events']:.2f} ms")
        p = r["profile"]
        if p:
            print(f"  profile: {p['gpu_ms_per_step']:.2f} GPU ms/step, {p['kernels_per_step']:.0f} kernels/step")
            for k, v in p["ms_by_kind"].items():
                print(f"    {k:24s} {v:8.2f} ms")
            for n, v in p["top_kernels_ms"][:15]:
                print(f"    {v:8.3f}  {n}")
            idle = p.get("idle")
            if idle:
                print(f"  GPU idle {idle['idle_ms_per_step']:.2f} of {idle['window_ms_per_step']:.2f} ms/step "
                      f"({', '.join(f'{k} {v:.2f}' for k, v in idle['idle_ms_by_gap'].items())})")  # fmt: skip
                for g, a, b in idle["largest_gaps_us"][:8]:
                    print(f"    {g:8.1f} us  after {a[:60]}  before {b[:60]}")
    path = save(f"profile_step_{payload['device'].replace(' ', '_')}", payload)
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
