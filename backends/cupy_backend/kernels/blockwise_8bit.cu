// blockwise_8bit.cu — 8-bit blockwise quantization with a sorted 256-entry dynamic map, and absmax_mean: the float32
// mean (a fixed tree of float32 sums) behind double quantization's offset.
//
// What (specs/double_quant.md DQ-1..DQ-3; reference: qlora_ref/blockwise.py quantize_blockwise_8bit / encode_dynamic /
//   dequantize_blockwise_8bit, qlora_ref/double_quant.py absmax_mean):
//     v         = x                      or  f32(x - offset)  (double quantization centres the absmax first)
//     absmax[b] = ftz(max |v|) over block b   (NaN propagates, as np.max does; BW-2, BW-8)
//     y         = ftz(ftz(v) * rcp(absmax[b]))  rcp.approx.ftz.f32 and mul.rn.ftz.f32 (BW-3, BW-8)
//     code      = bitsandbytes' dQuantize<0>: 7 halving steps from pivot 127 (right when y > code[pivot]), then the
//                 float32 midpoint (neighbour + code[pivot]) * 0.5 on y's side decides neighbour vs pivot; the bracket
//                 starts at -1 / +1 and is code[0] / code[255] at the table's ends.  NaN -> 0.
//     decode:   x_hat = ftz(code[q] * absmax[i / blocksize])   (DQ-3, BW-8)
//     offset    = absmax_mean(absmax): the spec's fixed float32 summation tree, times (1.0f / n)    (DQ-1)
// Kernels:
//   quantize_blockwise_8bit_v1<SUB>   naive: one thread per block, sequential.  Second oracle.
//   quantize_blockwise_8bit_v2<SUB>   one warp per block (8 blocks per 256-thread CTA), the map in shared memory.
//   dequantize_blockwise_8bit_v1      one thread per value.
//   dequantize_blockwise_8bit_v2      16 codes per thread (one 16-byte load, four 16-byte stores); blocksize % 16 == 0.
//   absmax_mean_chains<D>             the 4W sequential float32 chains of the spec's tree, one per thread, D loads ahead.
//   absmax_mean_fold                  one CTA: combine each lane's 4 accumulators, fold the lanes in halves, write the
//                                     offset's bits to status[3].  (No naive twin: the order IS the spec; tested against
//                                     qlora_ref.double_quant.absmax_mean at many n.)
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

// ---------------------------------------------------------------------------------------------------------------
// offset = absmax_mean(absmax) = tree_sum(absmax) * (1.0f / n) in float32, the spec's fixed tree (DQ-1,
// qlora_ref.double_quant.absmax_mean):
//   W lanes; each lane keeps 4 accumulators, each a chain of float32 adds in a fixed order (it cannot be split); then
//   lane t combines ((a0 + a1) + a2) + a3 and the lanes fold in halves (stage 2).  Two element-to-accumulator maps:
//     vec = 0  element t + (4k + j) W          -> accumulator j of lane t        (torch's scalar loop)
//     vec = 1  element 4 (t + k W) + j         -> accumulator j of lane t        (torch's float4 loop), and the n % 4
//              tail elements 4 (n/4) + t       -> accumulator 0 of lane t, after the loop
//   Python chooses vec and W to match the spec (launch.absmax_mean_plan).
// Stage 1 runs the 4W (<= 2048) chains in parallel, one per thread, 64 threads per CTA (spread over many SMs), with D
// loads in flight ahead of the adds: at most 2048 threads exist, so the bytes in flight come from D.
// Asynchronous 4-byte global -> shared copies (sm_80+): the loads of a whole batch are in flight at once, whatever
// the register allocator would have done with D ordinary loads (it interleaved them with the adds: 32 registers).
__device__ __forceinline__ void cp_async4(float* smem, const float* gmem) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <int D>
__global__ void __launch_bounds__(64) absmax_mean_chains(const float* __restrict__ a, i64 n, int W, int vec,
                                                         float* __restrict__ acc) {
    __shared__ float buf[2][D][64];  // two stages of D values per thread; a thread reads only its own column
    const int tid = threadIdx.x;
    const int c = blockIdx.x * 64 + tid;  // chain c = j * W + t
    if (c >= 4 * W) return;
    const int t = c % W, j = c / W;
    const i64 nvec = n / 4;
    // Both maps visit base + k * 4W for k = 0 .. count-1.
    const i64 base = vec ? 4ll * t + j : t + (i64)j * W;
    const i64 stride = 4ll * W;
    const i64 last = vec ? 4 * nvec : n;  // exclusive end of the elements the loop visits
    const i64 count = (base < last) ? (last - base + stride - 1) / stride : 0;
    const float* p = a + base;
    const i64 batches = (count + D - 1) / D;
    auto issue = [&](i64 batch) {
        const i64 k0 = batch * D;
        const int m = (int)min((i64)D, count - k0);
        for (int d = 0; d < m; d++) cp_async4(&buf[batch & 1][d][tid], p + (k0 + d) * stride);
        cp_async_commit();
    };
    float s = 0.0f;
    if (batches > 0) issue(0);
    for (i64 b = 0; b < batches; b++) {
        if (b + 1 < batches) {
            issue(b + 1);
            cp_async_wait<1>();  // batch b has landed (b + 1 may still be in flight)
        } else {
            cp_async_wait<0>();
        }
        const int m = (int)min((i64)D, count - b * D);
        for (int d = 0; d < m; d++) s = __fadd_rn(s, buf[b & 1][d][tid]);  // in order: the chain's adds
    }
    if (vec && j == 0 && t < n % 4) s = __fadd_rn(s, a[4 * nvec + t]);
    acc[c] = s;
}

// Stage 2 (one CTA of 512 threads): combine and fold; status[3] = bits of the float32 offset.
__global__ void __launch_bounds__(512) absmax_mean_fold(const float* __restrict__ acc, i64 n, int W,
                                                        u64* __restrict__ status) {
    __shared__ float v[512];
    const int t = threadIdx.x;
    if (t < W) v[t] = __fadd_rn(__fadd_rn(__fadd_rn(acc[t], acc[W + t]), acc[2 * W + t]), acc[3 * W + t]);
    __syncthreads();
    for (int h = W / 2; h >= 1; h /= 2) {
        float mine = 0.0f;
        if (t < h) mine = __fadd_rn(v[t], v[t + h]);
        __syncthreads();
        if (t < h) v[t] = mine;
        __syncthreads();
    }
    if (t == 0) {
        const float offset = __fmul_rn(v[0], __fdiv_rn(1.0f, __ll2float_rn(n)));
        status[3] = (u64)__float_as_uint(offset);
    }
}
