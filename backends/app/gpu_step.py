"""The training step's micro-batches on a GPU: dropout from device memory, forward + backward as CUDA graphs.

One optimizer step's K micro-batches, N response tokens in all (trainer.py has the loss):

    for each micro-batch k:  seeds.renew()                        the dropout seed in device memory (LORA-8)
                             (loss_k * s, loss_k) = f(batch_k, s)  s = 1/N as a (1,) tensor, loss_k its loss sum
                                                                   (static_loss_sum: every shape static)
                             backward of loss_k * s                a CUDA graph replay where the shape is captured
    p.grad = sum_k grad_k                                          (K = 1: the graph's gradient itself)

- Dropout: every QLoRA layer reads one StepSeed (backends.torchlib.dropout), so nothing is drawn on the host per
  call, a checkpointed block's recompute sees its forward's mask, and gradient checkpointing needs no RNG states
  (re-enabled with ``preserve_rng_state=False``).
- Graphs (``--cuda-graphs auto``): backends.torchlib.graph.StepGraphs, one capture per padded batch shape (on the
  GPU lengths are bucketed to a multiple of 16 when --pad-to-multiple-of is 1, captured or not), shapes it cannot
  capture run eager; when nothing can be captured (``capture_blockers``) the whole step runs eager and one line on
  stderr says why.
- Equality: the eager and the captured micro-step call the same function with the same tensors (the 1/N scale is a
  tensor in both), so the graph replays the eager step's kernels on the same data: the same loss and gradient bits
  (tests/torchlib/test_gpu_step.py).  What a graph saves is the host's launch work.
- One synchronisation per step: the loss sum is accumulated on the device and read once; clipping and the optimizer
  step stay eager (trainer.py).
"""

from __future__ import annotations

import sys

import torch

BUCKET = 16  # tokens: the padded-length multiple under capture when the run asks for none


class GpuMicroSteps:
    """The GPU's micro-steps of one optimizer step (module docstring); ``run(batches, n_tok)`` -> the loss sum."""

    def __init__(self, model, params: dict[str, torch.nn.Parameter], cfg):
        from backends.torchlib import distributed as D
        from backends.torchlib.dropout import use_step_seed
        from backends.torchlib.graph import StepGraphs, capture_blockers
        from backends.torchlib.layer import QLoRALinear
        from backends.torchlib.prepare import enable_checkpointing, is_checkpointing

        self.model, self.params = model, list(params.values())
        self.device = self.params[0].device
        self.seeds, self.graphs, self._acc = None, None, None
        if any(m.dropout > 0 for m in model.modules() if isinstance(m, QLoRALinear)):
            self.seeds = use_step_seed(model)
        if is_checkpointing(model):  # the masks no longer depend on RNG state
            enable_checkpointing(model, use_reentrant=False, preserve_rng_state=False)
        if cfg.train.cuda_graphs == "off":
            return
        why = capture_blockers(model) + (["data parallel (--nproc > 1)"] if D.world_size() > 1 else [])
        if why:
            say(f"the training step runs eager, not as CUDA graphs: {'; '.join(why)}")
            return
        self.graphs = StepGraphs(self.scaled_loss, self.params, say=say)

    def _accumulators(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """The step's gradient sums, one buffer per parameter allocated once (a parameter's gradient keeps its shape
        and dtype) and reused every step: the optimizer reads them through p.grad and zero_grad drops only that
        reference."""
        acc = self._acc
        if acc is None:
            acc = self._acc = [torch.empty_like(g) for g in grads]
        return acc

    def pad_to(self, pad_to_multiple_of: int) -> int:
        """The padded-length multiple of the run's micro-batches on the GPU: BUCKET when the run asks for 1, captured
        or not (the dropout mask is indexed by flat position, so eager and captured runs pad alike to draw alike)."""
        return BUCKET if pad_to_multiple_of == 1 else pad_to_multiple_of

    def scaled_loss(self, input_ids, attention_mask, labels, scale):
        """(loss_sum * scale, loss_sum): what every micro-step computes, eager or captured."""
        loss_sum = static_loss_sum(self.model, input_ids, attention_mask, labels)
        return loss_sum * scale, loss_sum

    def run(self, batches: list[dict[str, torch.Tensor]], n_tok: int) -> float:
        """Forward + backward of every micro-batch (host tensors, collated); the step's gradient in p.grad."""
        from .evaluate import to_device

        scale = torch.full((1,), 1.0 / n_tok, dtype=torch.float32, device=self.device)
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        acc = None
        for b in batches:
            if self.seeds is not None:
                self.seeds.renew()
            for p in self.params:
                p.grad = None
            batch = dict(to_device(b, self.device), scale=scale)
            out = self.graphs(batch) if self.graphs is not None else None
            if out is None:  # eager: the same function, the same tensors
                out = self.scaled_loss(**batch)
                out[0].backward()
            total += out[1].detach()
            if len(batches) > 1:  # multi-tensor launches into buffers kept across steps (no per-tensor clone)
                grads = [p.grad for p in self.params]
                if acc is None:
                    acc = self._accumulators(grads)
                    torch._foreach_copy_(acc, grads)
                else:
                    torch._foreach_add_(acc, grads)
        if acc is not None:
            for p, a in zip(self.params, acc, strict=True):
                p.grad = a
        return float(total)


def static_loss_sum(model, input_ids, attention_mask, labels, *, chunk_elements: int | None = None) -> torch.Tensor:
    """The micro-batch's response loss sum (evaluate.response_loss_sum's value) with every shape static:

        L = sum_{b, t : labels[b, t+1] != -100} -log softmax(head(h[b, t]))[labels[b, t+1]]

    - the attention mask is built here, 4-D and additive: allowed[b, q, k] = k <= q and attention_mask[b, k] (right
      padding: every query keeps key 0, no row is all masked), so transformers takes no data-dependent branch (it
      would read ``attention_mask.all()`` on the host to skip the mask);
    - the LM head runs on every position (the -100 targets are ignored by the cross-entropy), not on the selected
      response rows (a data-dependent count), in static chunks of rows, each recomputed in backward
      (evaluate.CE_CHUNK_ELEMENTS float32 logits at most at once).
    """
    from torch.nn import functional as F
    from torch.utils.checkpoint import checkpoint

    from .evaluate import CE_CHUNK_ELEMENTS, body_and_head

    B, T = input_ids.shape
    emb = model.get_input_embeddings().weight
    allowed = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril_()[None, None]
    allowed = allowed & attention_mask[:, None, None, :].bool()  # (B, 1, T, T)
    mask = torch.zeros(allowed.shape, dtype=emb.dtype, device=emb.device).masked_fill_(
        ~allowed, torch.finfo(emb.dtype).min
    )
    targets = labels[:, 1:].reshape(-1)  # (B (T-1),)
    split = body_and_head(model)
    if split is None:
        logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits[:, :-1]
        return F.cross_entropy(logits.reshape(len(targets), -1).float(), targets, reduction="sum")
    body, head = split
    h = body(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state[:, :-1]
    x = h.reshape(len(targets), -1)  # (B (T-1), H)
    per = max(1, (chunk_elements or CE_CHUNK_ELEMENTS) // head.out_features)
    if len(x) <= per:
        return _ce_sum(head, x, targets)
    parts = [checkpoint(_ce_sum, head, x[i : i + per], targets[i : i + per], use_reentrant=False,
                        preserve_rng_state=False) for i in range(0, len(x), per)]  # fmt: skip
    return torch.stack(parts).sum()


def _ce_sum(head, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    from torch.nn import functional as F

    return F.cross_entropy(head(x).float(), targets, reduction="sum")


def say(line: str) -> None:
    print(f"qlora: {line}", file=sys.stderr, flush=True)
