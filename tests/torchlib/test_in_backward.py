"""Stepping inside backward (PagedAdamW.hook_into_backward, backends/torchlib/in_backward.py): the same values as
backward() then step(), the deferred non-finite check per tensor, read back without waiting; on CUDA the side stream.
"""

from __future__ import annotations

import pytest
import torch

from backends.torchlib import PagedAdamW
from qlora_ref.checks import NonFiniteError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _net(device, depth: int = 0):
    """48 -> 32 -> (depth x 32 -> 32) -> 8 linears with tanh between; 2 * (depth + 2) tensors."""
    g = torch.Generator().manual_seed(0)
    mid = [m for _ in range(depth) for m in (torch.nn.Linear(32, 32), torch.nn.Tanh())]
    net = torch.nn.Sequential(torch.nn.Linear(48, 32), torch.nn.Tanh(), *mid, torch.nn.Linear(32, 8))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net.to(device), torch.randn(5, 48, generator=g).to(device)


def _train(device, hooked: bool, steps=3, poison=None, overlap=False, group=16, **kw):
    """Params after `steps` steps; poison: {step: param index} makes that parameter's gradient NaN in that step."""
    net, x = _net(device)
    params = list(net.parameters())
    opt = PagedAdamW(params, lr=1e-2, weight_decay=0.1, **kw)
    if hooked:
        opt.hook_into_backward(overlap=overlap, group=group)
    poison = poison or {}
    state = {"step": 0}
    for k, p in enumerate(params):
        p.register_hook(lambda g, k=k: g * float("nan") if poison.get(state["step"]) == k else g)
    for s in range(steps):
        state["step"] = s
        net(x).square().mean().backward()
        if hooked:
            assert all(p.grad is None for p in params), "the hooks must free every gradient"
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return [p.detach().cpu().clone() for p in params], opt, net, x


def _devices():
    return ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, cuda])]


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("check", [True, False, "deferred"])
def test_hooked_steps_equal_backward_then_step(device, check):
    want, _, _, _ = _train(device, False, check_finite=check)
    for overlap, group in ((False, 16), (True, 16), (False, 1), (False, 3)):
        got, opt, _, _ = _train(device, True, check_finite=check, overlap=overlap, group=group)
        for a, b in zip(want, got, strict=True):
            assert torch.equal(a, b), (check, overlap, group)
        opt.raise_if_nonfinite()
        assert all(opt.state[p]["step"] == 3 for p in opt._params)


@pytest.mark.parametrize("device", _devices())
def test_deferred_nan_leaves_its_tensor_unstepped_and_raises_later(device):
    """A NaN gradient in backward 2 (of 3): that tensor keeps its values and count, the others step; no raise in
    that backward, NonFiniteError from the next one (the flag read back without a wait), and training goes on."""
    before, _, _, _ = _train(device, True, steps=1, check_finite="deferred")
    net, x = _net(device)
    params = list(net.parameters())
    opt = PagedAdamW(params, lr=1e-2, weight_decay=0.1, check_finite="deferred")
    opt.hook_into_backward(group=1)
    poisoned = 2
    flag = {"on": False}
    params[poisoned].register_hook(lambda g: g * float("nan") if flag["on"] else g)
    net(x).square().mean().backward()  # step 1: all finite
    after1 = [p.detach().cpu().clone() for p in params]
    for a, b in zip(before, after1, strict=True):
        assert torch.equal(a, b)
    flag["on"] = True
    net(x).square().mean().backward()  # step 2: the NaN, skipped on the device, nothing raised yet
    flag["on"] = False
    after2 = [p.detach().cpu().clone() for p in params]
    assert torch.equal(after2[poisoned], after1[poisoned]), "a NaN gradient must write nothing"
    assert all(not torch.equal(after2[k], after1[k]) for k in range(len(params)) if k != poisoned)
    assert all(torch.isfinite(p).all() for p in after2)
    with pytest.raises(NonFiniteError, match=r"1 tensor\(s\) \(optimizer index 2\)"):
        net(x).square().mean().backward()  # step 3 reads step 2's flags
    assert opt.state[params[poisoned]]["step"] == 1, "the skipped step's count is undone"
    opt.zero_grad(set_to_none=True)  # the aborted backward's gradients
    net(x).square().mean().backward()  # training goes on
    opt.raise_if_nonfinite()
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("device", _devices())
def test_deferred_nan_is_raised_by_raise_if_nonfinite_and_state_dict(device):
    for read in ("raise_if_nonfinite", "state_dict"):
        _, opt, _, _ = _train(device, True, steps=1, poison={0: 1}, check_finite="deferred", group=1)
        with pytest.raises(NonFiniteError, match="optimizer index 1"):
            getattr(opt, read)()
        assert opt.state[opt._params[1]]["step"] == 0
        assert opt.state[opt._params[0]]["step"] == 1
        opt.state_dict()  # read once: nothing left to raise


@pytest.mark.parametrize("device", _devices())
def test_deferred_nan_in_a_group_leaves_the_whole_group_unstepped(device):
    """group=2 over 4 tensors hooked in the order 3, 2, 1, 0 (backward reaches the last layer first): a NaN in
    tensor 1's gradient skips its group {1, 0}; {3, 2} steps."""
    start, _, _, _ = _train(device, True, steps=0)
    got, opt, _, _ = _train(device, True, steps=1, poison={0: 1}, check_finite="deferred", group=2)
    assert [torch.equal(a, b) for a, b in zip(start, got, strict=True)] == [True, True, False, False]
    with pytest.raises(NonFiniteError, match=r"2 tensor\(s\) \(optimizer index [01], [01]\)"):
        opt.raise_if_nonfinite()
    assert [opt.state[p]["step"] for p in opt._params] == [0, 0, 1, 1]


def test_group_must_be_a_positive_int():
    net, _ = _net("cpu")
    opt = PagedAdamW(list(net.parameters()), check_finite="deferred")
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="group must be a positive int"):
            opt.hook_into_backward(group=bad)


def test_hook_into_backward_twice_replaces_the_hooks():
    net, x = _net("cpu")
    opt = PagedAdamW(list(net.parameters()), lr=1e-2, check_finite="deferred")
    handles = opt.hook_into_backward()
    for h in handles:
        h.remove()
    opt.hook_into_backward()
    net(x).sum().backward()
    assert all(opt.state[p]["step"] == 1 for p in opt._params), "each tensor stepped once, not twice"


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("placement", ["device", "host"])
def test_gpu_deferred_hooks_never_wait_for_the_gpu(placement):
    """Hooked steps under check_finite="deferred" issued behind a ~1 s GPU sleep: backward() returns while the
    stream is still busy (no hook synchronised), and the parameters equal an idle-stream run's bit for bit.  40
    tensors: more one-tensor steps than the optimizer's caches of launch tables hold entries."""

    def run(busy: bool):
        net, x = _net("cuda", depth=18)
        params = list(net.parameters())
        opt = PagedAdamW(params, lr=1e-2, placement=placement, check_finite="deferred", page_threshold_bytes=0)
        opt.hook_into_backward()
        still_busy = False
        for step in range(3):
            if busy and step == 1:
                torch.cuda.synchronize()
                torch.cuda._sleep(1 << 31)
            net(x).square().mean().backward()
            if busy and step == 1:
                still_busy = not torch.cuda.current_stream().query()
        torch.cuda.synchronize()
        opt.raise_if_nonfinite()
        return still_busy, [p.detach().clone() for p in params]

    busy, got = run(True)
    _, want = run(False)
    assert busy, "a hooked step waited for the stream to drain"
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


@pytest.mark.gpu
@cuda
def test_gpu_overlap_runs_the_steps_on_a_side_stream_joined_after_backward():
    """With overlap the AdamW kernels run on the side stream; after backward() the caller's stream has waited for it,
    so a read of a parameter there sees the stepped value (compared with the overlap=False run)."""
    net, x = _net("cuda")
    params = list(net.parameters())
    opt = PagedAdamW(params, lr=1e-2, weight_decay=0.1, check_finite="deferred")
    opt.hook_into_backward(overlap=True)
    side = opt._hooked.side
    assert side is not None and side != torch.cuda.current_stream()
    net(x).square().mean().backward()
    got = [p.detach().clone() for p in params]  # queued on the caller's stream, after the join
    want, _, _, _ = _train("cuda", True, steps=1, check_finite="deferred", overlap=False)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.cpu(), w)
