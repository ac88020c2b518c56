// absmax_mean.cu — double quantization's offset in torch's CUDA reduction order: what bitsandbytes' absmax.mean()
// gives on this device, bit for bit.
//
// What (specs/double_quant.md DQ-1, DQ-5; reference: qlora_ref/double_quant.py torch_reduce_plan, torch_cuda_sum,
//   absmax_mean; torch: aten/src/ATen/native/cuda/Reduce.cuh setReduceConfig / ReduceOp, MeanOps):
//     plan (Python, qlora_ref.double_quant.torch_reduce_plan): vec = 4 if n > 128 else 1; W = min(last_pow2(n/vec), 512)
//           lanes; p = ceil(n / W); C = max(min(G, ceil(p/16)), ceil(p/256)) CTAs when p >= 256, G = SMs *
//           (max threads per SM / W) >= 1; else C = 1
//     thread g = c*W + t keeps 4 float32 chains a0..a3 (from 0.0, one __fadd_rn at a time, in order):
//           vec = 4: vector v = g + k*C*W (v < n/4) adds element 4v + i to a_i; then lanes t < n % 4 of CTA 0 add
//                    element 4(n/4) + t to a0
//           vec = 1: element g + m*C*W adds to a_(m % 4)
//           x_g = ((a0 + a1) + a2) + a3
//     P_c   = fold(x_cW .. x_cW+W-1)     fold: lane t adds lane t + h, h = W/2, ..., 1 (torch: shared memory down to the
//                                        warp, then shuffle-down with decreasing offsets — the same halving tree)
//     S     = P_0 (C = 1), else fold(Q_0 .. Q_W-1) with Q_t = ((0 + P_t) + P_t+W) + ...   (torch's last CTA)
//     offset = S * (1.0f / (float)n)      float32 (torch's MeanOps::project, factor computed on the host)
// Kernels:
//   absmax_mean_partials_v1   grid C, block W (<= 512): the thread chains and one fold per CTA -> partial[c].
//                             Plain: scalar loads in torch's order (the order is the spec; nothing to gain from a v2
//                             for a 16 MB read at most).
//   absmax_mean_combine_v1    one CTA of W threads: Q_t, the fold, the product with 1/n -> out[0] (float32).
// Launch configs and validation: backends/cupy_backend/offset.py.  Build: build.OPTIONS (-std=c++17 --fmad=false,
// IEEE division, no ftz).  Checked against torch.mean and qlora_ref.double_quant.absmax_mean in
// tests/peers/test_gpu_offset.py.
#include "common.cuh"

// Lanes fold in halves inside one CTA of W threads (W a power of two <= 512); v holds the W lane values.
__device__ __forceinline__ float fold_lanes(float* v, int W) {
    const int t = threadIdx.x;
    for (int h = W / 2; h >= 1; h /= 2) {
        float mine = 0.0f;
        if (t < h) mine = __fadd_rn(v[t], v[t + h]);
        __syncthreads();
        if (t < h) v[t] = mine;
        __syncthreads();
    }
    return v[0];
}

__global__ void __launch_bounds__(512) absmax_mean_partials_v1(const float* __restrict__ absmax, i64 n, int vec,
                                                                 float* __restrict__ partial) {
    __shared__ float x[512];
    const int W = blockDim.x, t = threadIdx.x, c = blockIdx.x;
    const i64 g = (i64)c * W + t;
    const i64 stride = (i64)W * gridDim.x;  // C * W threads in all
    float a[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (vec == 4) {
        const i64 nvec = n / 4;
        for (i64 v = g; v < nvec; v += stride)
#pragma unroll
            for (int i = 0; i < 4; i++) a[i] = __fadd_rn(a[i], absmax[4 * v + i]);
        if (c == 0 && t < n % 4) a[0] = __fadd_rn(a[0], absmax[4 * nvec + t]);
    } else {
        i64 m = 0;
        for (i64 e = g; e < n; e += stride, m++) a[m % 4] = __fadd_rn(a[m % 4], absmax[e]);
    }
    x[t] = __fadd_rn(__fadd_rn(__fadd_rn(a[0], a[1]), a[2]), a[3]);
    __syncthreads();
    const float p = fold_lanes(x, W);
    if (t == 0) partial[c] = p;
}

__global__ void __launch_bounds__(512) absmax_mean_combine_v1(const float* __restrict__ partial, int C, i64 n,
                                                                float* __restrict__ out) {
    __shared__ float q[512];
    const int W = blockDim.x, t = threadIdx.x;
    float s = 0.0f;
    for (int j = t; j < C; j += W) s = __fadd_rn(s, partial[j]);
    q[t] = s;
    __syncthreads();
    const float sum = fold_lanes(q, W);
    if (t == 0) out[0] = __fmul_rn(sum, __fdiv_rn(1.0f, __ll2float_rn(n)));
}
