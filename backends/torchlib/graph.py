"""A training step's forward + backward captured once as a CUDA graph and replayed: the host out of the way.

    step = CapturedStep(loss_fn, params, example_batch)     # warm-up on a side stream, then one capture
    loss = step(batch)                                       # copy batch into the static inputs, replay the graph
    clip_grad_norm_(params); optimizer.step()                # eager: one fused launch each, reading p.grad

What is captured: ``loss = loss_fn(**static_batch); loss.backward()`` — every kernel of the forward, the recomputed
forward of checkpointed blocks and the backward, in the order eager runs them, so a replay computes what an eager
step computes on the same inputs (the same kernels on the same data; tests/torchlib/test_graph.py checks the bits).
Replaying costs one launch of host time instead of one per op (~20 µs each in eager PyTorch).

The rules a captured region must keep, checked here where they can be:
- static shapes: every batch has the example's shapes and dtypes (bucket or pad sequence lengths; one CapturedStep per
  bucket); a batch of another shape is refused with the shapes named.
- no host synchronisation and no host-side randomness: QLoRA dropout draws its mask seed on the host, so a model with
  dropout > 0 in training is refused (use dropout 0, or the eager step).  Gradient checkpointing must not save RNG
  states (``preserve_rng_state=False``; there is no dropout to replay).
- gradients land in static tensors the capture allocated: after each replay ``p.grad`` is that tensor again (an
  optimizer's ``zero_grad(set_to_none=True)`` in between is harmless), overwritten, not accumulated: accumulate
  micro-batches outside (``accumulate_into``) or capture a step of the whole batch.
The optimizer step and clipping stay outside the graph: PagedAdamW is one fused launch whose step scalars (bias
corrections) change every step, and its non-finite check reads one status word per step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class CaptureError(RuntimeError):
    """The step cannot be captured (the reason says what to change); callers fall back to the eager step."""


def capture_blockers(model) -> list[str]:
    """Why ``model``'s training step cannot be captured as it is configured (empty when it can)."""
    from .layer import QLoRALinear

    why = []
    if model.training and any(m.dropout > 0 for m in model.modules() if isinstance(m, QLoRALinear)):
        why.append("LoRA dropout > 0 draws its mask seed on the host each call (set dropout 0 to capture)")
    if not torch.cuda.is_available():
        why.append("no CUDA device (CUDA graphs are a GPU feature; the CPU step is eager)")
    return why


class CapturedStep:
    """forward + backward of ``loss_fn(**batch)`` as one CUDA graph for one static batch shape (module docstring)."""

    def __init__(
        self,
        loss_fn: Callable[..., torch.Tensor],
        params: list[torch.nn.Parameter],
        example: dict[str, torch.Tensor],
        *,
        warmup: int = 3,
    ):
        if not params:
            raise ValueError("CapturedStep needs the trainable parameters (their .grad are the graph's outputs)")
        if not all(isinstance(v, torch.Tensor) and v.is_cuda for v in example.values()):
            raise ValueError("every tensor of the example batch must be a CUDA tensor (the capture reads them)")
        self.params = list(params)
        self.static = {k: v.detach().clone() for k, v in example.items()}  # the graph's inputs, fixed addresses
        self.shapes = {k: (tuple(v.shape), v.dtype) for k, v in self.static.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):  # warm-up: cuBLAS handles, kernel caches, allocator pools (torch's recipe)
                for _ in range(warmup):
                    for p in self.params:
                        p.grad = None
                    loss_fn(**self.static).backward()
            torch.cuda.current_stream().wait_stream(side)
            for p in self.params:
                p.grad = None  # the capture allocates the gradients in the graph's pool
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.loss = loss_fn(**self.static)
                self.loss.backward()
        except RuntimeError as exc:  # capture refused an op (a host sync, an allocation it cannot make, ...)
            torch.cuda.synchronize()
            raise CaptureError(f"the step could not be captured: {' '.join(str(exc).split())[:300]}") from exc
        missing = [i for i, p in enumerate(self.params) if p.grad is None]
        if missing:
            raise CaptureError(f"{len(missing)} trainable parameters got no gradient in the captured step")
        self.grads = [p.grad for p in self.params]

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Replay on ``batch`` (same keys, shapes and dtypes as the example); returns the static loss tensor."""
        got = {k: (tuple(v.shape), v.dtype) for k, v in batch.items()}
        if got != self.shapes:
            raise ValueError(f"the captured step takes batches shaped {self.shapes}, got {got}; pad or bucket to it")
        for k, v in batch.items():
            self.static[k].copy_(v, non_blocking=True)
        self.graph.replay()
        for p, g in zip(self.params, self.grads, strict=True):
            p.grad = g
        return self.loss

    def accumulate_into(self, acc: list[torch.Tensor]) -> None:
        """acc_i += grad_i for every parameter (micro-batch accumulation outside the graph, one fused launch)."""
        torch._foreach_add_(acc, self.grads)
