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
//   dequantize_4bit_v2<T, DQ>   fast: a thread owns CH chunks of 16 packed bytes (32 values, always inside one quant
//                               block since blocksize >= 32): CH 16-byte loads issued before any use, the 16-entry
//                               table in shared memory, 16-byte stores (4 per chunk for bf16/fp16, 8 for fp32).
//                               The values past the last whole chunk (n % 32) are done by one thread, scalar.
// Launch configs: backends/cupy_backend/ops.py.  Build: -std=c++17 --fmad=false.
#include "common.cuh"

template <bool DQ>
__device__ __forceinline__ float block_absmax(i64 b, const float* __restrict__ absmax, const u8* __restrict__ absmax_q,
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
    const float am = block_absmax<DQ>(i >> log2_blocksize, absmax, absmax_q, code2, nested_absmax, offset);
    out[i] = from_f32<T>(fmul_ftz(table[code], am));
}

// ---------------------------------------------------------------------------------------------------------------
template <typename T> __device__ __forceinline__ void store_chunk(T* dst, const float* v);  // 32 values, 16-byte stores
template <> __device__ __forceinline__ void store_chunk<float>(float* dst, const float* v) {
    uint4* d = reinterpret_cast<uint4*>(dst);
#pragma unroll
    for (int k = 0; k < 8; k++)
        d[k] = make_uint4(__float_as_uint(v[4 * k]), __float_as_uint(v[4 * k + 1]), __float_as_uint(v[4 * k + 2]),
                          __float_as_uint(v[4 * k + 3]));
}
template <typename T> __device__ __forceinline__ void store_chunk16(T* dst, const float* v) {
    uint4* d = reinterpret_cast<uint4*>(dst);
#pragma unroll
    for (int k = 0; k < 4; k++)
        d[k] = make_uint4(pack2<T>(v[8 * k], v[8 * k + 1]), pack2<T>(v[8 * k + 2], v[8 * k + 3]),
                          pack2<T>(v[8 * k + 4], v[8 * k + 5]), pack2<T>(v[8 * k + 6], v[8 * k + 7]));
}
template <> __device__ __forceinline__ void store_chunk<__half>(__half* dst, const float* v) { store_chunk16(dst, v); }
template <> __device__ __forceinline__ void store_chunk<__nv_bfloat16>(__nv_bfloat16* dst, const float* v) {
    store_chunk16(dst, v);
}

template <typename T, bool DQ, int CH>
__global__ void __launch_bounds__(256) dequantize_4bit_v2(const u8* __restrict__ packed, i64 n, int log2_blocksize,
                                                          const float* __restrict__ table,
                                                          const float* __restrict__ absmax,
                                                          const u8* __restrict__ absmax_q,
                                                          const float* __restrict__ code2,
                                                          const float* __restrict__ nested_absmax, float offset,
                                                          T* __restrict__ out) {
    __shared__ float s_table[16];
    __shared__ float s_code2[DQ ? 256 : 1];
    if (threadIdx.x < 16) s_table[threadIdx.x] = table[threadIdx.x];
    if (DQ) s_code2[threadIdx.x] = code2[threadIdx.x];  // blockDim.x == 256
    __syncthreads();

    const i64 nchunks = n >> 5;  // whole chunks of 32 values
    const i64 c0 = (i64)blockIdx.x * (256 * CH) + threadIdx.x;
    uint4 q[CH];
    float am[CH];
#pragma unroll
    for (int k = 0; k < CH; k++) {  // all loads first: CH x 16 bytes in flight per thread
        const i64 c = c0 + (i64)k * 256;
        if (c < nchunks) {
            q[k] = __ldcs(reinterpret_cast<const uint4*>(packed) + c);
            am[k] = block_absmax<DQ>((c << 5) >> log2_blocksize, absmax, absmax_q, s_code2, nested_absmax, offset);
        }
    }
#pragma unroll
    for (int k = 0; k < CH; k++) {
        const i64 c = c0 + (i64)k * 256;
        if (c < nchunks) {
            const u32 w[4] = {q[k].x, q[k].y, q[k].z, q[k].w};
            float v[32];
#pragma unroll
            for (int j = 0; j < 16; j++) {
                const u32 byte = (w[j >> 2] >> (8 * (j & 3))) & 0xffu;
                v[2 * j] = fmul_ftz(s_table[byte >> 4], am[k]);
                v[2 * j + 1] = fmul_ftz(s_table[byte & 15u], am[k]);
            }
            store_chunk<T>(out + (c << 5), v);
        } else if (c == nchunks) {  // the tail: n % 32 values, scalar
            for (i64 i = c << 5; i < n; i++) {
                const u32 byte = packed[i >> 1];
                const u32 code = (i & 1) ? (byte & 15u) : (byte >> 4);
                const float a = block_absmax<DQ>(i >> log2_blocksize, absmax, absmax_q, s_code2, nested_absmax, offset);
                out[i] = from_f32<T>(fmul_ftz(s_table[code], a));
            }
        }
    }
}
