"""Unpadded, unpacked batches: the causal mask left to SDPA's causal kernel, eager and inside a CUDA-graph capture.

For a batch with no ``attention_mask`` transformers' ``create_causal_mask`` (5.x) first asks whether the rows pack
several sequences: ``find_packed_sequence_indices`` diffs the position ids and reads ``(packed[:, -1] == 0).all()``
on the host.  Eager, that read is a device synchronisation in every forward: the host waits for the previous step's
GPU work before it issues this step's first kernel, so it cannot run ahead.  While a stream captures it cannot read
at all, so it assumes packing and builds the explicit (B, 1, T, T) mask, causal AND "same sequence": SDPA runs its
masked kernels over every block.  Measured on the H200 (bench_train's LLaMA-7B dims x 4 layers, 4 x 1024 tokens,
transformers 5.17): the cuDNN attention kernels took 611 + 213 us per layer captured against 228 + 87 us eager
(2.7x); eager, leaving the read out took the step from 47.76 to 46.93 ms (medians of 3 interleaved runs).

``causal_only(model)`` is the caller's word that every batch it runs is unpadded and unpacked: one sequence per row
at the model's own positions 0..T-1.  Inside it the model attends through ``qlora_causal``: transformers' own SDPA
attention function registered under a name that has no mask function, so ``create_causal_mask`` returns at once with
no mask (its early exit for such attention functions, before any check) and every layer calls

    scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=True)      (q_length == kv_length > 1)

which is what transformers' eager rule runs for such a batch after its checks: the lower triangle from position 0,
the same kernels and the same bits, with no host read and nothing built during a capture.  The promise is checked
where it can be without reading a tensor: a call that passes an ``attention_mask``, ``position_ids`` or
``past_key_values``, or is longer than the model's sliding window, is refused with a ValueError (run it outside the
context).  Models with extra mask functions (or/and masks) are not the LLaMA family prepare_model supports.  On exit
the model's attention implementation is restored.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

NAME = "qlora_causal"
REFUSED = ("attention_mask", "position_ids", "past_key_values")  # arguments that can make the mask non-causal


def register() -> bool:
    """Register ``qlora_causal`` (transformers' SDPA attention, no mask function); False when this transformers has
    no mask interface (before masking_utils), where the context does nothing."""
    try:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface  # noqa: F401  (the early exit lives with it)
    except ImportError:
        return False
    AttentionInterface.register(NAME, sdpa_attention_forward)
    return True


def sliding_window(config) -> int | None:
    """The model's attention window when some layer slides (None: full causal attention in every layer)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


def promise_checker(model):
    """forward pre-hook (args, kwargs) that raises ValueError when a call contradicts the unpadded-unpacked promise;
    it reads argument names and shapes only."""
    names = list(inspect.signature(model.forward).parameters)
    window = sliding_window(model.config)

    def check(module, args, kwargs):
        given = dict(zip(names, args, strict=False))  # positional arguments by name
        given.update(kwargs)
        for name in REFUSED:
            if given.get(name) is not None:
                raise ValueError(
                    f"this call passes {name}, but inside causal_only(model) every batch must be unpadded and "
                    "unpacked with no cache (SDPA's causal mask alone); run it outside the context"
                )
        seq = given.get("input_ids")
        seq = given.get("inputs_embeds") if seq is None else seq
        if window is not None and seq is not None and seq.shape[1] > window:
            raise ValueError(
                f"a sequence of {seq.shape[1]} tokens is longer than the model's sliding window ({window}): "
                "causal_only(model) would attend past it; run it outside the context"
            )

    return check


@contextmanager
def causal_only(model):
    """Inside: ``model`` (an sdpa-attention transformers model) attends through ``qlora_causal`` and refuses calls
    that break the caller's promise of unpadded, unpacked batches (module docstring).  A model on another attention
    implementation, or an older transformers, is left as it is."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if before != "sdpa" or not hasattr(model, "set_attn_implementation") or not register():
        yield model
        return
    hook = model.register_forward_pre_hook(promise_checker(model), with_kwargs=True)
    model.set_attn_implementation(NAME)
    try:
        yield model
    finally:
        hook.remove()
        model.set_attn_implementation(before)
