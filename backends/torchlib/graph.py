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
- no host synchronisation and no host-side randomness: an eager QLoRA layer draws its dropout seed on the host, so a
  model with dropout > 0 is refused unless its layers read a StepSeed (dropout.py, LORA-8: the mask from a seed in
  device memory, renewed before each replay).  Gradient checkpointing must not save RNG states
  (``preserve_rng_state=False``; under a StepSeed the masks do not depend on any RNG state).
- gradients land in static tensors the capture allocated: after each replay ``p.grad`` is that tensor again (an
  optimizer's ``zero_grad(set_to_none=True)`` in between is harmless), overwritten, not accumulated: accumulate
  micro-batches outside (``accumulate_into``) or capture a step of the whole batch.
- attention masks: transformers cannot tell while capturing that a batch is unpadded and unpacked (it would read
  values), so it hands SDPA an explicit causal mask and SDPA runs its masked kernels (2.7x the causal ones measured);
  build the step under ``masks.causal_only(model)`` when the batches carry no attention_mask / position_ids.
The optimizer step and clipping stay outside the graph: PagedAdamW is one fused launch whose step scalars (bias
corrections) change every step, and its non-finite check reads one status word per step.

``StepGraphs`` keeps one CapturedStep per batch shape (bucketed lengths), captured the first time a shape is seen, all
sharing one memory pool (they never run at once; each replay's outputs are read before the next replay), up to
``max_graphs``; a shape it cannot capture runs eager (``None`` from the call), and the reason is said once.
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
    host_seeded = [m for m in model.modules() if isinstance(m, QLoRALinear) and m.dropout > 0 and m.step_seed is None]
    if model.training and host_seeded:
        why.append(
            "LoRA dropout > 0 draws its mask seed on the host each call "
            "(use_step_seed(model) draws it from device memory; or set dropout 0)"
        )
    if not torch.cuda.is_available():
        why.append("no CUDA device (CUDA graphs are a GPU feature; the CPU step is eager)")
    return why


def capture(graph, fn, *, pool=None):
    """``fn()`` recorded into ``graph`` (torch.cuda.graph); returns what fn returns, or raises CaptureError.

    A refused capture leaves the process as it was before (`_recover_from_refused_capture`): torch.cuda.graph's
    ``__exit__`` raises from ``capture_end`` part way through its bookkeeping, and what it skips would otherwise break
    every later launch of the process."""
    caller = torch.cuda.current_stream()
    pool = torch.cuda.graph_pool_handle() if pool is None else pool  # named here: a refusal must end its routing
    try:
        with torch.cuda.graph(graph, pool=pool):
            return fn()
    except RuntimeError as exc:  # an op the capture refuses (a host sync, an allocation it cannot make, ...)
        _recover_from_refused_capture(pool, caller)
        raise CaptureError(f"the capture failed: {' '.join(str(exc).split())[:300]}") from exc


def _recover_from_refused_capture(pool, caller) -> None:
    """Undo what a ``capture_end`` that raised left half done (read in torch's CUDAGraph.cpp; checked on the GPU by
    tests/torchlib/test_graph.py, each in the state a later caller sees):

    - the current stream: ``__exit__`` restores the caller's stream only after ``capture_end`` returns;
    - the caching allocator: where ``cudaStreamEndCapture``'s error is raised before ``endAllocateToPool``, the graph's
      pool stays registered as "capture under way", and while any is, the allocator defers every free of a block used
      on another stream (``record_stream``) until no capture runs: those blocks are never reused or released;
    - the CUDA generator: the capture epilogue never runs, so it still believes it is capturing and refuses every
      later random op ("Offset increment outside graph capture"); one tiny capture that ends cleanly runs the
      prologue/epilogue pair again, leaving the seed and offset where the refused capture found them.
    Each step is harmless where torch already did it itself (the allocator call then raises and is ignored).
    Not undone: the blocks the refused capture allocated stay in its private pool until the process ends (torch
    releases a pool only through a successful graph's destructor; releasing it by hand risks a double release), so
    a refused capture costs its own activations' memory once.
    """
    torch.cuda.set_stream(caller)
    torch.cuda.synchronize()
    device = torch.cuda.current_device()
    try:  # (the refused graph's own pool() raises: it names only a successful capture's pool)
        torch._C._cuda_endAllocateToPool(device, pool)
    except (AttributeError, RuntimeError):  # torch ended it before raising, or names it otherwise
        pass
    scratch = torch.zeros(1, device="cuda")
    clean = torch.cuda.CUDAGraph()
    with torch.cuda.graph(clean):
        scratch.add_(1)
    del clean
    torch.cuda.synchronize()


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def batch_shapes(batch: dict[str, torch.Tensor]) -> dict:
    return {k: (tuple(v.shape), v.dtype) for k, v in batch.items()}


class CapturedStep:
    """forward + backward of ``loss_fn(**batch)`` as one CUDA graph for one static batch shape (module docstring).

    ``loss_fn`` returns the loss to backpropagate, or a tuple whose first element is it; every element is a static
    output (``outputs``), overwritten by each replay.  ``pool``: a memory pool shared with other captures."""

    def __init__(
        self,
        loss_fn: Callable[..., torch.Tensor],
        params: list[torch.nn.Parameter],
        example: dict[str, torch.Tensor],
        *,
        warmup: int = 3,
        pool=None,
    ):
        if not params:
            raise ValueError("CapturedStep needs the trainable parameters (their .grad are the graph's outputs)")
        if not all(isinstance(v, torch.Tensor) and v.is_cuda for v in example.values()):
            raise ValueError("every tensor of the example batch must be a CUDA tensor (the capture reads them)")
        self.params = list(params)
        self.static = {k: v.detach().clone() for k, v in example.items()}  # the graph's inputs, fixed addresses
        self.shapes = batch_shapes(self.static)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):  # warm-up: cuBLAS handles, kernel caches, allocator pools (torch's recipe)
                for _ in range(warmup):
                    for p in self.params:
                        p.grad = None
                    _as_tuple(loss_fn(**self.static))[0].backward()
            torch.cuda.current_stream().wait_stream(side)
            for p in self.params:
                p.grad = None  # the capture allocates the gradients in the graph's pool
            self.graph = torch.cuda.CUDAGraph()

            def record():
                outputs = _as_tuple(loss_fn(**self.static))
                outputs[0].backward()
                return outputs

            outputs = capture(self.graph, record, pool=pool)
            # the static outputs, detached: holding their autograd graph would keep the capture's AccumulateGrad
            # nodes (bound to the capture stream) alive into later backwards
            self.outputs = tuple(o.detach() for o in outputs)
            self.loss = self.outputs[0]
        except CaptureError:
            raise
        except RuntimeError as exc:  # the warm-up failed (on its side stream, restored by torch.cuda.stream)
            torch.cuda.synchronize()
            raise CaptureError(f"the step could not be captured: {' '.join(str(exc).split())[:300]}") from exc
        missing = [i for i, p in enumerate(self.params) if p.grad is None]
        if missing:
            raise CaptureError(f"{len(missing)} trainable parameters got no gradient in the captured step")
        self.grads = [p.grad for p in self.params]

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Replay on ``batch`` (same keys, shapes and dtypes as the example); returns the static loss tensor."""
        got = batch_shapes(batch)
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


class StepGraphs:
    """One CapturedStep per batch shape, captured when the shape is first seen (module docstring).

    ``graphs(batch)`` replays the step for batch's shape and returns its outputs (a tuple), or None when the shape
    is not captured (over ``max_graphs``, or its capture failed): the caller runs that batch eagerly.  ``say`` gets
    one line per reason a shape runs eager."""

    def __init__(self, loss_fn, params, *, max_graphs: int = 16, warmup: int = 3, say=None):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.loss_fn, self.params, self.max_graphs, self.warmup = loss_fn, list(params), max_graphs, warmup
        self.say = say or (lambda line: None)
        self.pool = torch.cuda.graph_pool_handle()
        self.steps: dict[tuple, CapturedStep] = {}
        self.refused: dict[tuple, str] = {}
        self.replays = 0

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple | None:
        key = tuple(sorted((k, shape, str(dt)) for k, (shape, dt) in batch_shapes(batch).items()))
        step = self.steps.get(key)
        if step is None:
            if key in self.refused:
                return None
            if len(self.steps) >= self.max_graphs:
                why = f"more than {self.max_graphs} batch shapes (pad lengths to fewer buckets)"
                if why not in self.refused.values():
                    self.say(f"the training step runs eager for new batch shapes: {why}")
                self.refused[key] = why
                return None
            try:
                step = CapturedStep(self.loss_fn, self.params, batch, warmup=self.warmup, pool=self.pool)
            except CaptureError as exc:
                self.refused[key] = str(exc)
                self.say(f"the training step runs eager for batch shape {dict(batch_shapes(batch))}: {exc}")
                for p in self.params:
                    p.grad = None
                return None
            self.steps[key] = step
        step(batch)
        self.replays += 1
        return step.outputs
