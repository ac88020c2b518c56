// blockwise_8bit.cu — 8-bit blockwise quantization with a sorted 256-entry dynamic map, and the float64 sum behind
// double quantization's offset.
//
// What (specs/double_quant.md DQ-1..DQ-3; reference: qlora_ref/blockwise.py quantize_blockwise_8bit / encode_dynamic /
//   dequantize_blockwise_8bit, qlora_ref/double_quant.py absmax_mean):
//     v         = x                      or  f32(x - offset)  (double quantization centres the absmax first)
//     absmax[b] = max |v| over block b   (NaN propagates, as np.max does)
//     y         = v * f32(1 / absmax[b])
//     code      = bitsandbytes' dQuantize<0>: 7 halving steps from pivot 127 (right when y > code[pivot]), then the
//                 float32 midpoint (neighbour + code[pivot]) * 0.5 on y's side decides neighbour vs pivot; the bracket
//                 starts at -1 / +1 and is code[0] / code[255] at the table's ends.  NaN -> 0.
//     decode:   x_hat = f32(code[q] * absmax[i / blocksize])
//     offset    = f32(f32(sum_f64(absmax)) / f32(n))    the sum in float64; Python checks that the float32 rounding of
//                 the sum cannot depend on the summation order (else it recomputes the offset with the spec itself).
// Kernels:
//   quantize_blockwise_8bit_v1<SUB>   naive: one thread per block, sequential.  Second oracle.
//   quantize_blockwise_8bit_v2<SUB>   one warp per block (8 blocks per 256-thread CTA), the map in shared memory.
//   dequantize_blockwise_8bit_v1      one thread per value.
//   dequantize_blockwise_8bit_v2      16 codes per thread (one 16-byte load, four 16-byte stores); blocksize % 16 == 0.
//   sum_f64_partial / sum_f64_final   two-stage float64 sum (fixed order for a given n), final stage writes the sum and
//                                     the offset into the status words status[2] (double bits) / status[3] (float bits).
// Launch configs: backends/cupy_backend/ops.py.  Build: -std=c++17 --fmad=false.
#include "common.cuh"

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

// max |v| that propagates NaN (np.max semantics); fmaxf alone would drop it.
__device__ __forceinline__ float nan_max(float m, float a) { return (isnan(a) || isnan(m)) ? __int_as_float(0x7fc00000) : fmaxf(m, a); }

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
    absmax[b] = m;
    const float r = __fdiv_rn(1.0f, m);
    for (i64 i = start; i < stop; i++) codes[i] = encode_dynamic(__fmul_rn(centred<SUB>(x, i, offset), r), code);
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
    if (lane == 0) absmax[b] = m;
    const float r = __fdiv_rn(1.0f, m);
    for (i64 i = start + lane; i < stop; i += 32) codes[i] = encode_dynamic(__fmul_rn(centred<SUB>(x, i, offset), r), s_code);
}

// ---------------------------------------------------------------------------------------------------------------
__global__ void dequantize_blockwise_8bit_v1(const u8* __restrict__ codes, i64 n, int blocksize,
                                             const float* __restrict__ code, const float* __restrict__ absmax,
                                             float* __restrict__ out) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = __fmul_rn(code[codes[i]], absmax[i / blocksize]);
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
            dst[k] = make_uint4(__float_as_uint(__fmul_rn(s_code[w[k] & 0xff], am)),
                                __float_as_uint(__fmul_rn(s_code[(w[k] >> 8) & 0xff], am)),
                                __float_as_uint(__fmul_rn(s_code[(w[k] >> 16) & 0xff], am)),
                                __float_as_uint(__fmul_rn(s_code[w[k] >> 24], am)));
    } else {
        for (i64 i = i0; i < n; i++) out[i] = __fmul_rn(s_code[codes[i]], absmax[i / blocksize]);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Float64 sum of float32 values: stage 1, one partial per CTA over a grid-stride range (256 threads).
__global__ void __launch_bounds__(256) sum_f64_partial(const float* __restrict__ x, i64 n, double* __restrict__ partial) {
    __shared__ double s[256];
    double acc = 0.0;
    for (i64 i = (i64)blockIdx.x * 256 + threadIdx.x; i < n; i += (i64)gridDim.x * 256) acc += (double)x[i];
    s[threadIdx.x] = acc;
    __syncthreads();
    for (int o = 128; o > 0; o >>= 1) {
        if (threadIdx.x < o) s[threadIdx.x] += s[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = s[0];
}

// Stage 2 (one CTA of 256 threads): status[2] = bits of the float64 sum, status[3] = bits of
// offset = f32(f32(sum) / f32(n)) (DQ-1).
__global__ void __launch_bounds__(256) sum_f64_final(const double* __restrict__ partial, int nparts, i64 n,
                                                     u64* __restrict__ status) {
    __shared__ double s[256];
    double acc = 0.0;
    for (int i = threadIdx.x; i < nparts; i += 256) acc += partial[i];
    s[threadIdx.x] = acc;
    __syncthreads();
    for (int o = 128; o > 0; o >>= 1) {
        if (threadIdx.x < o) s[threadIdx.x] += s[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        const double total = s[0];
        status[2] = (u64)__double_as_longlong(total);
        status[3] = (u64)__float_as_uint(__fdiv_rn(__double2float_rn(total), __ll2float_rn(n)));
    }
}
