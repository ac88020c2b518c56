"""Dropout from device memory (backends/torchlib/dropout.py, LORA-8) and the GPU training step (app/gpu_step.py).

CPU (numpy backend): the StepSeed mask is LORA-8's, the layer's forward and backward use the same mask, and a
checkpointed block's recompute sees its forward's mask even without saved RNG states (what a CUDA graph needs).
GPU: the kernel gives the spec's bits, a captured launch draws a new mask per renewed seed, and the Trainer's
captured step equals its eager step bit for bit (losses and LoRA weights), dropout on, checkpointing on.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from conftest import tiny_prepared_llama
from hypothesis import given, settings
from hypothesis import strategies as st

from backends import get_backend
from backends.torchlib import qlora_layers, trainable_parameters
from backends.torchlib.dropout import StepSeed, use_step_seed
from backends.torchlib.graph import capture_blockers
from backends.torchlib.layer import STEP_SEED
from qlora_ref.lora import dropout_keep_counter

transformers = pytest.importorskip("transformers")


def _model(backend="numpy", dropout=0.2, checkpointing=False, seed=0):
    return tiny_prepared_llama(backend, dropout=dropout, checkpointing=checkpointing, seed=seed)


def test_numpy_backend_mask_is_the_spec():
    seed = torch.tensor([-123456789], dtype=torch.int64)
    got = get_backend("numpy").dropout_keep_counter((5, 7), 0.3, seed, 99)
    assert got.dtype == torch.bool
    assert (got.numpy() == dropout_keep_counter((5, 7), 0.3, -123456789, 99)).all()


def test_layer_forward_and_backward_use_the_spec_mask():
    model = _model()
    seeds = use_step_seed(model)
    name, layer = next(iter(qlora_layers(model).items()))
    assert layer.call_seed() == STEP_SEED and layer.seed_salt != 0
    torch.manual_seed(5)
    seeds.renew()
    x = torch.randn(3, 4, layer.in_features, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    # reference: the same math with LORA-8's mask, in float64
    keep = torch.from_numpy(dropout_keep_counter((12, layer.in_features), layer.dropout, seeds.value, layer.seed_salt))
    mask = keep.double() / (1 - layer.dropout)
    A = layer.lora_A.detach().double().requires_grad_()
    B = layer.lora_B.detach().double().requires_grad_()
    x64 = x.detach().double().reshape(12, -1).requires_grad_()
    W = layer.dequantize_weight(torch.float32).double()
    y64 = x64 @ W.T + layer.scaling * ((x64 * mask) @ A.T) @ B.T
    y64.square().sum().backward()
    torch.testing.assert_close(y.detach().double().reshape(12, -1), y64.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.grad.double(), A.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.lora_B.grad.double(), B.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad.double().reshape(12, -1), x64.grad, rtol=1e-4, atol=1e-4)


def _grads(model, ids, renew_seed):
    seeds = use_step_seed(model)
    torch.manual_seed(renew_seed)
    seeds.renew()
    model(input_ids=ids, labels=ids).loss.backward()
    return [p.grad.clone() for p in trainable_parameters(model)]


def test_checkpoint_recompute_sees_the_forward_mask_without_rng_states():
    """preserve_rng_state=False: host seeds would be redrawn in the recompute; the StepSeed mask is not."""
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    plain = _grads(_model(checkpointing=False), ids, 9)
    ckpt = _grads(_model(checkpointing=True), ids, 9)
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = _grads(_model(checkpointing=False), ids, 10)  # another seed: other masks, other gradients
    assert any(not torch.equal(a, b) for a, b in zip(plain, other, strict=True))


def test_renew_draws_from_torch_cpu_generator_and_step_seed_lifts_the_dropout_blocker():
    s = StepSeed("cpu")
    torch.manual_seed(1)
    a = s.renew()
    torch.manual_seed(1)
    assert s.renew() == a and int(s.tensor) == a
    model = _model()
    assert any("dropout" in w for w in capture_blockers(model))
    use_step_seed(model)
    assert not [w for w in capture_blockers(model) if "dropout" in w]
    with pytest.raises(ValueError, match="no QLoRA layers"):
        use_step_seed(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("chunk", [None, 64 * 5])
def test_static_loss_sum_is_the_response_loss_sum(chunk):
    """Its own 4-D mask and the head on every position give evaluate.response_loss_sum's value (right padding)."""
    from backends.app.batching import collate
    from backends.app.data import TokenizedExample
    from backends.app.evaluate import response_loss_sum
    from backends.app.gpu_step import static_loss_sum

    model = _model(dropout=0.0).eval()
    g = torch.Generator().manual_seed(4)
    data = []
    for n in (5, 11, 8):
        ids = torch.randint(2, 128, (n,), generator=g).tolist()
        data.append(TokenizedExample(ids, [-100] * 3 + ids[3:]))
    b = collate(data, 0, 16)
    with torch.no_grad():
        want = response_loss_sum(model, b)
        got = static_loss_sum(model, **b, chunk_elements=chunk)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_finetune_has_the_cuda_graphs_flag():
    from backends.app.cli import build_parser
    from backends.app.config import UsageError

    args = build_parser().parse_args(["finetune", "--cuda-graphs", "off"])
    assert args.cuda_graphs == "off"
    with pytest.raises(UsageError, match="cuda-graphs"):
        build_parser().parse_args(["finetune", "--cuda-graphs", "sometimes"])


# --- GPU -----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@settings(deadline=None)
@given(
    shape=st.lists(st.integers(1, 300), min_size=1, max_size=3),
    p=st.floats(0.0, 0.9),
    seed=st.integers(-(2**63), 2**63 - 1),
    salt=st.integers(0, 2**32 - 1),
)
def test_gpu_kernel_gives_the_spec_bits(shape, p, seed, salt):
    dev = torch.tensor([seed], dtype=torch.int64, device="cuda")
    got = get_backend("cupy").dropout_keep_counter(tuple(shape), p, dev, salt)
    assert got.dtype == torch.bool and got.is_cuda and tuple(got.shape) == tuple(shape)
    assert (got.cpu().numpy() == dropout_keep_counter(tuple(shape), p, seed, salt)).all()


@pytest.mark.gpu
def test_gpu_captured_launch_draws_each_renewed_seed():
    be, seeds = get_backend("cupy"), StepSeed("cuda")
    seeds.renew()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        be.dropout_keep_counter((1000,), 0.25, seeds.tensor, 7)  # warm-up: compile and load the kernel
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        keep = be.dropout_keep_counter((1000,), 0.25, seeds.tensor, 7)
        with pytest.raises(RuntimeError, match="capture"):
            seeds.renew()
    for _ in range(3):
        v = seeds.renew()
        g.replay()
        assert (keep.cpu().numpy() == dropout_keep_counter((1000,), 0.25, v, 7)).all()
    with pytest.raises(ValueError, match="int64 CUDA tensor"):
        be.dropout_keep_counter((4,), 0.1, torch.zeros(1, dtype=torch.int32, device="cuda"), 0)


def _train(cuda_graphs: str, tmp_path, steps=4):
    from backends.app.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from backends.app.data import TokenizedExample
    from backends.app.trainer import Trainer

    model = _model(backend="cupy", dropout=0.1, checkpointing=True, seed=3)
    g = torch.Generator().manual_seed(0)
    data = []
    for n in (9, 12, 14, 20, 7, 16, 11, 13):
        ids = torch.randint(2, 128, (n,), generator=g).tolist()
        data.append(TokenizedExample(ids, [-100] * (n // 2) + ids[n // 2 :]))
    tok = types.SimpleNamespace(pad_token_id=0, eos_token_id=1)
    cfg = RunConfig(ModelConfig(r=4), DataConfig(), TrainConfig(
        output_dir=str(tmp_path), lr=1e-2, batch_size=2, grad_accum=2, max_steps=steps, progress=False,
        cuda_graphs=cuda_graphs))  # fmt: skip
    torch.manual_seed(0)
    trainer = Trainer(model, tok, cfg, data, run_dir=str(tmp_path))
    history = trainer.fit()
    lora = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    return trainer, [h["loss"] for h in history if "loss" in h], lora


@pytest.mark.gpu
def test_gpu_trainer_captured_step_equals_eager_bit_for_bit(tmp_path):
    eager, eager_losses, eager_lora = _train("off", tmp_path / "eager")
    cap, cap_losses, cap_lora = _train("auto", tmp_path / "captured")
    assert eager.gpu.graphs is None and cap.gpu.graphs is not None
    assert cap.gpu.graphs.replays == 4 * 2 and 1 <= len(cap.gpu.graphs.steps) <= 4  # padded to 16: few shapes
    assert eager.gpu.seeds is not None and cap.gpu.seeds is not None
    assert eager_losses == cap_losses and all(np.isfinite(eager_losses))
    for n in eager_lora:
        assert torch.equal(eager_lora[n], cap_lora[n]), n


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.gpu
@settings(deadline=None, max_examples=60)
@given(
    shape=st.lists(st.integers(1, 200), min_size=1, max_size=2),
    p=st.floats(0.0, 0.9),
    seed=st.integers(-(2**63), 2**63 - 1),
    salt=st.integers(0, 2**32 - 1),
    dtypes=st.tuples(st.sampled_from(_DTYPES), st.sampled_from(_DTYPES)),
)
def test_gpu_fused_dropout_gives_the_unfused_bits(shape, p, seed, salt, dtypes):
    """dropout_apply_counter / dropout_add_counter_ (one launch, the mask redrawn inside) against the torch ops on a
    materialised noise tensor, for every pair of dtypes, values spanning subnormals to large ones and a NaN/Inf."""
    from qlora_ref.lora import keep_scale

    be, a, b = get_backend("cupy"), *dtypes
    dev = torch.tensor([seed], dtype=torch.int64, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(abs(seed) % 2**32)
    x = (torch.randn(shape, generator=g, device="cuda") * 10.0 ** torch.randint(-30, 4, shape, device="cuda")).to(a)
    if x.numel() > 1:
        x.view(-1)[0] = float("inf")  # inf * 0 is NaN in both paths
    noise_b = be.dropout_keep_counter(tuple(shape), p, dev, salt).to(b).mul_(keep_scale(p))
    got = be.dropout_apply_counter(x, p, dev, salt, b)
    assert got.dtype == b and got.shape == x.shape
    want = x.to(b) * noise_b
    assert torch.equal(got.float().nan_to_num(nan=7.0), want.float().nan_to_num(nan=7.0))
    assert (torch.signbit(got) == torch.signbit(want)).all()  # x * 0 keeps x's sign, as torch's product does
    acc = torch.randn(shape, generator=g, device="cuda").to(a)
    d = torch.randn(shape, generator=g, device="cuda").to(b)
    want_acc = acc.clone().add_(d * noise_b)
    got_acc = be.dropout_add_counter_(acc, d, p, dev, salt)
    assert got_acc is acc and torch.equal(acc, want_acc)


@pytest.mark.gpu
@pytest.mark.parametrize("lora_dtype", ["float32", "bfloat16"])
def test_gpu_layer_fused_dropout_equals_the_noise_tensor_path(lora_dtype):
    """A QLoRA layer under a StepSeed on cupy (CounterNoise: the fused launches) gives the forward and every gradient
    of the same layer fed the materialised noise tensor (layer.noise), bit for bit."""
    from backends.torchlib.layer import QLoRALinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(192, 320, bias=False).to("cuda", torch.bfloat16)
    layer = QLoRALinear.from_linear(lin, backend="cupy", r=8, dropout=0.1, lora_dtype=lora_dtype, init="random")
    layer.step_seed, layer.seed_salt = StepSeed("cuda"), 12345
    layer.step_seed.renew()
    x = torch.randn(4, 33, 192, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(4, 33, 320, device="cuda", dtype=torch.bfloat16)

    def run():
        layer.lora_A.grad = layer.lora_B.grad = None
        xr = x.clone().requires_grad_()
        y = layer(xr)
        y.backward(dy)
        return y.detach(), xr.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()

    fused = run()
    layer.dropout_factor = lambda shape, seed, dtype: layer.noise(shape, seed, dtype)  # the materialised path
    plain = run()
    for f, q, what in zip(fused, plain, ("y", "dX", "dA", "dB"), strict=True):
        assert torch.equal(f, q), what
