"""The training step's micro-batches on a GPU: dropout from device memory, forward + backward as CUDA graphs.

One optimizer step's K micro-batches, N response tokens in all (trainer.py has the loss):

    for each micro-batch k:  seeds.renew()                        the dropout seed in device memory (LORA-8)
                             (loss_k * s, loss_k) = f(batch_k, s)  s = 1/N as a (1,) tensor, loss_k its loss sum
                             backward of loss_k * s                a CUDA graph replay where the shape is captured
    p.grad = sum_k grad_k                                          (K = 1: the graph's gradient itself)

- Dropout: every QLoRA layer reads one StepSeed (backends.torchlib.dropout), so nothing is drawn on the host per
  call, a checkpointed block's recompute sees its forward's mask, and gradient checkpointing needs no RNG states
  (re-enabled with ``preserve_rng_state=False``).
- Graphs (``--cuda-graphs auto``): backends.torchlib.graph.StepGraphs, one capture per padded batch shape (lengths
  bucketed to a multiple of 16 when --pad-to-multiple-of is 1), shapes it cannot capture run eager; when nothing can
  be captured (``capture_blockers``) the whole step runs eager and one line on stderr says why.
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

    def __init__(self, model, loss_module, params: dict[str, torch.nn.Parameter], cfg):
        from backends.torchlib import distributed as D
        from backends.torchlib.dropout import use_step_seed
        from backends.torchlib.graph import StepGraphs, capture_blockers
        from backends.torchlib.layer import QLoRALinear

        self.model, self.loss_module, self.params = model, loss_module, list(params.values())
        self.device = self.params[0].device
        self.seeds, self.graphs = None, None
        if any(m.dropout > 0 for m in model.modules() if isinstance(m, QLoRALinear)):
            self.seeds = use_step_seed(model)
        if getattr(model, "is_gradient_checkpointing", False):  # the masks no longer depend on RNG state
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False, "preserve_rng_state": False}
            )
        if cfg.train.cuda_graphs == "off":
            return
        why = capture_blockers(model) + (["data parallel (--nproc > 1)"] if D.world_size() > 1 else [])
        if why:
            say(f"the training step runs eager, not as CUDA graphs: {'; '.join(why)}")
            return
        self.graphs = StepGraphs(self.scaled_loss, self.params, say=say)

    def pad_to(self, pad_to_multiple_of: int) -> int:
        """The padded-length multiple of the run's micro-batches: BUCKET under capture when the run asks for 1."""
        return BUCKET if pad_to_multiple_of == 1 and self.graphs is not None else pad_to_multiple_of

    def scaled_loss(self, input_ids, attention_mask, labels, scale):
        """(loss_sum * scale, loss_sum): what every micro-step computes, eager or captured."""
        loss_sum = self.loss_module(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
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
            if len(batches) > 1:
                grads = [p.grad for p in self.params]
                if acc is None:
                    acc = [g.clone() for g in grads]
                else:
                    torch._foreach_add_(acc, grads)
        if acc is not None:
            for p, a in zip(self.params, acc, strict=True):
                p.grad = a
        return float(total)


def say(line: str) -> None:
    print(f"qlora: {line}", file=sys.stderr, flush=True)
