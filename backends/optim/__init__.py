"""Optimizers for the torch training layer: PagedAdamW (the spec's AdamW, states paged in CUDA managed memory, one
fused kernel launch per step) and the spec's global-norm gradient clipping."""

from .clip import clip_grad_norm_
from .paged import DeviceMemoryError, PagedAdamW, StepScalars, step_scalars

__all__ = ["DeviceMemoryError", "PagedAdamW", "StepScalars", "clip_grad_norm_", "step_scalars"]
