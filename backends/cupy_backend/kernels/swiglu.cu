// swiglu.cu — the LLaMA MLP's gated activation h = silu(gate) * up, forward and both input gradients.
//
// What (T: the activations' dtype; arithmetic float32, --fmad=false; sigma(g) = 1 / (1 + exp(-g))):
//   h  = T(T(g * sigma(g)) * u)                    transformers: act_fn(gate) * up, each op rounded to T
//   a  = T(g * sigma(g)),  da = T(dh * u)           the rounded activation and its gradient (autograd's T products)
//   du = T(dh * a),        dg = T(da * sigma(g) * (1 + g * (1 - sigma(g))))     torch's silu_backward formula
// expf is within 2 ulp, torch's exp may differ in the last place: equal to within one unit of T's last place, not
// bit for bit (tests/torchlib/test_fused_decoder_gpu.py).  Kernels (the same per-entry arithmetic, the same bits):
//   swiglu_{fwd,bwd}_v1<T>   one thread per entry, grid-stride (any alignment)
//   swiglu_{fwd,bwd}_v2<T>   one 16-byte vector (Vec16<T>::N entries) of every operand per thread, grid-stride; the
//                            n % N tail one entry per thread; every pointer 16-byte aligned (decoder.py checks)
// Launch: backends/cupy_backend/decoder.py.  Build: -std=c++17 --fmad=false.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ float swiglu_h(float gv, float uv) {
    const float a = to_f32(from_f32<T>(gv / (1.0f + expf(-gv))));
    return a * uv;
}

template <typename T>  // (dg, du) of one entry, both rounded to T by the caller's store
__device__ __forceinline__ void swiglu_d(float gv, float uv, float d, float& dg, float& du) {
    const float sg = 1.0f / (1.0f + expf(-gv));
    const float a = to_f32(from_f32<T>(gv / (1.0f + expf(-gv))));
    du = d * a;
    const float da = to_f32(from_f32<T>(d * uv));
    dg = da * sg * (1.0f + gv * (1.0f - sg));  // torch's order: (da sigma) (1 + g (1 - sigma))
}

template <typename T>
__global__ void __launch_bounds__(256) swiglu_fwd_v1(const T* __restrict__ g, const T* __restrict__ u,
                                                     T* __restrict__ h, i64 n) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        h[i] = from_f32<T>(swiglu_h<T>(to_f32(g[i]), to_f32(u[i])));
    }
}

template <typename T>
__global__ void __launch_bounds__(256) swiglu_bwd_v1(const T* __restrict__ g, const T* __restrict__ u,
                                                     const T* __restrict__ dh, T* __restrict__ dg,
                                                     T* __restrict__ du, i64 n) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        float a, b;
        swiglu_d<T>(to_f32(g[i]), to_f32(u[i]), to_f32(dh[i]), a, b);
        dg[i] = from_f32<T>(a);
        du[i] = from_f32<T>(b);
    }
}

template <typename T>
__global__ void __launch_bounds__(256) swiglu_fwd_v2(const T* __restrict__ g, const T* __restrict__ u,
                                                     T* __restrict__ h, i64 n) {
    constexpr int N = Vec16<T>::N;
    const i64 nv = n / N, stride = (i64)gridDim.x * blockDim.x, tid = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    for (i64 i = tid; i < nv; i += stride) {
        float gv[N], uv[N], hv[N];
        Vec16<T>::unpack(reinterpret_cast<const uint4*>(g)[i], gv);
        Vec16<T>::unpack(reinterpret_cast<const uint4*>(u)[i], uv);
#pragma unroll
        for (int k = 0; k < N; k++) hv[k] = swiglu_h<T>(gv[k], uv[k]);
        reinterpret_cast<uint4*>(h)[i] = Vec16<T>::pack(hv);
    }
    for (i64 i = nv * N + tid; i < n; i += stride) h[i] = from_f32<T>(swiglu_h<T>(to_f32(g[i]), to_f32(u[i])));
}

template <typename T>
__global__ void __launch_bounds__(256) swiglu_bwd_v2(const T* __restrict__ g, const T* __restrict__ u,
                                                     const T* __restrict__ dh, T* __restrict__ dg,
                                                     T* __restrict__ du, i64 n) {
    constexpr int N = Vec16<T>::N;
    const i64 nv = n / N, stride = (i64)gridDim.x * blockDim.x, tid = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    for (i64 i = tid; i < nv; i += stride) {
        float gv[N], uv[N], dv[N], a[N], b[N];
        Vec16<T>::unpack(reinterpret_cast<const uint4*>(g)[i], gv);
        Vec16<T>::unpack(reinterpret_cast<const uint4*>(u)[i], uv);
        Vec16<T>::unpack(reinterpret_cast<const uint4*>(dh)[i], dv);
#pragma unroll
        for (int k = 0; k < N; k++) swiglu_d<T>(gv[k], uv[k], dv[k], a[k], b[k]);
        reinterpret_cast<uint4*>(dg)[i] = Vec16<T>::pack(a);
        reinterpret_cast<uint4*>(du)[i] = Vec16<T>::pack(b);
    }
    for (i64 i = nv * N + tid; i < n; i += stride) {
        float a, b;
        swiglu_d<T>(to_f32(g[i]), to_f32(u[i]), to_f32(dh[i]), a, b);
        dg[i] = from_f32<T>(a);
        du[i] = from_f32<T>(b);
    }
}
