"""The real SmolLM2 default task on a GPU: `qlora finetune --backend cupy`, captured and eager, warm caches.

    python -m benchmarks.finetune_gpu [--modes auto,off] [--work DIR]

Runs the main job (the embedded default: SmolLM2-135M-Instruct, NF4 + double quantization, LoRA r 64 on every
linear layer, the generated task) once to warm the caches (the GGUF's converted directory, the kernels), then once
per ``--cuda-graphs`` mode and once per ``--variant`` (extra flags), each as its own process, timed whole from the
outside, each printed line time-stamped (``timeline``: where the wall time goes).  Per mode: wall seconds of the
whole command, training seconds, median ms per optimizer step (steps 2..; step 1 pays the captures), held-out exact
match and eval loss before/after, torch's peak memory, and the eager line the command printed, if any.  Saves
benchmarks/results/finetune_gpu_<device>.json and prints a short table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, save


def run_once(out: Path, mode: str, extra: tuple[str, ...] = ()) -> dict:
    cmd = [sys.executable, "-m", "backends.app.cli", "finetune", "--backend", "cupy", "--cuda-graphs", mode,
           "--output-dir", str(out), "--overwrite", "--no-progress", *extra]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    timeline = [(round(time.perf_counter() - t0, 3), line.rstrip()[:160]) for line in proc.stdout]
    rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = "\n".join(line for _, line in timeline[-40:])
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}):\n{tail}")
    summary = json.loads((out / "summary.json").read_text())
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_s = [r["step_seconds"] for r in steps if "step_seconds" in r]
    return {
        "cuda_graphs": mode,
        "flags": " ".join(extra),
        "wall_s": wall,
        "total_seconds": summary.get("total_seconds"),
        "train_seconds": summary.get("train_seconds"),
        "steps": summary.get("steps"),
        "ms_per_step_median": 1e3 * statistics.median(step_s[1:] or step_s),
        "ms_first_step": 1e3 * step_s[0],
        "exact_match_before": summary.get("exact_match_before"),
        "exact_match_after": summary.get("exact_match_after"),
        "eval_loss_before": summary.get("eval_loss_before"),
        "eval_loss_after": summary.get("eval_loss_after"),
        "peak_mem_gb_torch": summary.get("peak_mem_gb"),
        "eager_lines": [line for _, line in timeline if "runs eager" in line],
        "checkpointing_lines": [line for _, line in timeline if "gradient checkpointing" in line],
        "timeline": timeline,  # (seconds since the command started, the line it printed), for where the time goes
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="auto,off", help="comma-separated --cuda-graphs values to time")
    ap.add_argument("--work", default=None, help="scratch directory for the runs (default: a temporary one)")
    ap.add_argument("--variant", action="append", default=[], metavar="FLAGS",
                    help="also time the captured command with these extra flags (repeatable), e.g. "
                    "'--gradient-checkpointing on'")  # fmt: skip
    args = ap.parse_args(argv)
    import torch

    work = Path(args.work or tempfile.mkdtemp(prefix="qlora-finetune-gpu-"))
    modes = [m for m in args.modes.split(",") if m]
    warm = run_once(work / "warm", modes[0])  # caches: converted GGUF directory, compiled kernels
    rows = [run_once(work / m, m) for m in modes]
    rows += [run_once(work / f"variant{i}", modes[0], tuple(v.split())) for i, v in enumerate(args.variant)]
    device = torch.cuda.get_device_name()
    payload = {"device": device, "torch": torch.__version__, "warm_up_run": warm, "runs": rows,
               "command": "qlora finetune --backend cupy --cuda-graphs MODE"}  # fmt: skip
    path = save(f"finetune_gpu_{device.replace(' ', '_')}", payload)
    print(f"{'cuda-graphs':>11} {'wall s':>7} {'train s':>8} {'ms/step':>8} {'EM before':>9} {'EM after':>9}  flags")
    for r in [warm, *rows]:
        print(f"{r['cuda_graphs']:>11} {r['wall_s']:7.1f} {r['train_seconds']:8.1f} {r['ms_per_step_median']:8.1f} "
              f"{r['exact_match_before']:9.3f} {r['exact_match_after']:9.3f}  {r['flags']}")  # fmt: skip
    print(f"saved {path}", file=sys.stderr)
    os.makedirs(work, exist_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
