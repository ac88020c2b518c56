"""End-to-end parity as a pinned loss curve (STYLE 16): a tiny Llama trained 10 steps on the numpy backend (CPU) and
on the cupy backend (GPU) gives the same losses within a stated bound.

Setup: the same random weights, the same 4-bit bytes (bit-identical kernels), float32 compute with TF32 off, the same
LoRA init, no dropout, PagedAdamW (CPU fallback vs fused CUDA kernel: both bit-identical to qlora_ref.adamw on equal
inputs).  What differs is only the order of float32 reductions inside torch's CPU and CUDA matmuls and attention.

Bound: a float32 loss carries relative reduction error ~ sqrt(K) u per GEMM chain (K <= 192, u = 2^-24: ~1e-6), which
AdamW amplifies through the normalised update m / sqrt(v) where a gradient element is near zero.  Over 10 steps at
lr 1e-3 we allow |loss_gpu - loss_cpu| <= 1e-3 * loss_cpu at every step: three orders above one step's rounding,
an order below what a wrong gradient (a sign or scale error moves the loss by > 1e-2 within 10 steps) produces.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import TINY_DECODER  # noqa: E402

from backends.torchlib import PagedAdamW, prepare_model, qlora_layers, trainable_parameters  # noqa: E402

STEPS = 10
REL_BOUND = 1e-3


def _tiny(seed: int):
    cfg = transformers.LlamaConfig(**TINY_DECODER)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def _losses(backend: str, device: str) -> list[float]:
    model = _tiny(3)
    prepare_model(
        model, backend=backend, r=4, alpha=8, dropout=0.0, compute_dtype="float32", gradient_checkpointing=False
    )
    torch.manual_seed(4)
    for layer in qlora_layers(model).values():  # the same random A and B on both backends (drawn on the CPU)
        a, b = torch.randn_like(layer.lora_A, device="cpu") * 0.1, torch.randn_like(layer.lora_B, device="cpu") * 0.1
        with torch.no_grad():
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
    model.to(device).train()
    opt = PagedAdamW(trainable_parameters(model), lr=1e-3)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(5)).to(device)
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.gpu
def test_numpy_and_cupy_backends_train_the_same_loss_curve():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu = _losses("numpy", "cpu")
    gpu = _losses("cupy", "cuda")
    assert cpu[-1] < cpu[0]  # it trains
    for step, (a, b) in enumerate(zip(cpu, gpu, strict=True)):
        assert abs(a - b) <= REL_BOUND * abs(a), f"step {step}: cpu {a}, gpu {b} (bound {REL_BOUND} relative)"
