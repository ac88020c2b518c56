"""SDPA's causal kernel inside a CUDA-graph capture: the causal mask of an unpadded, unpacked batch left to SDPA.

Eager, transformers' ``sdpa_mask`` returns no mask for a batch without padding whose queries are its keys, and the
attention call runs ``scaled_dot_product_attention(q, k, v, is_causal=True)``: the causal kernel, which skips the
blocks above the diagonal.  To know the batch is unpadded and unpacked it reads values (``padding_mask.all()``, and
whether the position ids restart), which it refuses while a CUDA stream is capturing: so inside a captured step it
builds the explicit (B, 1, T, T) boolean mask, causal AND "same packed sequence", and SDPA runs its masked kernels
over every block.  Measured on the H200 (transformers 5.17, bench_train's LLaMA-7B x 4 layers, 4 x 1024 tokens):
the cuDNN attention kernels took 611 + 213 us per layer captured against 228 + 87 us eager, 2.7x.

``causal_capture(model)`` is the caller's word that every batch it captures has no padding and no packing (no
``attention_mask``, no ``position_ids``: the model's own positions 0..T-1, one sequence per row).  Inside it the
model's attention implementation is ``qlora_sdpa``: transformers' own SDPA attention function, with a mask function
that, only while a stream is capturing, returns no mask when transformers' eager rule would have skipped it:

    skip  <=>  capturing and attention_mask is None and q_length == kv_length and q_offset == kv_offset == 0
               and (no sliding window, or the window covers kv_length) and not a bidirectional mask

and otherwise calls transformers' ``sdpa_mask`` unchanged (eager calls always: the same masks, the same bits as
without the context).  The skipped mask is exactly the lower triangle SDPA's ``is_causal`` applies (rows and columns
both from position 0), so the captured step computes what the eager step computes with the same kernels.  A padded
batch (an ``attention_mask`` is passed) keeps its explicit mask.  On exit the model's implementation is restored.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

NAME = "qlora_sdpa"


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def skips_mask(kwargs: dict) -> bool:
    """Whether the causal mask of this ``sdpa_mask`` call is left to SDPA's ``is_causal`` (the rule above), from the
    call's shapes and arguments alone: no tensor is read."""
    if kwargs.get("attention_mask") is not None or kwargs.get("allow_is_bidirectional_skip"):
        return False
    q, kv = kwargs["q_length"], kwargs["kv_length"]
    q_offset, kv_offset = kwargs.get("q_offset", 0), kwargs.get("kv_offset", 0)
    if isinstance(q_offset, torch.Tensor) or q_offset != 0 or kv_offset != 0 or q != kv:
        return False
    window = kwargs.get("local_size")
    return window is None or kv < window


def capture_sdpa_mask(**kwargs):
    """transformers' sdpa_mask, except that a capture of an unpadded, unpacked batch gets no mask (``skips_mask``)."""
    from transformers.masking_utils import sdpa_mask

    if _capturing() and skips_mask(kwargs):
        return None
    return sdpa_mask(**kwargs)


def register() -> bool:
    """Register ``qlora_sdpa`` with transformers (attention: its SDPA function; mask: ``capture_sdpa_mask``); False
    when this transformers has no mask interface (before masking_utils), where the context does nothing."""
    try:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return False
    AttentionInterface.register(NAME, sdpa_attention_forward)
    AttentionMaskInterface.register(NAME, capture_sdpa_mask)
    return True


@contextmanager
def causal_capture(model):
    """Inside: ``model`` (an sdpa-attention transformers model) attends through ``qlora_sdpa`` (module docstring);
    the caller promises its captured batches are unpadded and unpacked.  A model on another attention
    implementation, or an older transformers, is left as it is."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if before != "sdpa" or not hasattr(model, "set_attn_implementation") or not register():
        yield model
        return
    model.set_attn_implementation(NAME)
    try:
        yield model
    finally:
        model.set_attn_implementation(before)
