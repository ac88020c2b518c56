// rope.cu — rotary position embedding of the queries and the keys in one launch, forward and input gradient.
//
// What (T: the activations' dtype, cos and sin in T as well; arithmetic float32, --fmad=false; h = D / 2; for each
// (batch b, head, position s) row x of q or k and its c = cos[b, s], n = sin[b, s], first half index j < h):
//   forward, transformers' apply_rotary_pos_emb: x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1),
//     o[j]     = T(T(x[j] * c[j])         + T(-x[j + h] * n[j]))
//     o[j + h] = T(T(x[j + h] * c[j + h]) + T(x[j] * n[j + h]))
//   backward (dy the output's gradient), what autograd computes from that graph: T(dy * cos) for the product, the
//   slices of T(dy * sin) through cat and neg, added to it in T:
//     dx[j]     = T(T(dy[j] * c[j])         + T(dy[j + h] * n[j + h]))
//     dx[j + h] = T(T(dy[j + h] * c[j + h]) + T(-dy[j] * n[j]))
// Each product and each sum is one float32 operation rounded to T, as torch's T kernels round them: the same values
// as transformers' eager ops (T(-a b) = -T(a b) exactly); a zero's sign in the gradient may differ (autograd adds
// the slices' zero padding).  Kernel:
//   rope_v1<T>   one thread per (row, 16-byte vector of the first half): Vec16<T>::N entries of x[j..] and x[j+h..]
//                (h % N == 0, rows and pointers 16-byte aligned, the last dimension contiguous: decoder.py checks).
// Layout: q (B, Hq, S, D) and k (B, Hk, S, D) with any strides for b, head, s (the transposed projections as they
// come), outputs likewise; cos, sin (Bc, S, D) with Bc = 1 (batch stride 0) or B.  Threads run head-major within a
// position so a warp reads whole rows of the (B, S, H, D) projection.
// Launch: backends/cupy_backend/decoder.py.  Build: -std=c++17 --fmad=false.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void rope_row(const T* __restrict__ x, T* __restrict__ o, const T* __restrict__ c,
                                         const T* __restrict__ n, int j, int h, int backward) {
    constexpr int N = Vec16<T>::N;
    float x1[N], x2[N], c1[N], c2[N], n1[N], n2[N], o1[N], o2[N];
    Vec16<T>::unpack(*reinterpret_cast<const uint4*>(x + j), x1);
    Vec16<T>::unpack(*reinterpret_cast<const uint4*>(x + j + h), x2);
    Vec16<T>::unpack(*reinterpret_cast<const uint4*>(c + j), c1);
    Vec16<T>::unpack(*reinterpret_cast<const uint4*>(c + j + h), c2);
    Vec16<T>::unpack(*reinterpret_cast<const uint4*>(n + j), n1);
    Vec16<T>::unpack(*reinterpret_cast<const uint4*>(n + j + h), n2);
#pragma unroll
    for (int k = 0; k < N; k++) {
        const float a1 = to_f32(from_f32<T>(x1[k] * c1[k])), a2 = to_f32(from_f32<T>(x2[k] * c2[k]));
        const float b1 = backward ? to_f32(from_f32<T>(x2[k] * n2[k])) : -to_f32(from_f32<T>(x2[k] * n1[k]));
        const float b2 = backward ? -to_f32(from_f32<T>(x1[k] * n1[k])) : to_f32(from_f32<T>(x1[k] * n2[k]));
        o1[k] = a1 + b1;
        o2[k] = a2 + b2;
    }
    *reinterpret_cast<uint4*>(o + j) = Vec16<T>::pack(o1);
    *reinterpret_cast<uint4*>(o + j + h) = Vec16<T>::pack(o2);
}

template <typename T>
__global__ void __launch_bounds__(256) rope_v1(const T* __restrict__ q, const T* __restrict__ k,
                                               const T* __restrict__ cos, const T* __restrict__ sin,
                                               T* __restrict__ qo, T* __restrict__ ko, int B, int S, int Hq, int Hk,
                                               int D, i64 qb, i64 qh, i64 qs, i64 kb, i64 kh, i64 ks, i64 qob,
                                               i64 qoh, i64 qos, i64 kob, i64 koh, i64 kos, i64 cos_b, i64 cos_s,
                                               int backward) {  // element strides of (b, head, s) per operand
    constexpr int N = Vec16<T>::N;
    const int h = D / 2, per_row = h / N, heads = Hq + Hk;
    const i64 total = (i64)B * S * heads * per_row;
    for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += (i64)gridDim.x * blockDim.x) {
        const int j = (int)(t % per_row) * N;
        const i64 row = t / per_row;
        const int head = (int)(row % heads);
        const i64 bs = row / heads;
        const int s = (int)(bs % S), b = (int)(bs / S);
        const T* c = cos + b * cos_b + s * cos_s;
        const T* n = sin + b * cos_b + s * cos_s;
        if (head < Hq) {
            rope_row<T>(q + b * qb + head * qh + s * qs, qo + b * qob + head * qoh + s * qos, c, n, j, h, backward);
        } else {
            const int hk = head - Hq;
            rope_row<T>(k + b * kb + hk * kh + s * ks, ko + b * kob + hk * koh + s * kos, c, n, j, h, backward);
        }
    }
}
