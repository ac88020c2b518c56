// dropout.cu — the counter-based dropout keep mask, drawn from a seed held in device memory.
//
// What (specs/lora.md LORA-8; reference: qlora_ref/lora.py dropout_keep_counter):
//   key     = seed[0] + salt * 0xD1B54A32D192ED03                  (mod 2^64)
//   z_i     = mix(key + (i + 1) * 0x9E3779B97F4A7C15)              splitmix64's i-th output
//   keep[i] = (z_i >> 11) >= t,   t = floor(p * 2^53)              computed on the host
// The seed is read from device memory, not passed by value, so a CUDA graph that captured this launch draws a new
// mask each replay once the host has written the next seed; the backward and a checkpoint recompute redraw the
// forward's mask from the same (seed, salt).  Integer arithmetic only: the bits do not depend on the launch shape.
// Kernels:
//   dropout_keep_counter_v1   one thread per entry, grid-stride; keep written as one byte (torch.bool).
// Launch config: backends/cupy_backend/launch.py.  Build: -std=c++17 --fmad=false.
#include "common.cuh"

__device__ __forceinline__ u64 splitmix64_mix(u64 z) {
    z ^= z >> 30;
    z *= 0xBF58476D1CE4E5B9ull;
    z ^= z >> 27;
    z *= 0x94D049BB133111EBull;
    z ^= z >> 31;
    return z;
}

extern "C" __global__ void __launch_bounds__(256) dropout_keep_counter_v1(const i64* __restrict__ seed, u64 salt,
                                                                          u64 t, u8* __restrict__ keep, i64 n) {
    const u64 key = (u64)seed[0] + salt * 0xD1B54A32D192ED03ull;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const u64 z = splitmix64_mix(key + (u64)(i + 1) * 0x9E3779B97F4A7C15ull);
        keep[i] = (z >> 11) >= t ? 1 : 0;
    }
}

// LORA-8's mask applied where it is used, never stored (issue 11: one launch instead of the mask, its cast, its
// scaling and the product).  k_i = keep[i] ? s : 0, s = the noise value keep / (1 - p) as the LoRA dtype holds it
// (exact in float32, from the host), the same product torch computes from a materialised noise tensor:
//   dropout_apply_v1<Tx, Ty>   y[i]   = Ty(float(Ty(x[i])) * k_i)                 drop(x) in the LoRA dtype Ty
//   dropout_add_v1<Ta, Td>     acc[i] = Ta(float(acc[i]) + float(Td(float(d[i]) * k_i)))   acc += drop'(d), d in Td
// Each is torch's op sequence entry by entry (the cast, the product rounded to the LoRA dtype, the sum rounded to
// acc's dtype), so the bits equal the unfused path's (tests/backends/test_dropout_fused_gpu.py).
__device__ __forceinline__ bool keep_at(u64 key, u64 t, i64 i) {
    return (splitmix64_mix(key + (u64)(i + 1) * 0x9E3779B97F4A7C15ull) >> 11) >= t;
}

template <typename Tx, typename Ty>
__global__ void __launch_bounds__(256) dropout_apply_v1(const i64* __restrict__ seed, u64 salt, u64 t, float s,
                                                        const Tx* __restrict__ x, Ty* __restrict__ y, i64 n) {
    const u64 key = (u64)seed[0] + salt * 0xD1B54A32D192ED03ull;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const float xv = to_f32(from_f32<Ty>(to_f32(x[i])));
        y[i] = from_f32<Ty>(xv * (keep_at(key, t, i) ? s : 0.0f));
    }
}

template <typename Ta, typename Td>
__global__ void __launch_bounds__(256) dropout_add_v1(const i64* __restrict__ seed, u64 salt, u64 t, float s,
                                                      Ta* __restrict__ acc, const Td* __restrict__ d, i64 n) {
    const u64 key = (u64)seed[0] + salt * 0xD1B54A32D192ED03ull;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const float dv = to_f32(from_f32<Td>(to_f32(d[i]) * (keep_at(key, t, i) ? s : 0.0f)));
        acc[i] = from_f32<Ta>(to_f32(acc[i]) + dv);
    }
}
