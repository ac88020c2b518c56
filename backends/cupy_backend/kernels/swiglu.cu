// swiglu.cu — the LLaMA MLP's gated activation h = silu(gate) * up, forward and both input gradients.
//
// What (T: the activations' dtype; arithmetic float32, --fmad=false; sigma(g) = 1 / (1 + exp(-g))):
//   h  = T(T(g * sigma(g)) * u)                    transformers: act_fn(gate) * up, each op rounded to T
//   a  = T(g * sigma(g)),  da = T(dh * u)           the rounded activation and its gradient (autograd's T products)
//   du = T(dh * a),        dg = T(da * sigma(g) * (1 + g * (1 - sigma(g))))     torch's silu_backward formula
// One thread per entry, grid-stride.  expf is within 2 ulp, torch's exp may differ in the last place: equal to
// within one unit of T's last place, not bit for bit (tests/torchlib/test_fused_decoder_gpu.py).
// Launch: backends/cupy_backend/decoder.py.  Build: -std=c++17 --fmad=false.
#include "common.cuh"

template <typename T>
__global__ void __launch_bounds__(256) swiglu_fwd_v1(const T* __restrict__ g, const T* __restrict__ u,
                                                     T* __restrict__ h, i64 n) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const float gv = to_f32(g[i]);
        const float a = to_f32(from_f32<T>(gv / (1.0f + expf(-gv))));
        h[i] = from_f32<T>(a * to_f32(u[i]));
    }
}

template <typename T>
__global__ void __launch_bounds__(256) swiglu_bwd_v1(const T* __restrict__ g, const T* __restrict__ u,
                                                     const T* __restrict__ dh, T* __restrict__ dg,
                                                     T* __restrict__ du, i64 n) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const float gv = to_f32(g[i]), d = to_f32(dh[i]);
        const float sg = 1.0f / (1.0f + expf(-gv));
        const float a = to_f32(from_f32<T>(gv / (1.0f + expf(-gv))));
        du[i] = from_f32<T>(d * a);
        const float da = to_f32(from_f32<T>(d * to_f32(u[i])));
        dg[i] = from_f32<T>(da * sg * (1.0f + gv * (1.0f - sg)));  // torch's order: (da sigma) (1 + g (1 - sigma))
    }
}
