"""benchmarks/profile_step.py sorts kernels into kinds by name; names as an H200 run recorded them."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.profile_step import kind_of  # noqa: E402

NAMES = {
    "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT": "gemm",
    "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x128_kernel0_0": "attention",
    "void dequantize_4bit_v2<__nv_bfloat16, true, 2>(unsigned char const*, long long, int)": "cupy backend",
    "void rmsnorm_fwd_v1<__nv_bfloat16>(__nv_bfloat16 const*, __nv_bfloat16 const*, __nv_bfloat16*, float*, int)": (
        "cupy backend"
    ),
    "void swiglu_bwd_v2<__nv_bfloat16>(__nv_bfloat16 const*, __nv_bfloat16 const*)": "cupy backend",
    "void rope_v1<__nv_bfloat16>(__nv_bfloat16 const*, __nv_bfloat16 const*)": "cupy backend",
    "void cross_entropy_fwd_v1<__nv_bfloat16>(__nv_bfloat16 const*, long long const*, float*)": "cupy backend",
    "void at::native::(anonymous namespace)::cunn_SoftMaxBackward<4, float, float, float>": "reduction",
    "void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<c10::BFloat16>>": "elementwise",
    "something_else": "other",
}


def test_kernel_names_sort_into_their_kinds():
    assert {name: kind_of(name) for name in NAMES} == NAMES
