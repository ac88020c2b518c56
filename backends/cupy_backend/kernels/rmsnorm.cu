// rmsnorm.cu — the LLaMA family's RMSNorm (transformers' LlamaRMSNorm), forward and input gradient, one CTA per row.
//
// What (T: the activations' dtype, the weight w in T as well; all arithmetic float32, --fmad=false):
//   r_row = 1 / sqrt(sum_j x_j^2 / H + eps)       the sum: strided per-thread partials, then a warp and a CTA tree
//   y_j   = T(w_j * T(x_j * r))                  transformers: w * (x * r).to(T), the product rounded to T twice
// Backward, w frozen (QLoRA trains only the adapters), from y's graph:
//   g_j   = T(dy_j * w_j)                         the gradient of the rounded (x r), as autograd's bf16 product gives it
//   dx_j  = T(g_j * r - x_j * c),   c = r^3 * sum_k (g_k x_k) / H
// The same quantities transformers' eager ops compute, in another summation order and with a correctly rounded
// 1/sqrt (two roundings) where torch uses its rsqrt: equal to within a few units of T's last place, not bit for bit
// (tests/torchlib/test_fused_decoder_gpu.py derives the bound).  Kernels:
//   rmsnorm_fwd_v1<T>   y and r (float32, one per row: the backward's only saved value besides x)
//   rmsnorm_bwd_v1<T>   dx from dy, x, w, r
// Launch: backends/cupy_backend/decoder.py (grid = rows, RMS_THREADS threads).  Build: -std=c++17 --fmad=false.
#include "common.cuh"

#define RMS_THREADS 256

__device__ __forceinline__ float cta_sum(float v, float* shared) {  // every thread gets the CTA's sum (fixed order)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < RMS_THREADS / 32 ? shared[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) shared[RMS_THREADS / 32] = v;
    }
    __syncthreads();
    return shared[RMS_THREADS / 32];
}

template <typename T>
__global__ void __launch_bounds__(RMS_THREADS) rmsnorm_fwd_v1(const T* __restrict__ x, const T* __restrict__ w,
                                                              T* __restrict__ y, float* __restrict__ rstd, int H,
                                                              float eps) {
    __shared__ float shared[RMS_THREADS / 32 + 1];
    const T* xr = x + (i64)blockIdx.x * H;
    T* yr = y + (i64)blockIdx.x * H;
    float s = 0.0f;
    for (int j = threadIdx.x; j < H; j += RMS_THREADS) {
        const float v = to_f32(xr[j]);
        s += v * v;
    }
    s = cta_sum(s, shared);
    const float r = 1.0f / sqrtf(s / (float)H + eps);
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
    for (int j = threadIdx.x; j < H; j += RMS_THREADS) {
        const float n = to_f32(from_f32<T>(to_f32(xr[j]) * r));
        yr[j] = from_f32<T>(to_f32(w[j]) * n);
    }
}

template <typename T>
__global__ void __launch_bounds__(RMS_THREADS) rmsnorm_bwd_v1(const T* __restrict__ dy, const T* __restrict__ x,
                                                              const T* __restrict__ w, const float* __restrict__ rstd,
                                                              T* __restrict__ dx, int H) {
    __shared__ float shared[RMS_THREADS / 32 + 1];
    const i64 base = (i64)blockIdx.x * H;
    const float r = rstd[blockIdx.x];
    float s = 0.0f;
    for (int j = threadIdx.x; j < H; j += RMS_THREADS) {
        const float g = to_f32(from_f32<T>(to_f32(dy[base + j]) * to_f32(w[j])));
        s += g * to_f32(x[base + j]);
    }
    s = cta_sum(s, shared);
    const float c = r * r * r * s / (float)H;
    for (int j = threadIdx.x; j < H; j += RMS_THREADS) {
        const float g = to_f32(from_f32<T>(to_f32(dy[base + j]) * to_f32(w[j])));
        dx[base + j] = from_f32<T>(g * r - to_f32(x[base + j]) * c);
    }
}
