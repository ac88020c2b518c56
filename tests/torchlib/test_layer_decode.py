"""QLoRALinear's decode path: 1..MATVEC_TOKENS rows without gradients go through the backend's 4-bit matvec in any
order (MV-8; cupy: matvec_4bit_v3).

CPU: the path is taken exactly when it should be (no gradient needed, at most 4 rows, not under torch.compile) and
gives the dequantize + GEMM path's result within float32 summation error (the numpy backend's matvec is the spec).
GPU: the CuPy layer takes it by default and agrees with its own GEMM path within a bf16 rounding of each side.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from backends.torchlib.layer import MATVEC_TOKENS, QLoRALinear


def _layer(backend="numpy", out_f=96, in_f=160, seed=0, **kw):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=True)
    layer = QLoRALinear.from_linear(lin, backend=backend, r=4, alpha=8, **kw)
    layer.reset_lora_parameters("random")
    return layer


class _Counting:
    def __init__(self, backend):
        self.backend, self.calls = backend, 0

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def bind_matvec_4bit(self, q, tokens, **kw):
        """The layer's decode path: bound once per token count, each launch counted (with the order it was bound in)."""
        self.binds = getattr(self, "binds", 0) + 1
        launch = self.backend.bind_matvec_4bit(q, tokens, **kw)

        def counted(x, y):
            self.calls += 1
            self.orders = getattr(self, "orders", []) + [kw.get("order", "spec")]
            launch(x, y)

        return counted


def test_decode_path_is_taken_only_without_gradients_and_for_few_tokens():
    layer = _layer()
    assert layer.matvec is False  # numpy: the pair-LUT dequantize + GEMM stays the CPU path
    layer.matvec, layer.backend = True, _Counting(layer.backend)
    assert MATVEC_TOKENS == 4
    x = torch.randn(2, 2, 160)
    with torch.no_grad():
        layer(x)
    assert layer.backend.calls == 1 and layer.backend.orders == ["any"]  # the layer lets the backend pick an order
    layer(x)  # gradients wanted (the LoRA parameters require them): the autograd path
    assert layer.backend.calls == 1
    with torch.no_grad():
        layer(torch.randn(MATVEC_TOKENS + 1, 160))  # more rows: dequantize + GEMM
    assert layer.backend.calls == 1


def test_decode_binds_once_per_token_count_and_again_for_a_new_q():
    layer = _layer()
    layer.matvec, layer.backend = True, _Counting(layer.backend)
    with torch.no_grad():
        a, b = layer(torch.randn(1, 160)), layer(torch.randn(1, 160))
        layer(torch.randn(3, 160))
        assert (layer.backend.binds, layer.backend.calls) == (2, 3)  # T = 1 bound once and launched twice, T = 3
        x = torch.randn(2, 160)
        want = layer(x)
        layer.q = dataclasses.replace(layer.q)  # a replaced base (as a sharded base swaps q): bound again
        got = layer(x)
    assert layer.backend.binds == 4 and torch.equal(got, want) and a.shape == b.shape == (1, 96)


def test_decode_path_equals_the_gemm_path_within_float32_error():
    layer = _layer()
    x = torch.randn(MATVEC_TOKENS, 160)
    with torch.no_grad():
        want = layer(x)
        layer.matvec = True
        got = layer(x)
    # float32 sums in two orders over in = 160 terms: |diff| <= 2 gamma_160 sum |x||w| (+ the LoRA term, same ops)
    bound = 2 * 160 * 2.0**-24 * (x.abs() @ layer.dequantize_weight(torch.float32).abs().t()) + 1e-6
    assert ((got - want).abs() <= bound).all()


@pytest.mark.gpu
def test_gpu_decode_path_agrees_with_the_gemm_path():
    layer = _layer("cupy", out_f=256, in_f=576)
    assert layer.matvec is True and layer.compute_dtype == torch.bfloat16
    x = torch.randn(MATVEC_TOKENS, 576, device="cuda", dtype=torch.bfloat16)
    layer.backend = _Counting(layer.backend)
    with torch.no_grad():
        got = layer(x).float()
        assert layer.backend.calls == 1 and layer.backend.orders == ["any"]  # the cupy kernel of any order (v3)
        layer.matvec = False
        want = layer(x).float()
    # both round a float32 sum to bf16 once (2^-8 relative each) after float32 sums in different orders
    scale = (x.float().abs() @ layer.dequantize_weight(torch.float32).abs().t()) + want.abs()
    assert ((got - want).abs() <= 2.0**-7 * scale + 1e-3).all()
