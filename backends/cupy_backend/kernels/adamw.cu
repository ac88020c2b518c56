// adamw.cu — fused multi-tensor AdamW for qlora-ref's PagedAdamW (backends/optim/paged.py).
//
// What: one launch updates every parameter of an optimizer: a table of TensorArgs (pointers, sizes, per-tensor
// float32 scalars) and a block table (tensor index, chunk index) let each CUDA block update one chunk of one tensor.
// States m, v live in CUDA managed memory (or ordinary device memory) and are read/written in place; parameters and
// gradients are torch tensors read through their device pointers (zero-copy, like a DLPack view).
//
// Reference: qlora_ref/adamw.py (AD-1 .. AD-4) — the executable spec this must match bit for bit:
//     m = b1*m + (1-b1)*g ;  v = b2*v + (1-b2)*(g*g)
//     p = p + step_size * (m / (sqrt(v) + eps*c2))      step_size = -lr*c2/c1, c1 = 1-b1^t, c2 = sqrt(1-b2^t)
//     decay "after": p = p*(1-lr*wd) after the step; "before": before it.
// The scalars (b1, 1-b1, b2, 1-b2, step_size, eps*c2, 1-lr*wd) are computed ON THE HOST by the same numpy float32
// expressions as the spec and passed in the table, so no powf runs here.  Per element only IEEE-exact ops remain
// (mul, add, div, sqrt, all correctly rounded), which is why the build options are --fmad=false (no contraction of
// b1*m + (1-b1)*g into an FMA), --prec-div=true, --prec-sqrt=true, --ftz=false and no fast math: with them every
// element is bit-identical to numpy's float32 evaluation.  Low-precision params (bf16/fp16) are widened to float32,
// updated, and rounded once to nearest-even, as torch's .to(dtype) does on the CPU path.
//
// 8-bit states (ADAMW-6..8, SPEC-NOTES 1.10): blockwise dynamic-map codes, 256 values per block: m with the signed
// map, v with the unsigned map.  One CUDA block of 256 threads walks the quantization blocks of its chunk, with the
// spec's blockwise rules (qlora_ref/blockwise.py, which reproduces bitsandbytes' fast-math build, BW-3 / BW-8):
//     dequantize   s = ftz(code[c] * absmax)                           mul.rn.ftz.f32
//     update       the 32-bit step above (IEEE, p from the unquantized s)
//     absmax'      ftz(max |s'|) over the block (NaN propagates like np.max)
//     requantize   y = ftz(ftz(s') * rcp(absmax'))                     rcp.approx.ftz.f32, mul.rn.ftz.f32
//                  code = encode_dynamic(y): 7 halving steps from pivot 127, then the midpoint rule (DQ-2)
//
// Kernels:
//   adamw32_multi — 32-bit states; each thread ILP elements strided by blockDim (coalesced), chunk given by the host.
//   adamw8_multi  — 8-bit blockwise states; blockDim must be 256 (one thread per element of a quantization block).
//   adamw32_naive — v1: one thread per element of one tensor (grid over n), the second oracle for tests.

#include "common.cuh"  // rcp_approx_ftz, fmul_ftz, ftz (the spec's fast-math rules); cuda_bf16.h, cuda_fp16.h

struct TensorArgs {                      // 96 bytes, mirrored by _ARGS_DTYPE in backends/optim/paged.py
    unsigned long long p, g, m, v;       // param (T), grad (T), m and v (float32 or uint8 codes)
    unsigned long long m_absmax, v_absmax;  // float32[ceil(n/256)], 8-bit states only
    long long n;                         // elements
    int dtype;                           // T: 0 float32, 1 bfloat16, 2 float16
    int decay_before;                    // 1: p*(1-lr*wd) before the Adam step (torch), 0: after (bitsandbytes)
    float b1, one_minus_b1, b2, one_minus_b2;
    float step_size, eps_c2, decay, pad_;
};
static_assert(sizeof(TensorArgs) == 96, "TensorArgs must match _ARGS_DTYPE");

__device__ __forceinline__ float load_t(unsigned long long ptr, long long i, int dtype) {
    if (dtype == 0) return reinterpret_cast<const float*>(ptr)[i];
    if (dtype == 1) return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(ptr)[i]);
    return __half2float(reinterpret_cast<const __half*>(ptr)[i]);
}

__device__ __forceinline__ void store_t(unsigned long long ptr, long long i, int dtype, float x) {
    if (dtype == 0) reinterpret_cast<float*>(ptr)[i] = x;
    else if (dtype == 1) reinterpret_cast<__nv_bfloat16*>(ptr)[i] = __float2bfloat16_rn(x);
    else reinterpret_cast<__half*>(ptr)[i] = __float2half_rn(x);
}

// The spec's per-element update (AD-2, AD-3), one float32 op at a time.
__device__ __forceinline__ void adamw_element(const TensorArgs& a, float& p, float g, float& m, float& v) {
    if (a.decay_before) p = p * a.decay;
    m = a.b1 * m + a.one_minus_b1 * g;
    v = a.b2 * v + a.one_minus_b2 * (g * g);
    p = p + a.step_size * (m / (sqrtf(v) + a.eps_c2));
    if (!a.decay_before) p = p * a.decay;
}

// ---- 32-bit states ------------------------------------------------------------------------------------------------

#define ILP 4

extern "C" __global__ void adamw32_multi(const TensorArgs* __restrict__ args, const int2* __restrict__ blocks,
                                         long long chunk) {
    const int2 bt = blocks[blockIdx.x];  // (tensor index, chunk index)
    const TensorArgs a = args[bt.x];
    const long long start = (long long)bt.y * chunk;
    const long long end = min(start + chunk, a.n);
    float* m_ptr = reinterpret_cast<float*>(a.m);
    float* v_ptr = reinterpret_cast<float*>(a.v);
    const long long stride = (long long)blockDim.x * ILP;
    for (long long base = start + threadIdx.x; base < end; base += stride) {
        float p[ILP], g[ILP], m[ILP], v[ILP];
#pragma unroll
        for (int k = 0; k < ILP; ++k) {
            const long long i = base + (long long)k * blockDim.x;
            if (i < end) {
                p[k] = load_t(a.p, i, a.dtype);
                g[k] = load_t(a.g, i, a.dtype);
                m[k] = m_ptr[i];
                v[k] = v_ptr[i];
            }
        }
#pragma unroll
        for (int k = 0; k < ILP; ++k) {
            const long long i = base + (long long)k * blockDim.x;
            if (i < end) {
                adamw_element(a, p[k], g[k], m[k], v[k]);
                store_t(a.p, i, a.dtype, p[k]);
                m_ptr[i] = m[k];
                v_ptr[i] = v[k];
            }
        }
    }
}

// v1: one thread per element of one tensor; the plain port, kept as a second oracle.
extern "C" __global__ void adamw32_naive(const TensorArgs* __restrict__ args, int tensor) {
    const TensorArgs a = args[tensor];
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= a.n) return;
    float p = load_t(a.p, i, a.dtype);
    float m = reinterpret_cast<float*>(a.m)[i];
    float v = reinterpret_cast<float*>(a.v)[i];
    adamw_element(a, p, load_t(a.g, i, a.dtype), m, v);
    store_t(a.p, i, a.dtype, p);
    reinterpret_cast<float*>(a.m)[i] = m;
    reinterpret_cast<float*>(a.v)[i] = v;
}

// ---- 8-bit blockwise states ---------------------------------------------------------------------------------------

#define QBLOCK 256

// np.max semantics: NaN wins.
__device__ __forceinline__ float nanmax(float x, float y) { return (x > y || isnan(x)) ? x : y; }

// qlora_ref.blockwise.encode_dynamic, scalar form (DQ-2): 7 halving steps from pivot 127, then the midpoint rule.
__device__ __forceinline__ unsigned char encode_dynamic(float y, const float* code) {
    int pivot = 127, upper_pivot = 255, lower_pivot = 0;
    float lower = -1.0f, upper = 1.0f;
    float val = code[pivot];
    for (int step = 64; step > 0; step >>= 1) {
        if (y > val) {
            lower_pivot = pivot;
            lower = val;
            pivot += step;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= step;
        }
        val = code[pivot];
    }
    if (upper_pivot == 255) upper = code[255];
    if (lower_pivot == 0) lower = code[0];
    int out = pivot;
    if (y > val) {
        if (y > (upper + val) * 0.5f) out = upper_pivot;
    } else {
        if (y < (lower + val) * 0.5f) out = lower_pivot;
    }
    return (unsigned char)out;
}

// Block-wide max over 256 threads (exact: max is order-independent, NaN propagates).
__device__ __forceinline__ float block_max_256(float x, float* scratch) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) x = nanmax(x, __shfl_xor_sync(0xffffffffu, x, off));
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    float r = scratch[0];
#pragma unroll
    for (int w = 1; w < QBLOCK / 32; ++w) r = nanmax(r, scratch[w]);
    __syncthreads();  // scratch is reused by the next call
    return r;
}

extern "C" __global__ void adamw8_multi(const TensorArgs* __restrict__ args, const int2* __restrict__ blocks,
                                        int qblocks_per_chunk, const float* __restrict__ code_m,
                                        const float* __restrict__ code_v) {
    __shared__ float s_code_m[256], s_code_v[256], scratch_m[QBLOCK / 32], scratch_v[QBLOCK / 32];
    s_code_m[threadIdx.x] = code_m[threadIdx.x];
    s_code_v[threadIdx.x] = code_v[threadIdx.x];
    __syncthreads();
    const int2 bt = blocks[blockIdx.x];
    const TensorArgs a = args[bt.x];
    unsigned char* m_codes = reinterpret_cast<unsigned char*>(a.m);
    unsigned char* v_codes = reinterpret_cast<unsigned char*>(a.v);
    float* m_absmax = reinterpret_cast<float*>(a.m_absmax);
    float* v_absmax = reinterpret_cast<float*>(a.v_absmax);
    const long long nqb = (a.n + QBLOCK - 1) / QBLOCK;
    const long long qb0 = (long long)bt.y * qblocks_per_chunk;
    const long long qb1 = min(qb0 + qblocks_per_chunk, nqb);
    for (long long qb = qb0; qb < qb1; ++qb) {
        const long long i = qb * QBLOCK + threadIdx.x;
        const bool valid = i < a.n;
        float p = 0.0f, m = 0.0f, v = 0.0f;
        if (valid) {
            p = load_t(a.p, i, a.dtype);
            const float g = load_t(a.g, i, a.dtype);
            m = fmul_ftz(s_code_m[m_codes[i]], m_absmax[qb]);  // DQ-3 dequantize (BW-8: flushed)
            v = fmul_ftz(s_code_v[v_codes[i]], v_absmax[qb]);
            adamw_element(a, p, g, m, v);
        }
        // BW-2, BW-8: new absmax over the valid items (padding counts as 0), subnormal flushed
        const float am = ftz(block_max_256(valid ? fabsf(m) : 0.0f, scratch_m));
        const float av = ftz(block_max_256(valid ? fabsf(v) : 0.0f, scratch_v));
        if (valid) {
            store_t(a.p, i, a.dtype, p);
            const float rm = rcp_approx_ftz(am), rv = rcp_approx_ftz(av);  // BW-3: 1/0 = inf, then 0*inf = NaN -> 0
            m_codes[i] = encode_dynamic(fmul_ftz(m, rm), s_code_m);
            v_codes[i] = encode_dynamic(fmul_ftz(v, rv), s_code_v);
        }
        if (threadIdx.x == 0) {  // every thread read absmax[qb] before block_max_256's barrier
            m_absmax[qb] = am;
            v_absmax[qb] = av;
        }
    }
}
