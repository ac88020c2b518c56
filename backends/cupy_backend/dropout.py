"""The counter-based dropout keep mask (LORA-8) on the GPU: one launch, its seed read from device memory.

    keep = dropout_keep_counter(shape, p, seed, salt)     seed: int64 CUDA tensor of one element; salt: a Python int

The launch goes to torch's current stream and allocates its output with torch (inside a CUDA-graph capture: from
the graph's pool), so it can be captured; what changes between replays is the seed's value, written by the host
before each replay (``backends.torchlib.dropout.StepSeed``).
"""

from __future__ import annotations

import numpy as np

from backends.bridge import torch_stream_getter
from qlora_ref.lora import keep_threshold

from . import build, launch

_STREAM_GETTERS: dict[int, object] = {}


def dropout_keep_counter(shape, p: float, seed, salt: int):
    """torch.bool CUDA tensor of ``shape``, bit-equal to qlora_ref.lora.dropout_keep_counter(shape, p, seed, salt)."""
    import torch

    if not (isinstance(seed, torch.Tensor) and seed.is_cuda and seed.dtype == torch.int64 and seed.numel() == 1):
        raise ValueError(f"seed must be an int64 CUDA tensor of one element, got {_describe(seed)}")
    t = keep_threshold(p)
    keep = torch.empty(tuple(shape), dtype=torch.bool, device=seed.device)
    n = keep.numel()
    if n:
        index = seed.device.index
        stream = _STREAM_GETTERS.get(index)
        if stream is None:
            stream = _STREAM_GETTERS[index] = torch_stream_getter(index)
        fn = build.kernel("dropout.cu", "dropout_keep_counter_v1").kernel
        grid, block = launch.dropout_keep_counter_v1_config(n)
        args = (np.uint64(seed.data_ptr()), np.uint64(int(salt) % 2**64), np.uint64(t), np.uint64(keep.data_ptr()),
                np.int64(n))  # fmt: skip
        fn(grid, block, args, 0, stream())
    return keep


def _describe(x) -> str:
    import torch

    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of {x.numel()} elements on {x.device}"
    return type(x).__name__
