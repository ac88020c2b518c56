// adamw.cu — AdamW over many tensors in one launch, 32-bit or 8-bit blockwise states, updated in place.
//
// What (specs/adamw.md ADAMW-2, ADAMW-3, ADAMW-6..ADAMW-8; reference: qlora_ref/adamw.py adamw_step / adamw_step_8bit):
//     if decay_before:  p = p * decay                                      (ADAMW-3, torch.optim.AdamW's placement)
//     m = b1*m + one_minus_b1*g ;  v = b2*v + one_minus_b2*(g*g)           (ADAMW-2)
//     p = p + step_size * (m / (sqrt(v) + eps_c2))
//     else:             p = p * decay                                      (ADAMW-3, bitsandbytes' placement)
//   with the float32 scalars b1, 1-b1, b2, 1-b2, step_size = -lr*c2/c1, eps_c2 = eps*c2, decay = 1-lr*wd computed on
//   the host by the spec's own expressions (ADAMW-2: adam_scalars; device powf may differ in the last ulp), one set per
//   tensor in its TensorArgs row.  Per element only mul, add, div and sqrt remain, each correctly rounded under the
//   build options (--fmad=false, --prec-div=true, --prec-sqrt=true, --ftz=false): bit-identical to numpy's float32.
//   bf16/fp16 parameters and gradients widen exactly to float32 (BW-1); the new p rounds once to its dtype (BW-7).
//   8-bit states (ADAMW-6: 256 values per block, m into the signed dynamic map, v into the unsigned one):
//     dequantize   s = ftz(code[c] * absmax[block])                        (ADAMW-7, DQ-3, BW-8: mul.rn.ftz.f32)
//     update       the 32-bit step above on s; p from the unquantized new m, v (ADAMW-7)
//     absmax'      ftz(max |s'|) over the block, NaN propagating as np.max  (ADAMW-8, BW-2, BW-8)
//     requantize   code = encode_dynamic(ftz(ftz(s') * rcp(absmax')))      (ADAMW-8, BW-3, DQ-2)
//   Non-finite gradients (ADAMW-12) are refused in Python before any launch, or, deferred, on the device: `skip`
//   (nullptr, or an int32 the caller's flag kernels wrote before this launch) nonzero makes every kernel return
//   before reading or writing anything, so a step with a NaN/Inf gradient leaves parameters and states as they were.
// Kernels:
//   adamw32_v1   plain: one thread per element of one tensor (a launch per tensor).  Second oracle.
//   adamw32_v2   one launch for every tensor: a block table of (tensor row, chunk) pairs, each CUDA block updates one
//                chunk of one tensor, every thread ILP elements strided by blockDim (coalesced).
//   adamw8_v1    plain: one thread per 256-block of one tensor, sequential (absmax in a first pass, codes in a second
//                that recomputes the same update).  Second oracle.
//   adamw8_v2    one launch for every tensor: blockDim must be 256, one thread per element of a 256-block; each CUDA
//                block walks the 256-blocks of its chunk, maps in shared memory.
// Launch configs: backends/cupy_backend/adamw.py.  Build: -std=c++17 --fmad=false (build.OPTIONS, the same as every
// kernel file).  The TensorArgs layout is mirrored by ARGS_DTYPE in backends/cupy_backend/adamw.py.
#include "common.cuh"

struct TensorArgs {                         // 96 bytes, one row per tensor
    u64 p, g, m, v;                         // param (T), grad (T), m and v (float32, or uint8 codes for 8-bit states)
    u64 m_absmax, v_absmax;                 // float32[ceil(n/256)], 8-bit states only
    i64 n;                                  // elements
    int dtype;                              // T: 0 float32, 1 bfloat16, 2 float16
    int decay_before;                       // 1: p*(1-lr*wd) before the Adam step (torch), 0: after (bitsandbytes)
    float b1, one_minus_b1, b2, one_minus_b2;
    float step_size, eps_c2, decay, pad_;
};
static_assert(sizeof(TensorArgs) == 96, "TensorArgs must match ARGS_DTYPE in backends/cupy_backend/adamw.py");

constexpr int ILP = 4;       // elements in flight per thread in adamw32_v2
constexpr int QBLOCK = 256;  // ADAMW-6: values per 8-bit state block

__device__ __forceinline__ float load_t(u64 ptr, i64 i, int dtype) {
    if (dtype == 0) return reinterpret_cast<const float*>(ptr)[i];
    if (dtype == 1) return to_f32(reinterpret_cast<const __nv_bfloat16*>(ptr)[i]);
    return to_f32(reinterpret_cast<const __half*>(ptr)[i]);
}

__device__ __forceinline__ void store_t(u64 ptr, i64 i, int dtype, float x) {
    if (dtype == 0) reinterpret_cast<float*>(ptr)[i] = x;
    else if (dtype == 1) reinterpret_cast<__nv_bfloat16*>(ptr)[i] = from_f32<__nv_bfloat16>(x);
    else reinterpret_cast<__half*>(ptr)[i] = from_f32<__half>(x);
}

// The spec's per-element update (ADAMW-2, ADAMW-3), one float32 op at a time.
__device__ __forceinline__ void adamw_element(const TensorArgs& a, float& p, float g, float& m, float& v) {
    if (a.decay_before) p = p * a.decay;
    m = a.b1 * m + a.one_minus_b1 * g;
    v = a.b2 * v + a.one_minus_b2 * (g * g);
    p = p + a.step_size * (m / (sqrtf(v) + a.eps_c2));
    if (!a.decay_before) p = p * a.decay;
}

// ---- 32-bit states ------------------------------------------------------------------------------------------------

__device__ __forceinline__ bool skipped(const int* skip) { return skip != nullptr && *skip != 0; }

__global__ void adamw32_v1(const TensorArgs* __restrict__ args, int tensor, const int* __restrict__ skip) {
    if (skipped(skip)) return;
    const TensorArgs a = args[tensor];
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= a.n) return;
    float p = load_t(a.p, i, a.dtype);
    float m = reinterpret_cast<float*>(a.m)[i];
    float v = reinterpret_cast<float*>(a.v)[i];
    adamw_element(a, p, load_t(a.g, i, a.dtype), m, v);
    store_t(a.p, i, a.dtype, p);
    reinterpret_cast<float*>(a.m)[i] = m;
    reinterpret_cast<float*>(a.v)[i] = v;
}

__global__ void adamw32_v2(const TensorArgs* __restrict__ args, const int2* __restrict__ blocks, i64 chunk,
                           const int* __restrict__ skip) {
    if (skipped(skip)) return;
    const int2 bt = blocks[blockIdx.x];  // (tensor row, chunk index)
    const TensorArgs a = args[bt.x];
    const i64 start = (i64)bt.y * chunk;
    const i64 end = min(start + chunk, a.n);
    float* m_ptr = reinterpret_cast<float*>(a.m);
    float* v_ptr = reinterpret_cast<float*>(a.v);
    const i64 stride = (i64)blockDim.x * ILP;
    for (i64 base = start + threadIdx.x; base < end; base += stride) {
        float p[ILP], g[ILP], m[ILP], v[ILP];
#pragma unroll
        for (int k = 0; k < ILP; ++k) {
            const i64 i = base + (i64)k * blockDim.x;
            if (i < end) {
                p[k] = load_t(a.p, i, a.dtype);
                g[k] = load_t(a.g, i, a.dtype);
                m[k] = m_ptr[i];
                v[k] = v_ptr[i];
            }
        }
#pragma unroll
        for (int k = 0; k < ILP; ++k) {
            const i64 i = base + (i64)k * blockDim.x;
            if (i < end) {
                adamw_element(a, p[k], g[k], m[k], v[k]);
                store_t(a.p, i, a.dtype, p[k]);
                m_ptr[i] = m[k];
                v_ptr[i] = v[k];
            }
        }
    }
}

// ---- 8-bit blockwise states ---------------------------------------------------------------------------------------

// The dequantize + update of element i (ADAMW-7): the new p, m, v in float32.
__device__ __forceinline__ void adamw8_element(const TensorArgs& a, i64 i, i64 qb, const float* code_m,
                                               const float* code_v, float& p, float& m, float& v) {
    const u8* m_codes = reinterpret_cast<const u8*>(a.m);
    const u8* v_codes = reinterpret_cast<const u8*>(a.v);
    p = load_t(a.p, i, a.dtype);
    const float g = load_t(a.g, i, a.dtype);
    m = fmul_ftz(code_m[m_codes[i]], reinterpret_cast<const float*>(a.m_absmax)[qb]);  // DQ-3 (BW-8: flushed)
    v = fmul_ftz(code_v[v_codes[i]], reinterpret_cast<const float*>(a.v_absmax)[qb]);
    adamw_element(a, p, g, m, v);
}

__global__ void adamw8_v1(const TensorArgs* __restrict__ args, int tensor, const float* __restrict__ code_m,
                          const float* __restrict__ code_v, const int* __restrict__ skip) {
    if (skipped(skip)) return;
    const TensorArgs a = args[tensor];
    const i64 qb = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 start = qb * QBLOCK;
    if (start >= a.n) return;
    const i64 stop = min(start + (i64)QBLOCK, a.n);
    float am = 0.0f, av = 0.0f, p, m, v;
    for (i64 i = start; i < stop; i++) {  // pass 1: the new absmax (ADAMW-8), nothing written yet
        adamw8_element(a, i, qb, code_m, code_v, p, m, v);
        am = nan_max(am, fabsf(m));
        av = nan_max(av, fabsf(v));
    }
    am = ftz(am);
    av = ftz(av);
    const float rm = rcp_approx_ftz(am), rv = rcp_approx_ftz(av);  // BW-3: 1/0 = inf, then 0*inf = NaN -> code 0
    u8* m_codes = reinterpret_cast<u8*>(a.m);
    u8* v_codes = reinterpret_cast<u8*>(a.v);
    for (i64 i = start; i < stop; i++) {  // pass 2: the same update again (same bits), then p and the codes
        adamw8_element(a, i, qb, code_m, code_v, p, m, v);
        store_t(a.p, i, a.dtype, p);
        m_codes[i] = encode_dynamic(fmul_ftz(m, rm), code_m);
        v_codes[i] = encode_dynamic(fmul_ftz(v, rv), code_v);
    }
    reinterpret_cast<float*>(a.m_absmax)[qb] = am;  // last: pass 2 read the old absmax
    reinterpret_cast<float*>(a.v_absmax)[qb] = av;
}

// Block-wide max over 256 threads (exact: max is order-independent; NaN propagates as one canonical NaN).
__device__ __forceinline__ float block_max_256(float x, float* scratch) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) x = nan_max(x, __shfl_xor_sync(0xffffffffu, x, off));
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    float r = scratch[0];
#pragma unroll
    for (int w = 1; w < QBLOCK / 32; ++w) r = nan_max(r, scratch[w]);
    __syncthreads();  // scratch is reused by the next call
    return r;
}

__global__ void adamw8_v2(const TensorArgs* __restrict__ args, const int2* __restrict__ blocks,
                          int qblocks_per_chunk, const float* __restrict__ code_m, const float* __restrict__ code_v,
                          const int* __restrict__ skip) {
    if (skipped(skip)) return;  // uniform over the block: before the barriers
    __shared__ float s_code_m[256], s_code_v[256], scratch_m[QBLOCK / 32], scratch_v[QBLOCK / 32];
    s_code_m[threadIdx.x] = code_m[threadIdx.x];
    s_code_v[threadIdx.x] = code_v[threadIdx.x];
    __syncthreads();
    const int2 bt = blocks[blockIdx.x];  // (tensor row, chunk index)
    const TensorArgs a = args[bt.x];
    u8* m_codes = reinterpret_cast<u8*>(a.m);
    u8* v_codes = reinterpret_cast<u8*>(a.v);
    float* m_absmax = reinterpret_cast<float*>(a.m_absmax);
    float* v_absmax = reinterpret_cast<float*>(a.v_absmax);
    const i64 nqb = (a.n + QBLOCK - 1) / QBLOCK;
    const i64 qb0 = (i64)bt.y * qblocks_per_chunk;
    const i64 qb1 = min(qb0 + qblocks_per_chunk, nqb);
    for (i64 qb = qb0; qb < qb1; ++qb) {
        const i64 i = qb * QBLOCK + threadIdx.x;
        const bool valid = i < a.n;
        float p = 0.0f, m = 0.0f, v = 0.0f;
        if (valid) adamw8_element(a, i, qb, s_code_m, s_code_v, p, m, v);
        // ADAMW-8, BW-2, BW-8: new absmax over the valid items (padding counts as 0), subnormal flushed
        const float am = ftz(block_max_256(valid ? fabsf(m) : 0.0f, scratch_m));
        const float av = ftz(block_max_256(valid ? fabsf(v) : 0.0f, scratch_v));
        if (valid) {
            store_t(a.p, i, a.dtype, p);
            const float rm = rcp_approx_ftz(am), rv = rcp_approx_ftz(av);  // BW-3: 1/0 = inf, 0*inf = NaN -> code 0
            m_codes[i] = encode_dynamic(fmul_ftz(m, rm), s_code_m);
            v_codes[i] = encode_dynamic(fmul_ftz(v, rv), s_code_v);
        }
        if (threadIdx.x == 0) {  // every thread read absmax[qb] before block_max_256's barrier
            m_absmax[qb] = am;
            v_absmax[qb] = av;
        }
    }
}
