// cross_entropy.cu — a causal LM's token cross-entropy straight from its 16-bit logits, one CTA per row: the
// float32 copy of tokens x vocab that transformers' loss makes (logits.float()) is never written.
//
// What (T: the logits' dtype; all arithmetic float32, --fmad=false), for a row z of V logits and its target t:
//   (m, s)   m = max_j z_j,  s = sum_j exp(z_j - m)   one read of the row: per-thread online pairs, merged by a
//                                                      warp and then a CTA tree in a fixed order
//   lse      = m + log(s)
//   loss     = lse - z_t                               0 when t == ignore_index (the row is not scored); NaN when t
//                                                      is outside [0, V) (torch raises; a kernel cannot, capturable)
// Backward, with g = dL/dloss of the row (float32):
//   dz_j     = T(g * (exp(z_j - lse) - [j == t]))      0 in an ignored row
// Merging two pairs: (m, s) + (m', s') = (max, s e^(m - max) + s' e^(m' - max)); xor shuffles give both partners
// the same sum (IEEE addition commutes), so every lane ends with the same pair.  torch's cross_entropy on
// logits.float() computes the same quantities (log_softmax, then nll) in another summation order: equal to within
// float32 rounding of lse, not bit for bit (tests/torchlib/test_fused_decoder_gpu.py derives the bound).
// Kernels: cross_entropy_fwd_v1<T> (loss and lse per row), cross_entropy_bwd_v1<T> (dz).  Launch:
// backends/cupy_backend/decoder.py (grid = rows, CE_THREADS threads).  Build: -std=c++17 --fmad=false.
#include "common.cuh"

#define CE_THREADS 256
#define NEG_INF __int_as_float(0xff800000)
#define QNAN __int_as_float(0x7fc00000)

__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
    if (m2 > m) {
        s = s * expf(m - m2) + s2;
        m = m2;
    } else if (m2 != NEG_INF) {
        s = s + s2 * expf(m2 - m);
    }
}

template <typename T>
__global__ void __launch_bounds__(CE_THREADS) cross_entropy_fwd_v1(const T* __restrict__ z, const i64* __restrict__ target,
                                                                   float* __restrict__ loss, float* __restrict__ lse,
                                                                   int V, i64 ignore_index) {
    __shared__ float sm[CE_THREADS / 32 + 1], ss[CE_THREADS / 32 + 1];
    const T* zr = z + (i64)blockIdx.x * V;
    float m = NEG_INF, s = 0.0f;
    for (int j = threadIdx.x; j < V; j += CE_THREADS) merge(m, s, to_f32(zr[j]), 1.0f);
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        merge(m, s, m2, s2);
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) {
        sm[warp] = m;
        ss[warp] = s;
    }
    __syncthreads();
    if (warp == 0) {
        m = lane < CE_THREADS / 32 ? sm[lane] : NEG_INF;
        s = lane < CE_THREADS / 32 ? ss[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) {
            const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
            merge(m, s, m2, s2);
        }
        if (lane == 0) {
            const float l = m + logf(s);
            const i64 t = target[blockIdx.x];
            lse[blockIdx.x] = l;
            loss[blockIdx.x] = t == ignore_index ? 0.0f : (t < 0 || t >= V) ? QNAN : l - to_f32(zr[t]);
        }
    }
}

template <typename T>
__global__ void __launch_bounds__(CE_THREADS) cross_entropy_bwd_v1(const T* __restrict__ z, const i64* __restrict__ target,
                                                                   const float* __restrict__ lse,
                                                                   const float* __restrict__ g, T* __restrict__ dz,
                                                                   int V, i64 ignore_index) {
    const i64 base = (i64)blockIdx.x * V;
    const i64 t = target[blockIdx.x];
    const float gr = t == ignore_index ? 0.0f : g[blockIdx.x], l = lse[blockIdx.x];
    for (int j = threadIdx.x; j < V; j += CE_THREADS) {
        const float p = expf(to_f32(z[base + j]) - l);
        dz[base + j] = from_f32<T>(gr * (j == t ? p - 1.0f : p));
    }
}
