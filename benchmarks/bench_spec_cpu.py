"""The CPU reference vs bitsandbytes' CPU backend: NF4 + double quantization of a 4096x4096 float32 matrix.

Target (issue: the executable spec): at most 2x bitsandbytes' time in the same process, and no more than a few copies
of the input allocated (peak traced by tracemalloc, which sees NumPy's buffers).  Prints a table, saves
benchmarks/results/spec_cpu.json.  Not a test: timings are never asserted.

    python benchmarks/bench_spec_cpu.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc

import numpy as np

import qlora_ref as Q
from benchmarks.common import cpu_name, save


def _median_seconds(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    args = parser.parse_args()

    import bitsandbytes.functional as F
    import torch

    x = (np.random.default_rng(0).standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    xt = torch.from_numpy(x)
    ours = _median_seconds(lambda: Q.quantize_4bit(x), args.repeat)
    theirs = _median_seconds(
        lambda: F.quantize_4bit(xt, blocksize=64, compress_statistics=True, quant_type="nf4"), args.repeat
    )
    tracemalloc.start()
    Q.quantize_4bit(x)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    copies = peak / x.nbytes
    rows = [
        ("qlora_ref.quantize_4bit (nf4, dq)", ours),
        ("bitsandbytes CPU quantize_4bit", theirs),
    ]
    print(f"{'op':40s} {'median s':>10s}")
    for name, t in rows:
        print(f"{name:40s} {t:10.4f}")
    print(
        f"ratio ours/bnb: {ours / theirs:.2f}x (target <= 2x); "
        f"peak allocation {copies:.2f} x input ({peak / 2**20:.0f} MiB)"
    )
    path = save(
        "spec_cpu",
        {
            "device": cpu_name(),
            "torch_threads": torch.get_num_threads(),
            "shape": [args.rows, args.cols],
            "ours_s": ours,
            "bnb_cpu_s": theirs,
            "ratio": ours / theirs,
            "peak_alloc_bytes": peak,
            "peak_alloc_input_copies": copies,
        },
    )
    print(f"saved {path}")


if __name__ == "__main__":
    main()
