"""Run the GPU tests on a CUDA machine and write tests/GPU_REPORT.json; also the hash that CI checks it against.

CI has no GPU, so the GPU tests' result is committed: the report names the device, date, commit and test counts and
a sha256 over the sources it validated (`SOURCES`: everything under backends/cupy_backend/ that is *.cu, *.cuh or
*.py, plus the files listed in EXTRA_SOURCES).  tests/test_gpu_report.py recomputes the hash in CI and fails when
any of those files changed since the report was made: rerun this script on a GPU and commit the new report.

    QLORA_COMMIT=$(git rev-parse HEAD) python tests/gpu_report.py [--out tests/GPU_REPORT.json] [-- extra pytest args]

The device copy of the repository may have no .git, so the commit comes from QLORA_COMMIT (else git, else
"unknown").  Exit status: pytest's.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import commit  # noqa: E402

GPU_DIR = "backends/cupy_backend"
GPU_SUFFIXES = (".cu", ".cuh", ".py")
# The spec the kernels must match and the tests that check them: a change to any of these needs a new GPU run.
EXTRA_SOURCES = (
    "backends/registry.py",
    "backends/protocol.py",
    "backends/bridge.py",
    "backends/adamw_state.py",
    "qlora_ref/blockwise.py",
    "qlora_ref/codebooks.py",
    "qlora_ref/double_quant.py",
    "qlora_ref/fastmath.py",
    "qlora_ref/packing.py",
    "qlora_ref/quantized.py",
    "qlora_ref/adamw.py",
    "backends/torchlib/optim.py",
    "backends/torchlib/in_backward.py",
    "tests/torchlib/test_in_backward.py",
    "backends/torchlib/optim_checks.py",
    "backends/torchlib/clip.py",
    "backends/torchlib/layer.py",
    "backends/torchlib/dtypes.py",
    "backends/torchlib/scratch.py",
    "backends/torchlib/functional.py",
    "backends/torchlib/ops.py",
    "backends/torchlib/graph.py",
    "backends/torchlib/masks.py",
    "backends/torchlib/fuse.py",
    "tests/backends/test_backend_parity.py",
    "tests/peers/test_gpu_bnb.py",
    "tests/torchlib/test_paged_optim.py",
    "tests/torchlib/test_layer.py",
    "tests/torchlib/test_gpu_train.py",
    "tests/torchlib/test_compile.py",
    "tests/torchlib/test_graph.py",
    "tests/backends/test_bound_ops.py",
    "tests/peers/test_gpu_offset.py",
    "backends/torchlib/dropout.py",
    "backends/torchlib/decode.py",
    "backends/torchlib/dora.py",
    "backends/torchlib/loftq.py",
    "backends/app/gpu_step.py",
    "tests/torchlib/test_gpu_step.py",
    "tests/torchlib/test_decode.py",
    "tests/torchlib/test_dora_loftq_gpu.py",
    "tests/backends/test_matvec_gpu.py",
    "tests/torchlib/test_layer_decode.py",
    "backends/torchlib/prepare.py",
    "tests/torchlib/test_fused_decoder_gpu.py",
    "qlora_ref/lora.py",
)
REPORT = REPO / "tests" / "GPU_REPORT.json"


def gpu_sources(extra=EXTRA_SOURCES) -> list[str]:
    """Repo-relative paths covered by the hash, sorted: every *.cu/*.cuh/*.py under backends/cupy_backend/ + extra."""
    found = {
        p.relative_to(REPO).as_posix()
        for p in (REPO / GPU_DIR).rglob("*")
        if p.is_file() and p.suffix in GPU_SUFFIXES and "__pycache__" not in p.parts
    }
    return sorted(found | set(extra))


def sources_sha256(paths: list[str]) -> str:
    """sha256 over (path, NUL, bytes, NUL) of each file in order; a missing file hashes as '<missing>'."""
    h = hashlib.sha256()
    for rel in paths:
        p = REPO / rel
        h.update(rel.encode() + b"\0")
        h.update(p.read_bytes() if p.is_file() else b"<missing>")
        h.update(b"\0")
    return h.hexdigest()


def _device() -> dict:
    info = {}
    try:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(0)
        info["device"] = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        info["cupy"] = cupy.__version__
        info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
        info["driver"] = cupy.cuda.runtime.driverGetVersion()
    except Exception as exc:  # no GPU: the report says so and the counts will show skips
        info["device"] = f"none ({exc.__class__.__name__})"
    for name in ("torch", "bitsandbytes", "numpy"):
        try:
            info[name] = __import__(name).__version__
        except Exception:
            info[name] = None
    return info


def junit_summary(path: Path) -> tuple[dict, list[dict]]:
    """(counts of tests / failures / errors / skipped, each skipped test as {"test", "reason"}) from JUnit XML."""
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    skipped = [
        {"test": f"{case.get('classname', '')}::{case.get('name', '')}", "reason": skip.get("message", "")}
        for case in suite.iter("testcase")
        for skip in case.findall("skipped")
    ]
    return counts, skipped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPORT)
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = ap.parse_args(argv)
    sources = gpu_sources()
    digest_before = sources_sha256(sources)
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "--hypothesis-profile=gpu",
            "-p",
            "no:cacheprovider",
            "-q",
            f"--junitxml={junit}",
            *args.pytest_args,
        ]
        rc = subprocess.call(cmd, cwd=REPO)
        counts, skipped_tests = junit_summary(junit)
    if sources_sha256(sources) != digest_before:
        print("sources changed while the tests ran; not writing a report", file=sys.stderr)
        return 1
    report = {
        **_device(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "command": " ".join(["pytest", "-m", "gpu", "--hypothesis-profile=gpu", *args.pytest_args]),
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed": counts["failures"] + counts["errors"],
        "skipped": counts["skipped"],
        "skipped_tests": skipped_tests,
        "sources": sources,
        "sources_sha256": digest_before,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("device", "passed", "failed", "skipped", "sources_sha256")}))
    return rc


if __name__ == "__main__":
    sys.exit(main())
