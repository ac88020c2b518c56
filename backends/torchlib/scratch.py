"""The dequantization scratch: one flat buffer per (device, dtype), shared by every QLoRA layer there (MEM-10).

A layer's forward and backward write W_hat (out, in) into it and use it at once; it is sized for the largest layer
and grown on demand, so nothing proportional to the model's weights is kept in the compute dtype.  Its contents are
valid only until the next dequantization on the same device and dtype: on CUDA the users run on one stream, so the
kernel order protects it.  A layer binds its dequantize launch to the buffer's address and re-binds when
``current(key)`` shows the buffer was re-allocated.
"""

from __future__ import annotations

import torch

_BUFFERS: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def scratch_key(device, dtype: torch.dtype) -> tuple[str, torch.dtype]:
    """The key of the buffer of ``device`` and ``dtype``."""
    return (str(torch.device(device)), dtype)


def scratch_buffer(numel: int, device, dtype: torch.dtype) -> torch.Tensor:
    """A flat tensor of ``numel`` elements, a view of the shared buffer of this device and dtype (grown on demand)."""
    key = scratch_key(device, dtype)
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < numel:
        _BUFFERS.pop(key, None)  # let the old one go before allocating the larger one
        buf = torch.empty(numel, device=device, dtype=dtype)
        _BUFFERS[key] = buf
    return buf[:numel]


def current(key: tuple[str, torch.dtype]) -> torch.Tensor | None:
    """The whole buffer now held under ``key`` (None when released): a bound launch is stale when this changed."""
    return _BUFFERS.get(key)


def release_scratch() -> None:
    """Drop every scratch buffer (they are re-created at the next forward)."""
    _BUFFERS.clear()
