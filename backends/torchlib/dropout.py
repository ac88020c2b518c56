"""Dropout for a capturable step: one seed in device memory per model, renewed once per micro-batch (LORA-8).

An eager QLoRA layer draws a host seed per call (``layer.draw_dropout_seed``; a checkpointed block's recompute draws
it again because torch.utils.checkpoint restores the CPU generator).  A CUDA graph cannot: a host draw is frozen into
the capture, and restoring RNG states is not capturable.  With a StepSeed installed, a layer's keep mask is LORA-8's
pure function of (the step seed, read from device memory by the kernel; the layer's salt; the index):

    keep_l[i] = mix(seed + salt_l * K + (i + 1) * GOLDEN) >> 11 >= floor(p 2^53)      (specs/lora.md LORA-8)

so nothing happens on the host per call, the forward, the recompute and the backward see the same mask, and each
micro-batch gets a new one once ``renew()`` has written the next seed (drawn from torch's CPU generator, so a
checkpoint's saved RNG state reproduces it on resume).  Eager and captured steps draw the same masks.

    seeds = use_step_seed(model)     # every QLoRA layer: step_seed = seeds, salt = crc32(its qualified name)
    seeds.renew()                    # before each micro-batch's forward (the Trainer does it; outside a capture)

A layer called twice in one micro-batch sees the same mask both times (the salt names the layer, not the call).
"""

from __future__ import annotations

import zlib

import torch

from .layer import QLoRALinear


class StepSeed:
    """A 64-bit dropout seed in device memory (an int64 tensor of one element), shared by a model's QLoRA layers."""

    def __init__(self, device):
        self.tensor = torch.zeros(1, dtype=torch.int64, device=device)
        self.value = 0

    def renew(self) -> int:
        """Write the next seed (from torch's CPU generator): one fill launch, no synchronisation; returns it."""
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("StepSeed.renew() inside a CUDA-graph capture would freeze the seed; renew before")
        self.value = int(torch.randint(0, 2**62, (1,)).item())
        self.tensor.fill_(self.value)
        return self.value


def use_step_seed(model) -> StepSeed:
    """Give every QLoRA layer of ``model`` one shared StepSeed (and a salt from its qualified name); returns it."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QLoRALinear)]
    if not layers:
        raise ValueError("use_step_seed: the model has no QLoRA layers (call prepare_model first)")
    devices = {m.device for _, m in layers}
    if len(devices) != 1:
        raise ValueError(f"use_step_seed: the QLoRA layers are on several devices {sorted(map(str, devices))}")
    seeds = StepSeed(devices.pop())
    for name, m in layers:
        m.step_seed, m.seed_salt = seeds, zlib.crc32(name.encode())
    return seeds
