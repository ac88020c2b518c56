"""Shared benchmark plumbing: where results go, and what they are stamped with (device, commit, date)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def commit() -> str:
    """The commit being measured: $QLORA_COMMIT (set when the tree travels without .git), else git's HEAD."""
    if os.environ.get("QLORA_COMMIT"):
        return os.environ["QLORA_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except Exception:
        return "unknown"


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
