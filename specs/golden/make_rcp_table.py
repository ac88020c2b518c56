"""Probe: which float32 reciprocal does bitsandbytes' CUDA build compute for 1.0f/absmax?

bitsandbytes compiles with --use_fast_math, so `1.0f / x` becomes the approximate reciprocal (rcp.approx.ftz.f32).
This script evaluates it on every float32 significand (x in [1, 2)) and a few other exponents, compares it with the
correctly rounded 1/x, and saves the significands where they differ.  Run on a GPU; writes $OUT/rcp_table.npz.
"""

import os
import sys

import numpy as np

SRC = r"""
extern "C" __global__ void rcp_fast(const float* x, float* y, long long n) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i < n) y[i] = 1.0f / x[i];
}
extern "C" __global__ void rcp_ptx(const float* x, float* y, long long n) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i < n) { float r; asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x[i])); y[i] = r; }
}
extern "C" __global__ void rcp_exact(const float* x, float* y, long long n) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i < n) y[i] = __frcp_rn(x[i]);
}
"""


def probe() -> None:
    """Evaluate the three reciprocals on the GPU and save the differing significands."""
    import cupy as cp

    fast = cp.RawModule(code=SRC, options=("--use_fast_math",))
    plain = cp.RawModule(code=SRC)
    mant = cp.arange(1 << 23, dtype=cp.uint32)
    out = {}
    for exp, name in ((127, "e0"), (127 - 5, "em5"), (127 + 7, "ep7"), (127 - 30, "em30")):
        x = ((cp.uint32(exp) << 23) | mant).view(cp.float32)
        n = x.size
        res = {}
        for kname, mod in (("rcp_fast", fast), ("rcp_ptx", plain), ("rcp_exact", plain)):
            y = cp.empty_like(x)
            mod.get_function(kname)(((n + 255) // 256,), (256,), (x, y, cp.int64(n)))
            res[kname] = y
        same = bool(cp.all(res["rcp_fast"].view(cp.uint32) == res["rcp_ptx"].view(cp.uint32)))
        d = res["rcp_fast"].view(cp.int32).astype(cp.int64) - res["rcp_exact"].view(cp.int32).astype(cp.int64)
        up = cp.nonzero(d == 1)[0].astype(cp.uint32)
        down = cp.nonzero(d == -1)[0].astype(cp.uint32)
        other = int(cp.count_nonzero((d != 0) & (d != 1) & (d != -1)))
        print(name, "fast==ptx", same, "up", up.size, "down", down.size, "other", other)
        out[f"{name}_up"] = cp.asnumpy(up)
        out[f"{name}_down"] = cp.asnumpy(down)
    np.savez_compressed(os.path.join(os.environ.get("OUT", "."), "rcp_table.npz"), **out)
    print(cp.cuda.runtime.getDeviceProperties(0)["name"])


def write_table(npz_path: str, out_path: str) -> None:
    """Turn the probe's output into qlora_ref/data/rcp_approx_ftz_f32.zlib.

    Format: for each significand m = 0 .. 2^23-1 two bits [up, down] (np.packbits order), zlib level 9.
    up: rcp.approx(1.m) is one ulp above the correctly rounded 1/1.m; down: one ulp below.
    """
    import zlib

    z = np.load(npz_path)
    flags = np.zeros((1 << 23, 2), bool)
    flags[z["e0_up"], 0] = True
    flags[z["e0_down"], 1] = True
    with open(out_path, "wb") as f:
        f.write(zlib.compress(np.packbits(flags.ravel()).tobytes(), 9))


if __name__ == "__main__":
    # on the GPU:  python specs/golden/make_rcp_table.py            -> $OUT/rcp_table.npz
    # here:        python specs/golden/make_rcp_table.py write NPZ  -> qlora_ref/data/rcp_approx_ftz_f32.zlib
    if len(sys.argv) == 3 and sys.argv[1] == "write":
        write_table(
            sys.argv[2], os.path.join(os.path.dirname(__file__), "../../qlora_ref/data/rcp_approx_ftz_f32.zlib")
        )
    else:
        probe()
