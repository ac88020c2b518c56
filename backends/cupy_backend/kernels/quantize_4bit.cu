// quantize_4bit.cu — blockwise absmax 4-bit quantization (NF4 / FP4 / Int4), packed two codes per byte.
//
// What (specs/blockwise.md BW-2..BW-6, specs/packing.md PK-1..PK-2; reference: qlora_ref/blockwise.py):
//   for block b of B consecutive values x (the last block may be partial; missing items count as 0):
//     absmax[b] = ftz(max |x|)             float32, over the valid items (BW-2, BW-8)
//     r         = rcp(absmax[b])            rcp.approx.ftz.f32, bitsandbytes' fast-math reciprocal (BW-3); 1/0 = inf
//     y         = ftz(ftz(x) * r)           one float32 product, mul.rn.ftz.f32 (BW-3, BW-8; never an FMA)
//     code      = #{k : y > t[k]}           strict '>' against the float32 thresholds t from qlora_ref.codebooks
//                                           (nf4_thresholds / int4_thresholds padded with +inf); NaN -> code 0
//     FP4 (sign-magnitude, BW-5): code = (y < 0 ? 8 : 0) | perm[#{k : |y| > t[k]}] over the 7 FP4 thresholds
//   packed[j] = (code[2j] << 4) | code[2j+1]   first element in the HIGH nibble: [a, b, c, d] -> [ab, cd]
//   An odd tail's low nibble is the code of the zero padding (0.0 * r), exactly as bitsandbytes' CUDA kernel does.
// Why this way: bit-identical with the numpy spec and with bitsandbytes' kQuantizeBlockwise (multiply by the
//   approximate reciprocal, not a division, with flush-to-zero as its --use_fast_math build does; strict '>' so an exact midpoint takes the lower code except where the spec's
//   thresholds were nudged down by one ulp to reproduce bitsandbytes' measured upper-code ties).
// Non-finite input (BW-9): counted while loading; status[0] += how many, status[1] = ~(first flat index) by atomicMax
//   of the complement (status starts zeroed); the Python side raises qlora_ref.NonFiniteError.  Codes written for such input are meaningless.
//
// Kernels:
//   quantize_4bit_v1<T, QT>          naive: one thread per quant block, a sequential loop, a linear count over the
//                                    thresholds.  Kept as a second oracle for v2.
//   quantize_4bit_v2<T, QT, B>       fast: E consecutive values per thread (two 16-byte loads: 16 for bf16/fp16, 8 for
//                                    fp32; B/256 at B = 4096), the block max by warp shuffles (and shared memory when
//                                    a block spans several warps), codes by a 4-step branchless binary search over the
//                                    thresholds in shared memory, E/2 packed bytes stored at once (coalesced across
//                                    the warp).  256 threads per CTA.  H100, bf16 22016x8192, blocksize 64: 225 us =
//                                    2.0 TB/s of 2.98 for a copy (one 16-byte load per thread instead of two: 255 us).
// QT: 0 = sorted table (NF4, Int4: code = count), 1 = FP4 sign-magnitude.
// Launch configs: backends/cupy_backend/launch.py (one function per kernel).  Build: -std=c++17 --fmad=false.
#include "common.cuh"

// #{k : y > t[k]} over 15 ascending thresholds (t[15] unused), by binary search: identical to the linear count.
__device__ __forceinline__ int count_above_15(float y, const float* t) {
    int c = (y > t[7]) ? 8 : 0;   // code in [c, c+7]
    c += (y > t[c + 3]) ? 4 : 0;  // code in [c, c+3]
    c += (y > t[c + 1]) ? 2 : 0;  // code in [c, c+1]
    c += (y > t[c]) ? 1 : 0;
    return c;
}

// #{k : a > t[k]} over 7 ascending thresholds.
__device__ __forceinline__ int count_above_7(float a, const float* t) {
    int c = (a > t[3]) ? 4 : 0;
    c += (a > t[c + 1]) ? 2 : 0;
    c += (a > t[c]) ? 1 : 0;
    return c;
}

template <int QT>
__device__ __forceinline__ u32 encode(float y, const float* t, const u8* perm) {
    if (QT == 0) return (u32)count_above_15(y, t);
    return (u32)perm[count_above_7(fabsf(y), t)] | (y < 0.0f ? 8u : 0u);
}

__device__ __forceinline__ void report_nonfinite(u64* status, u64 count, u64 first) {
    atomicAdd(&status[0], count);
    atomicMax(&status[1], ~first);  // status[1] = ~(min first index)
}

// ---------------------------------------------------------------------------------------------------------------
// v1: one thread per quant block.
template <typename T, int QT>
__global__ void quantize_4bit_v1(const T* __restrict__ x, i64 n, int blocksize, const float* __restrict__ thresholds,
                                 const u8* __restrict__ perm, u8* __restrict__ packed, float* __restrict__ absmax,
                                 u64* __restrict__ status) {
    const i64 b = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 start = b * blocksize;
    if (start >= n) return;
    const i64 stop = min(start + (i64)blocksize, n);
    const int nt = (QT == 0) ? 15 : 7;
    float m = 0.0f;
    u64 bad = 0, first = ~0ull;
    for (i64 i = start; i < stop; i++) {
        const float v = to_f32(x[i]);
        if (!isfinite(v)) { bad++; first = min(first, (u64)i); }
        m = fmaxf(m, fabsf(v));
    }
    if (bad) report_nonfinite(status, bad, first);
    m = ftz(m);
    absmax[b] = m;
    const float r = rcp_approx_ftz(m);
    for (i64 i = start; i < stop + ((stop - start) & 1); i += 2) {  // an odd tail reads the zero padding
        u32 byte = 0;
        for (int h = 0; h < 2; h++) {
            const float v = (i + h < stop) ? to_f32(x[i + h]) : 0.0f;
            const float y = fmul_ftz(v, r);
            const float a = (QT == 0) ? y : fabsf(y);
            int c = 0;
            for (int k = 0; k < nt; k++) c += (a > thresholds[k]) ? 1 : 0;
            u32 code = (QT == 0) ? (u32)c : ((u32)perm[c] | (y < 0.0f ? 8u : 0u));
            byte |= code << (h == 0 ? 4 : 0);
        }
        packed[i / 2] = (u8)byte;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// v2: E values per thread, 256 threads per CTA, B/E threads per quant block.
template <typename T, int QT, int B>
__global__ void __launch_bounds__(256) quantize_4bit_v2(const T* __restrict__ x, i64 n, int vec_ok,
                                                        const float* __restrict__ thresholds,
                                                        const u8* __restrict__ perm, u8* __restrict__ packed,
                                                        float* __restrict__ absmax, u64* __restrict__ status) {
    constexpr int V = Vec16<T>::N;               // values per 16-byte load
    constexpr int E = (B > 2048) ? B / 256 : 2 * V;  // values per thread: two 16-byte loads (B/256 at B = 4096)
    constexpr int TPB = B / E;                   // threads per quant block: 2 .. 256
    __shared__ float s_t[16];
    __shared__ u8 s_perm[16];
    __shared__ float s_warp_max[8];
    if (threadIdx.x < 16) {
        s_t[threadIdx.x] = thresholds[threadIdx.x];
        s_perm[threadIdx.x] = perm[threadIdx.x];
    }

    const i64 i0 = ((i64)blockIdx.x * 256 + threadIdx.x) * E;  // first value of this thread
    float v[E];
    if (vec_ok && i0 + E <= n) {
        const uint4* src = reinterpret_cast<const uint4*>(x + i0);
        uint4 q[E / V];
#pragma unroll
        for (int k = 0; k < E / V; k++) q[k] = __ldg(src + k);
#pragma unroll
        for (int k = 0; k < E / V; k++) Vec16<T>::unpack(q[k], v + k * V);
    } else {
#pragma unroll
        for (int k = 0; k < E; k++) v[k] = (i0 + k < n) ? to_f32(x[i0 + k]) : 0.0f;
    }

    float m = 0.0f;
    bool all_finite = true;
#pragma unroll
    for (int k = 0; k < E; k++) {
        all_finite &= isfinite(v[k]);
        m = fmaxf(m, fabsf(v[k]));
    }
    if (!all_finite) {  // rare path: count exactly, report the first index
        u64 bad = 0, first = ~0ull;
        for (int k = 0; k < E; k++)
            if (!isfinite(v[k])) { bad++; first = min(first, (u64)(i0 + k)); }
        report_nonfinite(status, bad, first);
    }

    // absmax over the TPB threads of this quant block (all threads take part, also those past n).
    if (TPB <= 32) {
#pragma unroll
        for (int o = TPB / 2; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        __syncthreads();  // s_t / s_perm ready
    } else {
        m = warp_max(m);
        const int warp = threadIdx.x / 32;
        if ((threadIdx.x & 31) == 0) s_warp_max[warp] = m;
        __syncthreads();
        constexpr int W = (TPB >= 32) ? TPB / 32 : 1;  // warps per quant block
        const int w0 = (warp / W) * W;
        m = s_warp_max[w0];
#pragma unroll
        for (int w = 1; w < W; w++) m = fmaxf(m, s_warp_max[w0 + w]);
    }
    if (i0 >= n) return;
    m = ftz(m);
    if (threadIdx.x % TPB == 0) absmax[i0 / B] = m;

    const float r = rcp_approx_ftz(m);
    u32 bytes[E / 2];
#pragma unroll
    for (int j = 0; j < E / 2; j++)
        bytes[j] = (encode<QT>(fmul_ftz(v[2 * j], r), s_t, s_perm) << 4) |
                   encode<QT>(fmul_ftz(v[2 * j + 1], r), s_t, s_perm);

    u8* dst = packed + i0 / 2;
    if (i0 + E <= n) {
        u32 w[E / 8];
#pragma unroll
        for (int k = 0; k < E / 8; k++)
            w[k] = bytes[4 * k] | (bytes[4 * k + 1] << 8) | (bytes[4 * k + 2] << 16) | (bytes[4 * k + 3] << 24);
        if (E == 8) {
            *reinterpret_cast<u32*>(dst) = w[0];
        } else {
#pragma unroll
            for (int k = 0; k < E / 16; k++) reinterpret_cast<uint2*>(dst)[k] = make_uint2(w[2 * k], w[2 * k + 1]);
        }
    } else {
        const i64 nbytes = (n - i0 + 1) / 2;  // bytes this thread owns (odd tail included)
#pragma unroll
        for (int j = 0; j < E / 2; j++)
            if (j < nbytes) dst[j] = (u8)bytes[j];
    }
}
