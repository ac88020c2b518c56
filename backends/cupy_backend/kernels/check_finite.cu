// check_finite.cu — count the NaN/Inf values of a float32/fp16/bf16 array and find the first one.
//
// What (specs/blockwise.md BW-9; reference: qlora_ref/checks.py check_finite):
//   status[0] += #{i : !isfinite(x[i])},  status[1] = ~min{i : !isfinite(x[i])}  (zeroed first; atomicMax of ~i)
//   Python raises qlora_ref.NonFiniteError with the spec's message when status[0] > 0.
// Kernels:
//   check_finite_v1<T>   naive: one thread per value, an atomic per non-finite value.  Second oracle.
//   check_finite_v2<T>   16-byte loads, CH per thread in flight, per-thread counts; atomics only where something is
//                        non-finite (the common all-finite case writes nothing).
// Launch configs: backends/cupy_backend/launch.py.  Build: -std=c++17 --fmad=false.
#include "common.cuh"

template <typename T>
__global__ void check_finite_v1(const T* __restrict__ x, i64 n, u64* __restrict__ status) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    if (!isfinite(to_f32(x[i]))) {
        atomicAdd(&status[0], 1ull);
        atomicMax(&status[1], ~(u64)i);
    }
}

template <typename T, int CH>
__global__ void __launch_bounds__(256) check_finite_v2(const T* __restrict__ x, i64 n, int vec_ok,
                                                       u64* __restrict__ status) {
    constexpr int V = Vec16<T>::N;
    const i64 nvec = vec_ok ? n / V : 0;  // whole 16-byte vectors
    const i64 v0 = (i64)blockIdx.x * (256 * CH) + threadIdx.x;
    uint4 q[CH];
#pragma unroll
    for (int k = 0; k < CH; k++) {
        const i64 c = v0 + (i64)k * 256;
        if (c < nvec) q[k] = __ldg(reinterpret_cast<const uint4*>(x) + c);
    }
    u64 bad = 0, first = ~0ull;
#pragma unroll
    for (int k = 0; k < CH; k++) {
        const i64 c = v0 + (i64)k * 256;
        if (c < nvec) {
            float v[V];
            Vec16<T>::unpack(q[k], v);
#pragma unroll
            for (int j = 0; j < V; j++)
                if (!isfinite(v[j])) { bad++; first = min(first, (u64)(c * V + j)); }
        } else if (c == nvec) {  // the scalar tail (everything, when the pointer is not 16-byte aligned)
            for (i64 i = c * V; i < n; i++)
                if (!isfinite(to_f32(x[i]))) { bad++; first = min(first, (u64)i); }
        }
    }
    if (bad) {
        atomicAdd(&status[0], bad);
        atomicMax(&status[1], ~first);  // status[1] = ~(min first index)
    }
}
