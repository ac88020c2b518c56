"""Shared benchmark plumbing: where results go, and what they are stamped with (device, commit, date)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def commit() -> str:
    """The commit being measured: $QLORA_COMMIT (set when the tree travels without .git), else git's HEAD."""
    if os.environ.get("QLORA_COMMIT"):
        return os.environ["QLORA_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    # A tree that differs from HEAD (a device copy travels beside a stale .git) is not HEAD: say so.
    return out.stdout.strip() + ("+dirty" if dirty else "")


def cuda_median_ms(step, *, warmup: int, reps: int, per: int = 1) -> float:
    """Median milliseconds of ``step()`` by CUDA events after ``warmup`` untimed calls, divided by ``per`` (the calls
    one ``step`` makes, e.g. a graph replay of several)."""
    import torch

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / per)
    return statistics.median(times)


def package_versions(names) -> dict[str, str]:
    """{name: version} for each importable package, "unavailable (Error)" for one that does not import."""
    out = {}
    for name in names:
        try:
            out[name] = __import__(name).__version__
        except Exception as e:
            out[name] = f"unavailable ({type(e).__name__})"
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()}"


def save(name: str, payload: dict) -> Path:
    """Write benchmarks/results/<name>.json with the stamp fields added; return the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path
