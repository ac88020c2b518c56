// dequantize_4bit.cu — packed 4-bit codes -> bf16 / fp16 / fp32, nested (double-quantized) absmax decoded in place.
//
// What (specs/blockwise.md BW-7, specs/double_quant.md DQ-3; reference: qlora_ref/blockwise.py decode_4bit and
//   qlora_ref/double_quant.py double_dequantize):
//     code      = packed[i/2] >> 4 (i even) or & 15 (i odd)           first element in the HIGH nibble
//     b         = i >> log2(blocksize)
//     absmax    = f32(ftz(code2[absmax_q[b]] * nested_absmax[b >> 8]) + offset)  double quant: two roundings
//               = absmax[b]                                                       otherwise
//     out[i]    = T(ftz(table[code] * absmax))     one float32 product (flushed if subnormal, BW-8), rounded once to T
//   table is qlora_ref.codebooks.dequant_table(quant_type) (FP4 code 8 decodes to -0.0).
// Why one kernel: the nested absmax is decoded where it is used, so the whole op is one pass over the packed bytes
//   (0.5 B read + 2 B written per bf16 weight, plus 1/blocksize B of codes): the memory-bound floor.
//
// Kernels:
//   dequantize_4bit_v1<T, DQ>   naive: one thread per output value, scalar loads/stores.  Second oracle; also the
//                               path for unaligned pointers.
//   dequantize_4bit_v2<T, DQ, U> fast: a thread owns U units of 16 output bytes (8 bf16/fp16 or 4 fp32 values, always
//                               inside one quant block since blocksize >= 32), strided by the CTA so every warp load
//                               and every 16-byte warp store is contiguous (full cache lines); U loads and U nested
//                               absmax decodes are issued before any use; the 16-entry table and the 256-entry
//                               nested map in shared memory.  The n % E tail values are done by one thread, scalar.
//                               (A first v2 gave each thread 32 consecutive values: 16-byte loads, but its four
//                               16-byte stores per thread were 64 bytes apart, half-filled sectors per warp store:
//                               1.6 TB/s on an H100 against 2.98 TB/s for a copy.)
// Launch configs: backends/cupy_backend/launch.py.  Build: -std=c++17 --fmad=false.
#include "common.cuh"

// The float32 absmax of block b the decoder multiplies by (qlora_ref Quantized4bit.absmax_f32): stored, or decoded
// from double quantization (DQ-3, qlora_ref.double_quant.double_dequantize).
template <bool DQ>
__device__ __forceinline__ float absmax_f32(i64 b, const float* __restrict__ absmax, const u8* __restrict__ absmax_q,
                                            const float* __restrict__ code2, const float* __restrict__ nested_absmax,
                                            float offset) {
    if (!DQ) return __ldg(absmax + b);
    return __fadd_rn(fmul_ftz(code2[__ldg(absmax_q + b)], __ldg(nested_absmax + (b >> 8))), offset);
}

// ---------------------------------------------------------------------------------------------------------------
template <typename T, bool DQ>
__global__ void dequantize_4bit_v1(const u8* __restrict__ packed, i64 n, int log2_blocksize,
                                   const float* __restrict__ table, const float* __restrict__ absmax,
                                   const u8* __restrict__ absmax_q, const float* __restrict__ code2,
                                   const float* __restrict__ nested_absmax, float offset, T* __restrict__ out) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const u32 byte = packed[i >> 1];
    const u32 code = (i & 1) ? (byte & 15u) : (byte >> 4);
    const float am = absmax_f32<DQ>(i >> log2_blocksize, absmax, absmax_q, code2, nested_absmax, offset);
    out[i] = from_f32<T>(fmul_ftz(table[code], am));
}

// ---------------------------------------------------------------------------------------------------------------
// v2 unit: 16 bytes of output per thread (E = 16 / sizeof(T) values: 8 for bf16/fp16, 4 for fp32) from E/2 packed
// bytes, so that a warp's load covers 32 * E/2 contiguous bytes and its store 512 contiguous bytes (full lines).
template <typename T> struct Unit;
template <> struct Unit<float> {
    static constexpr int E = 4;
    typedef unsigned short Packed;  // 2 packed bytes
    __device__ __forceinline__ static uint4 decode(u32 q, const float* table, float am) {
        const u32 b0 = q & 0xffu, b1 = (q >> 8) & 0xffu;
        return make_uint4(__float_as_uint(fmul_ftz(table[b0 >> 4], am)), __float_as_uint(fmul_ftz(table[b0 & 15u], am)),
                          __float_as_uint(fmul_ftz(table[b1 >> 4], am)), __float_as_uint(fmul_ftz(table[b1 & 15u], am)));
    }
};
template <typename T> struct Unit16 {
    static constexpr int E = 8;
    typedef u32 Packed;  // 4 packed bytes
    __device__ __forceinline__ static uint4 decode(u32 q, const float* table, float am) {
        u32 w[4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const u32 byte = (q >> (8 * j)) & 0xffu;  // little-endian: byte j holds values 2j (high) and 2j+1 (low)
            w[j] = pack2<T>(fmul_ftz(table[byte >> 4], am), fmul_ftz(table[byte & 15u], am));
        }
        return make_uint4(w[0], w[1], w[2], w[3]);
    }
};
template <> struct Unit<__half> : Unit16<__half> {};
template <> struct Unit<__nv_bfloat16> : Unit16<__nv_bfloat16> {};

template <typename T, bool DQ, int U>
__global__ void __launch_bounds__(256) dequantize_4bit_v2(const u8* __restrict__ packed, i64 n, int log2_blocksize,
                                                          const float* __restrict__ table,
                                                          const float* __restrict__ absmax,
                                                          const u8* __restrict__ absmax_q,
                                                          const float* __restrict__ code2,
                                                          const float* __restrict__ nested_absmax, float offset,
                                                          T* __restrict__ out) {
    constexpr int E = Unit<T>::E;
    typedef typename Unit<T>::Packed Packed;
    __shared__ float s_table[16];
    __shared__ float s_code2[DQ ? 256 : 1];
    if (threadIdx.x < 16) s_table[threadIdx.x] = table[threadIdx.x];
    if (DQ) s_code2[threadIdx.x] = code2[threadIdx.x];  // blockDim.x == 256
    __syncthreads();

    const i64 nunits = n / E;  // whole units; the n % E tail is done by the thread that owns unit `nunits`
    const i64 g0 = (i64)blockIdx.x * (256 * U) + threadIdx.x;
    u32 q[U];
    float am[U];
#pragma unroll
    for (int u = 0; u < U; u++) {  // all loads first: U independent loads (and absmax chains) in flight
        const i64 g = g0 + (i64)u * 256;
        if (g < nunits) {
            q[u] = __ldcs(reinterpret_cast<const Packed*>(packed) + g);
            am[u] = absmax_f32<DQ>((g * E) >> log2_blocksize, absmax, absmax_q, s_code2, nested_absmax, offset);
        }
    }
#pragma unroll
    for (int u = 0; u < U; u++) {
        const i64 g = g0 + (i64)u * 256;
        if (g < nunits) {
            reinterpret_cast<uint4*>(out)[g] = Unit<T>::decode(q[u], s_table, am[u]);
        } else if (g == nunits) {  // the tail: n % E values, scalar
            for (i64 i = g * E; i < n; i++) {
                const u32 byte = packed[i >> 1];
                const u32 code = (i & 1) ? (byte & 15u) : (byte >> 4);
                const float a = absmax_f32<DQ>(i >> log2_blocksize, absmax, absmax_q, s_code2, nested_absmax, offset);
                out[i] = from_f32<T>(fmul_ftz(s_table[code], a));
            }
        }
    }
}
