"""CapturedStep: a training step's forward + backward as one CUDA graph (backends/torchlib/graph.py).

- CPU: what cannot be captured is named (dropout's host-drawn seeds, no CUDA) and bad input is refused.
- GPU: three optimizer steps of a prepared tiny LLaMA (checkpointing on), captured vs eager, give the same loss and
  the same gradients bit for bit: the replay runs the kernels eager runs, in the same order, on the same data.
  A batch of another shape is refused.  Both with transformers' mask under capture and with causal_only (eager and
  captured steps under it equal the plain eager steps bit for bit).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import assert_process_unharmed_by_refused_capture, spy_sdpa, tiny_prepared_llama

from backends.torchlib import PagedAdamW, trainable_parameters
from backends.torchlib.graph import CapturedStep, CaptureError, capture_blockers
from backends.torchlib.masks import causal_only

transformers = pytest.importorskip("transformers")


def _model(backend="numpy", dropout=0.0, seed=0):
    return tiny_prepared_llama(backend, dropout=dropout, checkpointing=True, seed=seed)


def test_blockers_name_dropout():
    assert any("dropout" in why for why in capture_blockers(_model(dropout=0.1)))
    assert not [w for w in capture_blockers(_model(dropout=0.0)) if "dropout" in w]


def test_refuses_cpu_batches_and_no_params():
    model = _model()
    ids = torch.randint(0, 128, (2, 8))
    with pytest.raises(ValueError, match="trainable parameters"):
        CapturedStep(lambda ids: model(input_ids=ids, labels=ids).loss, [], {"ids": ids})
    with pytest.raises(ValueError, match="CUDA tensor"):
        CapturedStep(lambda ids: model(input_ids=ids, labels=ids).loss, trainable_parameters(model), {"ids": ids})


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["transformers-mask", "causal_only"])
def test_gpu_captured_steps_equal_eager_bit_for_bit(causal, monkeypatch):
    """With causal_only (masks.py) no mask reaches SDPA during the capture (is_causal, as eager); without it
    transformers builds an explicit one there.  Either way the steps equal eager's bit for bit at this size, and
    eager steps under causal_only equal them too."""
    seen = spy_sdpa(monkeypatch, capturing_only=True)
    batches = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(i)).cuda() for i in range(3)]

    def run(captured: bool, unpadded: bool):
        model = _model(backend="cupy", seed=3)
        params = trainable_parameters(model)
        opt = PagedAdamW(params, lr=1e-2)
        loss_fn = lambda ids: model(input_ids=ids, labels=ids).loss  # noqa: E731
        step = None
        losses, grads = [], []
        with causal_only(model) if unpadded else contextlib.nullcontext():
            if captured:
                step = CapturedStep(loss_fn, params, {"ids": batches[0]})
            for ids in batches:
                if step is not None:
                    loss = step({"ids": ids})
                else:
                    loss = loss_fn(ids)
                    loss.backward()
                losses.append(loss.detach().clone())
                grads.append([p.grad.clone() for p in params])
                opt.step()
                opt.zero_grad(set_to_none=True)
        return losses, grads, step

    want_losses, want_grads, _ = run(False, False)
    runs = [run(True, causal)] + ([run(False, True)] if causal else [])
    assert seen and all(call == ((True, True) if causal else (False, False)) for call in seen), seen
    for got_losses, got_grads, _ in runs:
        for i in range(len(batches)):
            assert torch.equal(got_losses[i], want_losses[i]), f"step {i} loss"
            for g, w in zip(got_grads[i], want_grads[i], strict=True):
                assert torch.equal(g, w), f"step {i} gradient"
    step = runs[0][2]
    with pytest.raises(ValueError, match="shaped"):
        step({"ids": batches[0][:, :8]})


@pytest.mark.gpu
def test_gpu_refused_capture_raises_and_leaves_the_process_unharmed():
    """A host read inside the step: CaptureError, and the process is as before: the caller's stream current, the
    CUDA generator usable and where it was, the allocator freeing cross-stream blocks (torch.cuda.graph alone leaves
    all three broken when its capture_end raises; the paged optimizer's and the layer's GPU tests failed after it)."""
    model = _model(backend="cupy")
    ids = torch.randint(0, 128, (2, 8)).cuda()

    def loss_fn(ids):
        loss = model(input_ids=ids, labels=ids).loss
        float(loss)  # a host synchronisation: the capture must refuse it
        return loss

    stream = torch.cuda.current_stream()
    rng = torch.cuda.get_rng_state()
    want = torch.rand(8, device="cuda")
    torch.cuda.set_rng_state(rng)
    with pytest.raises(CaptureError, match="could not be captured|capture failed"):
        CapturedStep(loss_fn, trainable_parameters(model), {"ids": ids}, warmup=0)
    assert_process_unharmed_by_refused_capture(stream, want)
