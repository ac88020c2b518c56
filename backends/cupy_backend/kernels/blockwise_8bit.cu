// blockwise_8bit.cu — 8-bit blockwise quantization with a sorted 256-entry dynamic map (double quantization's second
// level; its offset, absmax_mean, is kernels/absmax_mean.cu).
//
// What (specs/double_quant.md DQ-1..DQ-3; reference: qlora_ref/blockwise.py quantize_blockwise_8bit / encode_dynamic /
//   dequantize_blockwise_8bit):
//     v         = x                      or  f32(x - offset)  (double quantization centres the absmax first)
//     absmax[b] = ftz(max |v|) over block b   (NaN propagates, as np.max does; BW-2, BW-8)
//     y         = ftz(ftz(v) * rcp(absmax[b]))  rcp.approx.ftz.f32 and mul.rn.ftz.f32 (BW-3, BW-8)
//     code      = bitsandbytes' dQuantize<0>: 7 halving steps from pivot 127 (right when y > code[pivot]), then the
//                 float32 midpoint (neighbour + code[pivot]) * 0.5 on y's side decides neighbour vs pivot; the bracket
//                 starts at -1 / +1 and is code[0] / code[255] at the table's ends.  NaN -> 0.
//     decode:   x_hat = ftz(code[q] * absmax[i / blocksize])   (DQ-3, BW-8)
// Kernels:
//   quantize_blockwise_8bit_v1<SUB>   naive: one thread per block, sequential.  Second oracle.
//   quantize_blockwise_8bit_v2<SUB>   one warp per block (8 blocks per 256-thread CTA), the map in shared memory.
//   dequantize_blockwise_8bit_v1      one thread per value.
//   dequantize_blockwise_8bit_v2      16 codes per thread (one 16-byte load, four 16-byte stores); blocksize % 16 == 0.
// Launch configs: backends/cupy_backend/launch.py.  Build: -std=c++17 --fmad=false.
#include "common.cuh"

// encode_dynamic (DQ-2) and nan_max (BW-2) live in common.cuh (shared with adamw.cu).

template <bool SUB>
__device__ __forceinline__ float centred(const float* x, i64 i, float offset) { return SUB ? __fsub_rn(x[i], offset) : x[i]; }

// ---------------------------------------------------------------------------------------------------------------
template <bool SUB>
__global__ void quantize_blockwise_8bit_v1(const float* __restrict__ x, i64 n, int blocksize,
                                           const float* __restrict__ code, const float* __restrict__ offset_ptr,
                                           u8* __restrict__ codes, float* __restrict__ absmax) {
    const i64 b = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 start = b * blocksize;
    if (start >= n) return;
    const i64 stop = min(start + (i64)blocksize, n);
    const float offset = SUB ? *offset_ptr : 0.0f;
    float m = 0.0f;
    for (i64 i = start; i < stop; i++) m = nan_max(m, fabsf(centred<SUB>(x, i, offset)));
    m = ftz(m);
    absmax[b] = m;
    const float r = rcp_approx_ftz(m);
    for (i64 i = start; i < stop; i++) codes[i] = encode_dynamic(fmul_ftz(centred<SUB>(x, i, offset), r), code);
}

template <bool SUB>
__global__ void __launch_bounds__(256) quantize_blockwise_8bit_v2(const float* __restrict__ x, i64 n, int blocksize,
                                                                  const float* __restrict__ code,
                                                                  const float* __restrict__ offset_ptr,
                                                                  u8* __restrict__ codes, float* __restrict__ absmax) {
    __shared__ float s_code[256];
    s_code[threadIdx.x] = code[threadIdx.x];
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const i64 b = (i64)blockIdx.x * 8 + (threadIdx.x >> 5);
    const i64 start = b * blocksize;
    if (start >= n) return;  // whole warp leaves together
    const i64 stop = min(start + (i64)blocksize, n);
    const float offset = SUB ? *offset_ptr : 0.0f;
    float m = 0.0f;
    for (i64 i = start + lane; i < stop; i += 32) m = nan_max(m, fabsf(centred<SUB>(x, i, offset)));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, o));
    m = ftz(m);
    if (lane == 0) absmax[b] = m;
    const float r = rcp_approx_ftz(m);
    for (i64 i = start + lane; i < stop; i += 32)
        codes[i] = encode_dynamic(fmul_ftz(centred<SUB>(x, i, offset), r), s_code);
}

// ---------------------------------------------------------------------------------------------------------------
__global__ void dequantize_blockwise_8bit_v1(const u8* __restrict__ codes, i64 n, int blocksize,
                                             const float* __restrict__ code, const float* __restrict__ absmax,
                                             float* __restrict__ out) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = fmul_ftz(code[codes[i]], absmax[i / blocksize]);
}

__global__ void __launch_bounds__(256) dequantize_blockwise_8bit_v2(const u8* __restrict__ codes, i64 n, int blocksize,
                                                                    const float* __restrict__ code,
                                                                    const float* __restrict__ absmax,
                                                                    float* __restrict__ out) {
    __shared__ float s_code[256];
    s_code[threadIdx.x] = code[threadIdx.x];
    __syncthreads();
    const i64 i0 = ((i64)blockIdx.x * 256 + threadIdx.x) * 16;
    if (i0 >= n) return;
    if (i0 + 16 <= n) {
        const uint4 q = __ldg(reinterpret_cast<const uint4*>(codes + i0));
        const float am = __ldg(absmax + i0 / blocksize);  // 16 | blocksize: one block
        const u32 w[4] = {q.x, q.y, q.z, q.w};
        uint4* dst = reinterpret_cast<uint4*>(out + i0);
#pragma unroll
        for (int k = 0; k < 4; k++)
            dst[k] = make_uint4(__float_as_uint(fmul_ftz(s_code[w[k] & 0xff], am)),
                                __float_as_uint(fmul_ftz(s_code[(w[k] >> 8) & 0xff], am)),
                                __float_as_uint(fmul_ftz(s_code[(w[k] >> 16) & 0xff], am)),
                                __float_as_uint(fmul_ftz(s_code[w[k] >> 24], am)));
    } else {
        for (i64 i = i0; i < n; i++) out[i] = fmul_ftz(s_code[codes[i]], absmax[i / blocksize]);
    }
}
