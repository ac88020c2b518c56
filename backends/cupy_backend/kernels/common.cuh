// common.cuh — helpers shared by the qlora-ref kernels (included by every kernels/*.cu file).
//
// Rules every kernel here follows (specs/blockwise.md, STYLE.md habit 5):
//   * float32 arithmetic one operation at a time, each rounded to nearest even (__fmul_rn / __fadd_rn / __fdiv_rn),
//     and the module is compiled with --fmad=false so no multiply-add is ever contracted;
//   * where the spec reproduces bitsandbytes' --use_fast_math build (qlora_ref/fastmath.py, BW-3 / BW-8) the same PTX
//     instructions are written out explicitly: rcp.approx.ftz.f32 for 1/absmax and mul.rn.ftz.f32 for the products
//     that are flushed to zero; everything else keeps IEEE semantics (-ftz=false);
//   * conversions to the output dtype round once (__float2bfloat16_rn, __float2half_rn);
//   * a kernel's only check is its bounds guard: validation happens in Python (backends/cupy_backend/inputs.py, ops.py).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

typedef unsigned char u8;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

// --- exact widening of the input dtypes to float32 (BW-1) --------------------------------------------------------
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

// --- one rounding from float32 to the output dtype (BW-7) ---------------------------------------------------------
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Two float32 values -> two output values packed in 32 bits, `a` at the lower address (one rounding each).
template <typename T> __device__ __forceinline__ u32 pack2(float a, float b);
template <> __device__ __forceinline__ u32 pack2<__half>(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<u32*>(&h);
}
template <> __device__ __forceinline__ u32 pack2<__nv_bfloat16>(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<u32*>(&h);
}

// 16 bytes of T <-> float32 values (8 for the 16-bit types, 4 for float32); pack rounds each value once to T.
template <typename T> struct Vec16;
template <> struct Vec16<float> {
    static constexpr int N = 4;
    __device__ __forceinline__ static void unpack(uint4 q, float* v) {
        v[0] = __uint_as_float(q.x); v[1] = __uint_as_float(q.y); v[2] = __uint_as_float(q.z); v[3] = __uint_as_float(q.w);
    }
    __device__ __forceinline__ static uint4 pack(const float* v) {
        return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
    }
};
template <> struct Vec16<__half> {
    static constexpr int N = 8;
    __device__ __forceinline__ static void unpack(uint4 q, float* v) {
        const __half2* h = reinterpret_cast<const __half2*>(&q);
#pragma unroll
        for (int k = 0; k < 4; k++) { float2 f = __half22float2(h[k]); v[2 * k] = f.x; v[2 * k + 1] = f.y; }
    }
    __device__ __forceinline__ static uint4 pack(const float* v) {
        return make_uint4(pack2<__half>(v[0], v[1]), pack2<__half>(v[2], v[3]), pack2<__half>(v[4], v[5]),
                          pack2<__half>(v[6], v[7]));
    }
};
template <> struct Vec16<__nv_bfloat16> {
    static constexpr int N = 8;
    __device__ __forceinline__ static void unpack(uint4 q, float* v) {
        const u32 w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int k = 0; k < 4; k++) { v[2 * k] = __uint_as_float(w[k] << 16); v[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u); }
    }
    __device__ __forceinline__ static uint4 pack(const float* v) {
        return make_uint4(pack2<__nv_bfloat16>(v[0], v[1]), pack2<__nv_bfloat16>(v[2], v[3]),
                          pack2<__nv_bfloat16>(v[4], v[5]), pack2<__nv_bfloat16>(v[6], v[7]));
    }
};

// --- bitsandbytes' fast-math arithmetic, spelled out (qlora_ref/fastmath.py) ----------------------------------------
// BW-3: the hardware approximate reciprocal (within 1 ulp; depends on the significand only; 1/0 = inf).
__device__ __forceinline__ float rcp_approx_ftz(float x) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}
// BW-8: a product rounded to nearest even whose subnormal inputs and result are flushed to a zero of the same sign.
__device__ __forceinline__ float fmul_ftz(float a, float b) {
    float r;
    asm("mul.rn.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
// BW-8: flush a subnormal to a zero of the same sign (NaN and normals pass).
__device__ __forceinline__ float ftz(float x) { return (fabsf(x) < 1.17549435e-38f) ? copysignf(0.0f, x) : x; }

__device__ __forceinline__ float warp_max(float m) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    return m;
}

// --- the 8-bit dynamic map (blockwise_8bit.cu, adamw.cu) -----------------------------------------------------------
// DQ-2: qlora_ref.blockwise.encode_dynamic, scalar form: bitsandbytes' dQuantize<0>, 7 halving steps from pivot 127
// (right when y > code[pivot]), then the float32 midpoint on y's side decides neighbour vs pivot.  NaN -> 0.
__device__ __forceinline__ u8 encode_dynamic(float y, const float* code) {
    int pivot = 127, upper_pivot = 255, lower_pivot = 0;
    float lower = -1.0f, upper = 1.0f;
    float val = code[pivot];
#pragma unroll
    for (int step = 64; step > 0; step >>= 1) {
        if (y > val) { lower_pivot = pivot; lower = val; pivot += step; }
        else { upper_pivot = pivot; upper = val; pivot -= step; }
        val = code[pivot];
    }
    if (upper_pivot == 255) upper = code[255];
    if (lower_pivot == 0) lower = code[0];
    if (y > val) return (y > __fmul_rn(__fadd_rn(upper, val), 0.5f)) ? (u8)upper_pivot : (u8)pivot;
    return (y < __fmul_rn(__fadd_rn(lower, val), 0.5f)) ? (u8)lower_pivot : (u8)pivot;
}

// BW-2: max |v| that propagates NaN (np.max semantics); fmaxf alone would drop it.
__device__ __forceinline__ float nan_max(float m, float a) { return (isnan(a) || isnan(m)) ? __int_as_float(0x7fc00000) : fmaxf(m, a); }
