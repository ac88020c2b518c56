// packing.cu — two 4-bit codes per byte, first element in the HIGH nibble, and back.
//
// What (specs/packing.md PK-1..PK-3; reference: qlora_ref/packing.py):
//   pack:   packed[j] = (codes[2j] << 4) | codes[2j+1]      [a, b, c, d] -> [ab, cd]; an odd tail gets `filler`
//   unpack: codes[2j] = packed[j] >> 4, codes[2j+1] = packed[j] & 15, the first n kept
//   pack also reports max(codes) in status[0] (atomicMax; the filler excluded) so Python can reject codes > 15 like
//   the spec does.
// Kernels:
//   pack_4bit_v1 / unpack_4bit_v1   naive: one thread per packed byte.  Second oracle and the unaligned path.
//   pack_4bit_v2 / unpack_4bit_v2   16 packed bytes per thread: 16-byte loads and stores; scalar for the tail.
// Launch configs: backends/cupy_backend/launch.py.  Build: -std=c++17 --fmad=false.
#include "common.cuh"

__global__ void pack_4bit_v1(const u8* __restrict__ codes, i64 n, int filler, u8* __restrict__ packed,
                             u32* __restrict__ status) {
    const i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= (n + 1) / 2) return;
    const u32 a = codes[2 * j];
    const u32 b = (2 * j + 1 < n) ? (u32)codes[2 * j + 1] : (u32)filler;
    atomicMax(status, (2 * j + 1 < n) ? max(a, b) : a);  // the filler is not a code
    packed[j] = (u8)(((a & 15u) << 4) | (b & 15u));
}

__global__ void unpack_4bit_v1(const u8* __restrict__ packed, i64 n, u8* __restrict__ codes) {
    const i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= (n + 1) / 2) return;
    const u32 byte = packed[j];
    codes[2 * j] = (u8)(byte >> 4);
    if (2 * j + 1 < n) codes[2 * j + 1] = (u8)(byte & 15u);
}

__global__ void __launch_bounds__(256) pack_4bit_v2(const u8* __restrict__ codes, i64 n, int filler,
                                                    u8* __restrict__ packed, u32* __restrict__ status) {
    const i64 j0 = ((i64)blockIdx.x * 256 + threadIdx.x) * 16;  // first packed byte of this thread
    const i64 nbytes = (n + 1) / 2;
    if (j0 >= nbytes) return;
    u32 mx = 0;
    if (2 * j0 + 32 <= n) {
        const uint4* src = reinterpret_cast<const uint4*>(codes + 2 * j0);
        const uint4 q0 = __ldg(src), q1 = __ldg(src + 1);
        const u32 w[8] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w};
        u32 out[4];
#pragma unroll
        for (int k = 0; k < 4; k++) {
            u32 o = 0;
#pragma unroll
            for (int h = 0; h < 2; h++) {  // 4 codes of w[2k+h] -> 2 bytes
                const u32 v = w[2 * k + h];
                mx = max(mx, max(max(v & 0xffu, (v >> 8) & 0xffu), max((v >> 16) & 0xffu, v >> 24)));
                const u32 b0 = ((v & 15u) << 4) | ((v >> 8) & 15u);
                const u32 b1 = (((v >> 16) & 15u) << 4) | ((v >> 24) & 15u);
                o |= (b0 | (b1 << 8)) << (16 * h);
            }
            out[k] = o;
        }
        *reinterpret_cast<uint4*>(packed + j0) = make_uint4(out[0], out[1], out[2], out[3]);
    } else {
        for (i64 j = j0; j < min(j0 + 16, nbytes); j++) {
            const u32 a = codes[2 * j];
            const u32 b = (2 * j + 1 < n) ? (u32)codes[2 * j + 1] : (u32)filler;
            mx = max(mx, (2 * j + 1 < n) ? max(a, b) : a);
            packed[j] = (u8)(((a & 15u) << 4) | (b & 15u));
        }
    }
    atomicMax(status, mx);
}

__global__ void __launch_bounds__(256) unpack_4bit_v2(const u8* __restrict__ packed, i64 n, u8* __restrict__ codes) {
    const i64 j0 = ((i64)blockIdx.x * 256 + threadIdx.x) * 16;
    const i64 nbytes = (n + 1) / 2;
    if (j0 >= nbytes) return;
    if (2 * j0 + 32 <= n) {
        const uint4 q = __ldg(reinterpret_cast<const uint4*>(packed + j0));
        const u32 w[4] = {q.x, q.y, q.z, q.w};
        u32 out[8];
#pragma unroll
        for (int k = 0; k < 4; k++) {
#pragma unroll
            for (int h = 0; h < 2; h++) {  // bytes 2h, 2h+1 of w[k] -> 4 codes
                const u32 b0 = (w[k] >> (16 * h)) & 0xffu, b1 = (w[k] >> (16 * h + 8)) & 0xffu;
                out[2 * k + h] = (b0 >> 4) | ((b0 & 15u) << 8) | ((b1 >> 4) << 16) | ((b1 & 15u) << 24);
            }
        }
        uint4* dst = reinterpret_cast<uint4*>(codes + 2 * j0);
        dst[0] = make_uint4(out[0], out[1], out[2], out[3]);
        dst[1] = make_uint4(out[4], out[5], out[6], out[7]);
    } else {
        for (i64 j = j0; j < min(j0 + 16, nbytes); j++) {
            const u32 byte = packed[j];
            codes[2 * j] = (u8)(byte >> 4);
            if (2 * j + 1 < n) codes[2 * j + 1] = (u8)(byte & 15u);
        }
    }
}
