// matvec_4bit.cu — the 4-bit matrix-vector product of decoding: y = x · dequantize(q)^T for 1..16 tokens.
//
// What (specs/matvec.md MV-2 .. MV-5; reference: qlora_ref/matvec.py matvec_4bit, _accumulate):
//   q is [out, in] (flat element f = o*in + j), x is [T, in] (float32 or bf16 bits), y is [T, out].
//     code      = packed[f/2] >> 4 (f even) or & 15 (f odd)          first element in the HIGH nibble (PK-1)
//     w[o, j]   = ftz(table[code] * absmax_hat[f >> log2_bs])        BW-7 / DQ-3, exactly as dequantize_4bit.cu (MV-2)
//     p         = __fmul_rn(x[t, j], w[o, j])                        one float32 multiply, never an FMA (MV-3)
//     s[c]      = ((+0 + p_first) + p_next) + ...                    float32, in j order, over the row's elements in
//                                                                     block b0(o) + c, b0(o) = (o*in) >> log2_bs (MV-4)
//     y32[t, o] = ((+0 + s[0]) + s[1]) + ...                         float32, in segment order
//     y[t, o]   = __float2bfloat16_rn(y32) or y32                    the one rounding of the output (MV-5)
//   Bit for bit qlora_ref.matvec.matvec_4bit: the same products, the same two sequential chains.  The kernels below
//   also add products x * w with x = +0 (padding: positions of a block outside the row, tokens t >= T); such a
//   product is +-0 and s + (+-0) == s exactly, because s starts at +0 and a float32 sum is -0 only when both
//   addends are -0 (the spec pads its segments with +0 the same way).
// Why this shape: the spec's order allows no split of a segment's chain, so the parallelism is one thread per
//   (row, segment): P lanes of a warp take P consecutive segments of one row, 32/P rows per warp.  The weights are
//   read once (16-byte loads of a segment's packed bytes), x is staged in shared memory, the segment sums are
//   combined in order by one thread per (row, token).
//
// Kernels:
//   matvec_4bit_v1<DQ>       naive: one thread per output (t, o), the row's elements in flat order, a new segment sum
//                            at every block boundary.  Second oracle; also the path for an unaligned packed buffer.
//   matvec_4bit_v2<DQ, TP>   fast, same bits: TP = T rounded up to 1, 2, 4, 8 or 16 (accumulators in registers).
//     CTA   NT threads (blockDim.x, 32..256) = ROWS = NT / P rows x P segment lanes: thread tid -> row r = tid / P,
//           lane q = tid % P.  Rows of one CTA share their phase ph = (o*in) % bs (row o = cls + period*m, period =
//           bs / gcd(in, bs), cls = blockIdx.x % classes, classes = min(period, out)), so segment c of each of them
//           covers the same columns j = c*bs + pos - ph (pos = position in its block): one x tile serves them all.  Every row of the class
//           has C = ceil((ph + in) / bs) segments.
//     round k: lane q owns segment c = k*P + q (block b0 + c); its sum s[TP] runs over the block's positions in
//           windows of PW (32, 64 or 128 <= bs) positions:
//             load the window's PW/2 packed bytes (PW/32 uint4, issued before the barrier), barrier,
//             stage the tile  tile[q'][pos][t] = x[t, (k*P + q')*bs + w0 + pos - ph]  (0 outside the row or t >= T),
//             barrier, then pos by pos: w = decode, s[t] += x * w for the TP tokens (x as float4 from the tile: lanes
//             with the same q read the same address, a broadcast; 4 floats of skew per lane slot keep P <= 8
//             distinct lanes in distinct banks).
//           After the last window: barrier, s written to part[r][q][t] (aliasing the tile), barrier, and thread
//           i = r*TP + t adds part[r][0..P-1][t] into yacc[i] in q order, so round by round y32 is the spec's chain.
//     end: thread i rounds yacc[i] once and writes y[t, o].
//   Launch config and (P, PW, period, NT, shared bytes): backends/cupy_backend/launch.py matvec_4bit_v2_config.
//   matvec_4bit_v3<DQ, TP, KU>  any order (MV-8 with any_order=True: FMA and a lane tree, at most in roundings per
//                            term), for the decode layer: in % 32 == 0, blocksize >= 32, packed and x 16-byte
//                            aligned (so a chunk of 32 weights = one uint4 of codes lies in one quant block).
//     warp -> MV3_ROWS = 4 rows o (one x load serves all four); lane l takes the row's chunks c = l, l + 32, ...
//           (32 lanes read 512 contiguous bytes per row), KU chunks' codes and absmax loaded before any is used;
//     per 8 columns: w = the spec's float32 decode (BW-7 / DQ-3, as v1/v2), acc[r][t] = fma(x[t, j], w, acc[r][t]);
//     end: a butterfly over the lanes (__shfl_xor_sync), lane 0 rounds y[t, o] once (MV-5).
//   Launch: backends/cupy_backend/launch.py matvec_4bit_v3_config.
// Build: -std=c++17 --fmad=false (and __fmul_rn / __fadd_rn spelled out).
#include "common.cuh"

// The float32 absmax of block b (qlora_ref Quantized4bit.absmax_f32): stored, or decoded from double quantization
// (DQ-3), the same two roundings as dequantize_4bit.cu's absmax_f32.
template <bool DQ>
__device__ __forceinline__ float mv_absmax_f32(i64 b, const float* __restrict__ absmax,
                                               const u8* __restrict__ absmax_q, const float* __restrict__ code2,
                                               const float* __restrict__ nested_absmax, float offset) {
    if (!DQ) return __ldg(absmax + b);
    return __fadd_rn(fmul_ftz(code2[__ldg(absmax_q + b)], __ldg(nested_absmax + (b >> 8))), offset);
}

// x[idx] widened exactly to float32: bf16 bits (x_bf16 != 0) or float32.
__device__ __forceinline__ float mv_load_x(const void* __restrict__ x, int x_bf16, i64 idx) {
    if (x_bf16) return __uint_as_float((u32)__ldg(reinterpret_cast<const unsigned short*>(x) + idx) << 16);
    return __ldg(reinterpret_cast<const float*>(x) + idx);
}

// The one rounding of the output (MV-5).
__device__ __forceinline__ void mv_store_y(void* __restrict__ y, int y_bf16, i64 idx, float v) {
    if (y_bf16) reinterpret_cast<__nv_bfloat16*>(y)[idx] = __float2bfloat16_rn(v);
    else reinterpret_cast<float*>(y)[idx] = v;
}

// ---------------------------------------------------------------------------------------------------------------
template <bool DQ>
__global__ void matvec_4bit_v1(const u8* __restrict__ packed, int out_f, int in_f, int T, int log2_bs,
                               const float* __restrict__ table, const float* __restrict__ absmax,
                               const u8* __restrict__ absmax_q, const float* __restrict__ code2,
                               const float* __restrict__ nested_absmax, float offset, const void* __restrict__ x,
                               int x_bf16, void* __restrict__ y, int y_bf16) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (i64)T * out_f) return;
    const int t = (int)(i / out_f), o = (int)(i % out_f);
    const i64 f0 = (i64)o * in_f;
    i64 b = f0 >> log2_bs;
    float am = mv_absmax_f32<DQ>(b, absmax, absmax_q, code2, nested_absmax, offset);
    float y32 = 0.0f, s = 0.0f;
    for (int j = 0; j < in_f; j++) {
        const i64 f = f0 + j;
        if ((f >> log2_bs) != b) {  // a new segment: its sum starts from +0, the previous one joins the row's chain
            y32 = __fadd_rn(y32, s);
            s = 0.0f;
            b = f >> log2_bs;
            am = mv_absmax_f32<DQ>(b, absmax, absmax_q, code2, nested_absmax, offset);
        }
        const u32 byte = packed[f >> 1];
        const u32 code = (f & 1) ? (byte & 15u) : (byte >> 4);
        const float w = fmul_ftz(table[code], am);
        s = __fadd_rn(s, __fmul_rn(mv_load_x(x, x_bf16, (i64)t * in_f + j), w));
    }
    y32 = __fadd_rn(y32, s);
    mv_store_y(y, y_bf16, (i64)t * out_f + o, y32);
}

// ---------------------------------------------------------------------------------------------------------------
// 16 packed bytes at byte offset off (16-byte aligned); past the end of packed (the last block) the bytes read 0.
__device__ __forceinline__ uint4 mv_load_chunk(const u8* __restrict__ packed, i64 off, i64 nbytes) {
    if (off + 16 <= nbytes) return __ldg(reinterpret_cast<const uint4*>(packed + off));
    u32 w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int i = 0; i < 16; i++) {
        if (off + i < nbytes) w[i >> 2] |= (u32)packed[off + i] << (8 * (i & 3));
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// Positions of one 32-bit word of packed codes (8 positions, little-endian: byte k holds positions 2k (high nibble)
// and 2k+1 (low)) added into s[TP]; xs points at the tile entry of the word's first position.
template <int TP>
__device__ __forceinline__ void mv_word(u32 word, const float* __restrict__ xs, const float* __restrict__ s_table,
                                        float am, float (&s)[TP]) {
    constexpr int G = TP >= 4 ? 1 : 4 / TP;  // positions per group: one group's x values are max(4, TP) floats
    constexpr int NV = (G * TP) / 4;         // float4 loads per group
#pragma unroll
    for (int g0 = 0; g0 < 8; g0 += G) {
        float xv[G * TP];
#pragma unroll
        for (int v = 0; v < NV; v++) {
            const float4 f = *reinterpret_cast<const float4*>(xs + g0 * TP + 4 * v);
            xv[4 * v] = f.x; xv[4 * v + 1] = f.y; xv[4 * v + 2] = f.z; xv[4 * v + 3] = f.w;
        }
#pragma unroll
        for (int gg = 0; gg < G; gg++) {
            const int e = g0 + gg;                            // position within the word
            const int shift = 8 * (e >> 1) + ((e & 1) ? 0 : 4);  // even position: high nibble
            const float w = fmul_ftz(s_table[(word >> shift) & 15u], am);
#pragma unroll
            for (int t = 0; t < TP; t++) s[t] = __fadd_rn(s[t], __fmul_rn(xv[gg * TP + t], w));
        }
    }
}

constexpr int MV_MAX_CHUNKS = 4;  // PW <= 128 positions = 4 uint4 of packed codes per window

template <bool DQ, int TP>
__global__ void __launch_bounds__(256, 3) matvec_4bit_v2(const u8* __restrict__ packed, i64 nbytes, int out_f, int in_f,
                                                      int T, int log2_bs, const float* __restrict__ table,
                                                      const float* __restrict__ absmax,
                                                      const u8* __restrict__ absmax_q,
                                                      const float* __restrict__ code2,
                                                      const float* __restrict__ nested_absmax, float offset,
                                                      const void* __restrict__ x, int x_bf16, void* __restrict__ y,
                                                      int y_bf16, int period, int classes, int P, int PW) {
    extern __shared__ float4 mv_smem4[];  // float4: 16-byte aligned
    float* smem = reinterpret_cast<float*>(mv_smem4);
    const int NT = blockDim.x, ROWS = NT / P, tid = threadIdx.x;
    const int bs = 1 << log2_bs;
    const int slot = PW * TP + 4;                       // floats per lane slot of the tile (4 of skew)
    const int nyacc = ((ROWS * TP + 3) / 4) * 4;        // keeps the tile 16-byte aligned
    float* s_table = smem;                              // [16]
    float* s_code2 = smem + 16;                         // [256]
    float* yacc = smem + 272;                           // [ROWS * TP]: the row chains y32, one per (row, token)
    float* tile = yacc + nyacc;                         // [P][slot]  x tile, then (aliased) part[ROWS][P + 1][TP]
    float* part = tile;

    for (int i = tid; i < 16; i += NT) s_table[i] = table[i];
    if (DQ) for (int i = tid; i < 256; i += NT) s_code2[i] = code2[i];
    for (int i = tid; i < ROWS * TP; i += NT) yacc[i] = 0.0f;  // read back only by this same thread
    __syncthreads();  // the table and code2 are in shared memory before the first absmax decode

    const int cls = blockIdx.x % classes, grp = blockIdx.x / classes;
    if ((i64)cls + (i64)period * grp * ROWS >= out_f) return;  // no row in this CTA: all of it leaves, uniformly
    const int ph = (int)(((i64)cls * in_f) & (bs - 1));  // the phase of every row of this CTA
    const int C = (ph + in_f + bs - 1) >> log2_bs;       // segments per row
    const int rounds = (C + P - 1) / P;
    const int r = tid / P, q = tid % P;
    const i64 o = (i64)cls + (i64)period * ((i64)grp * ROWS + r);
    const bool row_ok = o < out_f;
    const i64 b0 = row_ok ? ((o * in_f) >> log2_bs) : 0;
    const int nchunks = PW >> 5;
    const int slot4 = slot / 4, tile4 = P * (PW * TP / 4);  // float4 entries: per slot, staged per window

    for (int k = 0; k < rounds; k++) {
        const int c = k * P + q;
        const bool seg_ok = row_ok && c < C;
        const i64 b = b0 + c;
        const float am = seg_ok ? mv_absmax_f32<DQ>(b, absmax, absmax_q, s_code2, nested_absmax, offset) : 0.0f;
        float s[TP];
#pragma unroll
        for (int t = 0; t < TP; t++) s[t] = 0.0f;

        for (int w0 = 0; w0 < bs; w0 += PW) {
            uint4 wq[MV_MAX_CHUNKS];
#pragma unroll
            for (int i = 0; i < MV_MAX_CHUNKS; i++) {
                wq[i] = make_uint4(0u, 0u, 0u, 0u);
                if (seg_ok && i < nchunks) wq[i] = mv_load_chunk(packed, (b << (log2_bs - 1)) + (w0 >> 1) + 16 * i, nbytes);
            }
            __syncthreads();  // A: the previous window's tile (or the previous round's part) is no longer read
            for (int e4 = tid; e4 < tile4; e4 += NT) {
                const int qq = e4 / (PW * TP / 4), f = (e4 - qq * (PW * TP / 4)) * 4;  // float offset in the slot
                float v[4];
#pragma unroll
                for (int ii = 0; ii < 4; ii++) {
                    const int pos = (f + ii) / TP, t = (f + ii) % TP;
                    const int j = (k * P + qq) * bs + w0 + pos - ph;
                    v[ii] = (t < T && j >= 0 && j < in_f) ? mv_load_x(x, x_bf16, (i64)t * in_f + j) : 0.0f;
                }
                reinterpret_cast<float4*>(tile)[qq * slot4 + f / 4] = make_float4(v[0], v[1], v[2], v[3]);
            }
            __syncthreads();  // B: the tile is staged
            if (seg_ok) {
                const float* xs = tile + q * slot;
#pragma unroll
                for (int i = 0; i < MV_MAX_CHUNKS; i++) {
                    if (i < nchunks) {
                        mv_word<TP>(wq[i].x, xs + (32 * i + 0) * TP, s_table, am, s);
                        mv_word<TP>(wq[i].y, xs + (32 * i + 8) * TP, s_table, am, s);
                        mv_word<TP>(wq[i].z, xs + (32 * i + 16) * TP, s_table, am, s);
                        mv_word<TP>(wq[i].w, xs + (32 * i + 24) * TP, s_table, am, s);
                    }
                }
            }
        }
        __syncthreads();  // C: every tile read of this round is done before part overwrites it
        float* mine = part + (r * (P + 1) + q) * TP;
#pragma unroll
        for (int t = 0; t < TP; t++) mine[t] = s[t];
        __syncthreads();  // D: part is written
        for (int i = tid; i < ROWS * TP; i += NT) {
            const int rr = i / TP, t = i % TP;
            float yv = yacc[i];
            for (int qq = 0; qq < P; qq++) yv = __fadd_rn(yv, part[(rr * (P + 1) + qq) * TP + t]);  // segment order
            yacc[i] = yv;
        }
    }
    for (int i = tid; i < ROWS * TP; i += NT) {
        const int rr = i / TP, t = i % TP;
        const i64 orow = (i64)cls + (i64)period * ((i64)grp * ROWS + rr);
        if (orow < out_f && t < T) mv_store_y(y, y_bf16, (i64)t * out_f + orow, yacc[i]);
    }
}

// ---------------------------------------------------------------------------------------------------------------
constexpr int MV3_ROWS = 4;  // rows per warp

// 8 float32 values of x[t, col .. col + 7] (bf16 bits or float32; 16-byte aligned), widened exactly.
__device__ __forceinline__ void mv3_load_x8(const void* __restrict__ x, int x_bf16, i64 idx, float (&v)[8]) {
    if (x_bf16) {
        const uint4 q = __ldg(reinterpret_cast<const uint4*>(reinterpret_cast<const unsigned short*>(x) + idx));
        const u32 c[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int e = 0; e < 8; e++) v[e] = __uint_as_float((e & 1) ? (c[e >> 1] & 0xffff0000u) : (c[e >> 1] << 16));
    } else {
        const float4 a = __ldg(reinterpret_cast<const float4*>(reinterpret_cast<const float*>(x) + idx));
        const float4 b = __ldg(reinterpret_cast<const float4*>(reinterpret_cast<const float*>(x) + idx) + 1);
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    }
}

// The codes and absmax state of KU chunk slots from slot m0 of the warp's rows (zeros where the chunk or the row
// does not exist): issued together, used after.
template <bool DQ, int KU>
__device__ __forceinline__ void mv3_load(const u8* __restrict__ packed, const float* __restrict__ absmax,
                                         const u8* __restrict__ absmax_q, const float* __restrict__ nested_absmax,
                                         i64 o0, int out_f, int in_f, int log2_bs, int nchunk, int lane, int m0,
                                         uint4 (&pk)[KU][MV3_ROWS], u32 (&aq)[KU][MV3_ROWS],
                                         float (&an)[KU][MV3_ROWS]) {
#pragma unroll
    for (int k = 0; k < KU; k++) {
        const int c = (m0 + k) * 32 + lane;
#pragma unroll
        for (int r = 0; r < MV3_ROWS; r++) {
            const i64 o = o0 + r;
            const bool ok = c < nchunk && o < out_f;
            const i64 b = ok ? ((o * in_f + 32 * (i64)c) >> log2_bs) : 0;
            pk[k][r] = ok ? __ldg(reinterpret_cast<const uint4*>(packed + o * (in_f >> 1) + 16 * (i64)c))
                          : make_uint4(0u, 0u, 0u, 0u);
            if (DQ) {
                aq[k][r] = ok ? (u32)__ldg(absmax_q + b) : 0u;
                an[k][r] = ok ? __ldg(nested_absmax + (b >> 8)) : 0.0f;
            } else {
                aq[k][r] = 0u;
                an[k][r] = ok ? __ldg(absmax + b) : 0.0f;
            }
        }
    }
}

template <bool DQ, int TP, int KU>
__global__ void __launch_bounds__(128) matvec_4bit_v3(const u8* __restrict__ packed, int out_f, int in_f, int T,
                                                      int log2_bs, const float* __restrict__ table,
                                                      const float* __restrict__ absmax,
                                                      const u8* __restrict__ absmax_q,
                                                      const float* __restrict__ code2,
                                                      const float* __restrict__ nested_absmax, float offset,
                                                      const void* __restrict__ x, int x_bf16, void* __restrict__ y,
                                                      int y_bf16) {
    __shared__ float s_table[16];
    __shared__ float s_code2[256];
    const int lane = threadIdx.x & 31;
    const i64 o0 = ((i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * MV3_ROWS;  // the warp's first row
    const int nchunk = in_f >> 5;                           // 32-column chunks per row
    const int per_lane = (nchunk + 31) >> 5;                // chunk slots per lane (the last may be empty)

    uint4 pk[KU][MV3_ROWS];
    u32 aq[KU][MV3_ROWS];   // absmax code (DQ), read from s_code2 once the tables are staged
    float an[KU][MV3_ROWS];  // the nested absmax (DQ) or the float32 absmax
    mv3_load<DQ, KU>(packed, absmax, absmax_q, nested_absmax, o0, out_f, in_f, log2_bs, nchunk, lane, 0, pk, aq, an);
    // (the first codes are in flight while the tables are staged)
    for (int i = threadIdx.x; i < 16; i += blockDim.x) s_table[i] = table[i];
    if (DQ) for (int i = threadIdx.x; i < 256; i += blockDim.x) s_code2[i] = code2[i];
    __syncthreads();

    float acc[MV3_ROWS][TP];
#pragma unroll
    for (int r = 0; r < MV3_ROWS; r++)
#pragma unroll
        for (int t = 0; t < TP; t++) acc[r][t] = 0.0f;

    for (int m0 = 0; m0 < per_lane; m0 += KU) {
        if (m0 > 0)
            mv3_load<DQ, KU>(packed, absmax, absmax_q, nested_absmax, o0, out_f, in_f, log2_bs, nchunk, lane, m0, pk,
                             aq, an);
#pragma unroll
        for (int k = 0; k < KU; k++) {
            const int c = (m0 + k) * 32 + lane;
            if (c >= nchunk) continue;  // the lane's codes are zeros here; nothing to add
            float am[MV3_ROWS];
#pragma unroll
            for (int r = 0; r < MV3_ROWS; r++)  // mv_absmax_f32's two roundings (DQ-3), on the prefetched state
                am[r] = DQ ? __fadd_rn(fmul_ftz(s_code2[aq[k][r]], an[k][r]), offset) : an[k][r];
#pragma unroll
            for (int wi = 0; wi < 4; wi++) {  // 8 columns (one 32-bit word of codes per row) at a time
                float w[MV3_ROWS][8];
#pragma unroll
                for (int r = 0; r < MV3_ROWS; r++) {
                    const u32 word = wi == 0 ? pk[k][r].x : wi == 1 ? pk[k][r].y : wi == 2 ? pk[k][r].z : pk[k][r].w;
#pragma unroll
                    for (int e = 0; e < 8; e++) {
                        const int shift = 8 * (e >> 1) + ((e & 1) ? 0 : 4);  // even position: high nibble (PK-1)
                        w[r][e] = fmul_ftz(s_table[(word >> shift) & 15u], am[r]);
                    }
                }
                const i64 col = 32 * (i64)c + 8 * wi;
#pragma unroll
                for (int t = 0; t < TP; t++) {
                    if (t >= T) break;
                    float xv[8];
                    mv3_load_x8(x, x_bf16, (i64)t * in_f + col, xv);
#pragma unroll
                    for (int r = 0; r < MV3_ROWS; r++)
#pragma unroll
                        for (int e = 0; e < 8; e++) acc[r][t] = __fmaf_rn(xv[e], w[r][e], acc[r][t]);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < MV3_ROWS; r++)
#pragma unroll
        for (int t = 0; t < TP; t++)
#pragma unroll
            for (int off = 16; off > 0; off >>= 1)
                acc[r][t] = __fadd_rn(acc[r][t], __shfl_xor_sync(0xffffffffu, acc[r][t], off));
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < MV3_ROWS; r++)
#pragma unroll
            for (int t = 0; t < TP; t++)
                if (o0 + r < out_f && t < T) mv_store_y(y, y_bf16, (i64)t * out_f + o0 + r, acc[r][t]);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// matvec_4bit_v4<DQ, CPT, D>: one token (T = 1), any order (MV-8 with any_order=True), for the decode step's
// LLaMA-sized products (launch.matvec_kernel: in % 32 == 0, 64 <= in / 32 <= 2 * MV4_MAX_THREADS, blocksize >= 32,
// packed and x 16-byte aligned).  Why not v3: at one token the product is bound by instruction issue and by how
// many bytes are in flight, not by arithmetic.  v4 keeps x in registers and streams rows through them:
//   CTA   NT threads (a multiple of 32, <= MV4_MAX_THREADS); thread tid owns the 32-column chunks c = tid + NT*i,
//         i < CPT, of every row, and holds their x values as float32 (CPT * 32 registers, read once per CTA).
//   rows  CTA b takes the rows [b*out/G, (b+1)*out/G) of a grid of G CTAs (one wave: launch.matvec_4bit_v4_config),
//         so the rows are shared to within one; D rows of codes and absmax state are in flight ahead of the row
//         being summed (a ring of D register slots, refilled as each is used).
//   chunk the block's absmax is taken out of the chunk's sum (32 columns lie in one quant block):
//           s = fma over the chunk of x[j] * table[code_j] (two interleaved chains), acc = fma(am, s, acc)
//         one table read (shared memory), one FMA and the code's extraction per weight.  Where |am| < 2^-100 a
//         product t * am of MV-2 could be subnormal and flushed (BW-8), so that chunk takes the spec's per-weight
//         decode w = ftz(t * am) and acc = fma(x, w, acc) instead (every nonzero NF4 / FP4 value has |t| >= 2^-8).
//   rows' sums: part[row][tid] in shared memory; at the end warp w sums the rows w, w + NT/32, ...: NT/32 values
//         per lane, then a butterfly; lane 0 rounds y once (MV-5).
//   The rounding count of MV-8's any-order bullet: relative to x * w with w = fl(t * am), a term passes through
//   at most 17 roundings in its chain (16 FMAs and the chains' join), the product with am, the factor
//   t * am / fl(t * am) (one u), CPT - 1 additions across the thread's chunks, NT/32 - 1 in the lane sum and 5 in
//   the butterfly: 17 + 1 + 1 + (CPT - 1) + (NT/32 - 1) + 5 = 22 + CPT + NT/32 <= 22 + 2 + 16 = 40 <= 64 * 32 <= in
//   roundings (CPT <= 2, NT <= 512, in >= 2048), so the any_order bound (k = in) holds as for v3.
constexpr int MV4_MAX_THREADS = 512;

// Row o's codes and absmax state for the thread's CPT chunks (zeros where the chunk or the row does not exist).
template <bool DQ, int CPT>
__device__ __forceinline__ void mv4_load(const u8* __restrict__ packed, const float* __restrict__ absmax,
                                         const u8* __restrict__ absmax_q, const float* __restrict__ nested_absmax,
                                         i64 o, bool row_ok, int in_f, int log2_bs, int nchunk, int tid, int NT,
                                         uint4 (&pk)[CPT], u32 (&aq)[CPT], float (&an)[CPT]) {
#pragma unroll
    for (int i = 0; i < CPT; i++) {
        const int c = tid + NT * i;
        const bool ok = row_ok && c < nchunk;
        const i64 b = ok ? ((o * in_f + 32 * (i64)c) >> log2_bs) : 0;
        pk[i] = ok ? __ldg(reinterpret_cast<const uint4*>(packed + o * (in_f >> 1) + 16 * (i64)c))
                   : make_uint4(0u, 0u, 0u, 0u);
        if (DQ) {
            aq[i] = ok ? (u32)__ldg(absmax_q + b) : 0u;
            an[i] = ok ? __ldg(nested_absmax + (b >> 8)) : 0.0f;
        } else {
            aq[i] = 0u;
            an[i] = ok ? __ldg(absmax + b) : 0.0f;
        }
    }
}

// The table entry of each position of one word of codes (PK-1: byte k holds positions 2k (high nibble), 2k + 1).
// The codes are cut out four at a time: hi4 / lo4 hold 4 * code of the even / odd positions, one per byte (two
// shifts, two masks), and one byte permute per position moves a byte into place as the shared-memory offset of
// its entry: 1.5 integer operations per weight instead of a shift, a mask and an address add.
__device__ __forceinline__ void mv4_entries(u32 word, const float* __restrict__ s_table, float (&t)[8]) {
    const u32 hi4 = (word >> 2) & 0x3C3C3C3Cu, lo4 = (word << 2) & 0x3C3C3C3Cu;
    const char* base = reinterpret_cast<const char*>(s_table);
#pragma unroll
    for (int k = 0; k < 4; k++) {
        t[2 * k] = *reinterpret_cast<const float*>(base + __byte_perm(hi4, 0u, 0x4440u + k));
        t[2 * k + 1] = *reinterpret_cast<const float*>(base + __byte_perm(lo4, 0u, 0x4440u + k));
    }
}

// acc + am * sum_j x[j] * table[code_j] over one chunk of 32 weights (codes: one uint4, PK-1 order).
__device__ __forceinline__ float mv4_chunk(uint4 codes, const float (&xv)[32], const float* __restrict__ s_table,
                                           float am, float acc) {
    const u32 words[4] = {codes.x, codes.y, codes.z, codes.w};
    if (fabsf(am) >= 0x1p-100f) {
        float s[2] = {0.0f, 0.0f};
#pragma unroll
        for (int wi = 0; wi < 4; wi++) {
            float t[8];
            mv4_entries(words[wi], s_table, t);
#pragma unroll
            for (int e = 0; e < 8; e++) s[e & 1] = __fmaf_rn(xv[8 * wi + e], t[e], s[e & 1]);
        }
        return __fmaf_rn(am, __fadd_rn(s[0], s[1]), acc);
    }
#pragma unroll
    for (int wi = 0; wi < 4; wi++) {
        float t[8];
        mv4_entries(words[wi], s_table, t);
#pragma unroll
        for (int e = 0; e < 8; e++) acc = __fmaf_rn(xv[8 * wi + e], fmul_ftz(t[e], am), acc);
    }
    return acc;
}

template <bool DQ, int CPT, int D>
__global__ void __launch_bounds__(MV4_MAX_THREADS) matvec_4bit_v4(const u8* __restrict__ packed, int out_f, int in_f,
                                                                   int T, int log2_bs, const float* __restrict__ table,
                                                                   const float* __restrict__ absmax,
                                                                   const u8* __restrict__ absmax_q,
                                                                   const float* __restrict__ code2,
                                                                   const float* __restrict__ nested_absmax,
                                                                   float offset, const void* __restrict__ x, int x_bf16,
                                                                   void* __restrict__ y, int y_bf16) {
    extern __shared__ float4 mv4_smem4[];
    float* s_table = reinterpret_cast<float*>(mv4_smem4);  // [16]
    float* s_code2 = s_table + 16;                          // [256]
    float* part = s_code2 + 256;                            // [rows][NT]: each row's per-thread sums
    const int NT = blockDim.x, tid = threadIdx.x, lane = tid & 31;
    const int nchunk = in_f >> 5;
    const i64 r0 = (i64)blockIdx.x * out_f / gridDim.x;
    const int nrows = (int)((i64)(blockIdx.x + 1) * out_f / gridDim.x - r0);

    uint4 pk[D][CPT];
    u32 aq[D][CPT];
    float an[D][CPT];
#pragma unroll
    for (int d = 0; d < D; d++)
        mv4_load<DQ, CPT>(packed, absmax, absmax_q, nested_absmax, r0 + d, d < nrows, in_f, log2_bs, nchunk, tid, NT,
                          pk[d], aq[d], an[d]);
    float xv[CPT][32];  // (the first rows' codes are in flight while x and the tables are read)
#pragma unroll
    for (int i = 0; i < CPT; i++) {
        const int c = tid + NT * i;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            float v[8];
            if (c < nchunk) mv3_load_x8(x, x_bf16, 32 * (i64)c + 8 * k, v);
            else
#pragma unroll
                for (int e = 0; e < 8; e++) v[e] = 0.0f;
#pragma unroll
            for (int e = 0; e < 8; e++) xv[i][8 * k + e] = v[e];
        }
    }
    for (int i = tid; i < 16; i += NT) s_table[i] = table[i];
    if (DQ) for (int i = tid; i < 256; i += NT) s_code2[i] = code2[i];
    __syncthreads();

    for (int base = 0; base < nrows; base += D) {
#pragma unroll
        for (int d = 0; d < D; d++) {
            const int ri = base + d;
            if (ri < nrows) {  // uniform over the CTA
                float acc = 0.0f;
#pragma unroll
                for (int i = 0; i < CPT; i++) {  // mv_absmax_f32's two roundings (DQ-3), on the prefetched state
                    const float am = DQ ? __fadd_rn(fmul_ftz(s_code2[aq[d][i]], an[d][i]), offset) : an[d][i];
                    acc = mv4_chunk(pk[d][i], xv[i], s_table, am, acc);
                }
                part[ri * NT + tid] = acc;
                mv4_load<DQ, CPT>(packed, absmax, absmax_q, nested_absmax, r0 + ri + D, ri + D < nrows, in_f, log2_bs,
                                  nchunk, tid, NT, pk[d], aq[d], an[d]);
            }
        }
    }
    __syncthreads();
    for (int ri = tid >> 5; ri < nrows; ri += NT >> 5) {
        float v = 0.0f;
        for (int k = lane; k < NT; k += 32) v = __fadd_rn(v, part[ri * NT + k]);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, off));
        if (lane == 0) mv_store_y(y, y_bf16, r0 + ri, v);
    }
}
