"""causal_capture on the CPU: the mask rule, and a simulated capture (the capture flag forced on, for transformers
too) of a tiny LLaMA: transformers alone hands SDPA an explicit mask, inside the context no mask reaches SDPA for an
unpadded batch, the padded batch keeps its mask, and the logits are the eager ones bit for bit
(the GPU capture itself: benchmarks/bench_train.py's ours-graph, tests/torchlib/test_graph.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_DECODER

from backends.torchlib import masks

transformers = pytest.importorskip("transformers")

CALL = dict(batch_size=2, q_length=8, kv_length=8, q_offset=0, kv_offset=0, attention_mask=None)


@pytest.mark.parametrize(
    "change, skips",
    [
        ({}, True),
        ({"attention_mask": torch.ones(2, 8, dtype=torch.bool)}, False),  # padding: the explicit mask
        ({"kv_length": 12}, False),  # keys beyond the queries (a cache, a prefix)
        ({"q_offset": 4, "kv_offset": 4}, False),
        ({"q_offset": torch.tensor(0)}, False),  # a static cache's tensor offset: never read
        ({"local_size": 4}, False),  # a sliding window inside the sequence
        ({"local_size": 4096}, True),  # a window wider than the sequence: plain causal
        ({"allow_is_bidirectional_skip": True}, False),  # a bidirectional (encoder) mask
    ],
)
def test_skips_mask_rule(change, skips):
    assert masks.skips_mask({**CALL, **change}) is skips


def spy_sdpa(monkeypatch) -> list:
    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        seen.append((attn_mask is None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return seen


def test_simulated_capture_leaves_the_causal_mask_to_sdpa(monkeypatch):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**TINY_DECODER, attn_implementation="sdpa", use_cache=False)  # training
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, TINY_DECODER["vocab_size"], (2, 8))
    pad = torch.ones(2, 8, dtype=torch.long)
    pad[1, 5:] = 0
    eager, eager_padded = model(input_ids=ids).logits, model(input_ids=ids, attention_mask=pad).logits
    seen = spy_sdpa(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)  # what transformers asks
    monkeypatch.setattr(masks, "_capturing", lambda: True)
    n = TINY_DECODER["num_hidden_layers"]
    assert torch.equal(model(input_ids=ids).logits, eager)
    assert seen == [(False, False)] * n  # transformers alone: an explicit mask while capturing (why masks.py is)
    seen.clear()
    with masks.causal_capture(model):
        assert model.config._attn_implementation == masks.NAME
        logits = model(input_ids=ids).logits
        assert seen == [(True, True)] * n  # no mask: SDPA's causal kernel in every layer
        padded = model(input_ids=ids, attention_mask=pad).logits
        assert seen[n:] == [(False, False)] * n  # the padded batch keeps its explicit mask
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(logits, eager)
    assert torch.equal(padded[0], eager_padded[0]) and torch.equal(padded[1, :5], eager_padded[1, :5])


def test_eager_calls_are_transformers_own(monkeypatch):
    """Not capturing: the mask function is transformers' sdpa_mask, call for call."""
    from transformers import masking_utils

    got = []
    monkeypatch.setattr(masking_utils, "sdpa_mask", lambda **kw: got.append(kw) or "transformers' mask")
    assert masks.capture_sdpa_mask(**CALL) == "transformers' mask" and got == [CALL]
    monkeypatch.setattr(masks, "_capturing", lambda: True)
    assert masks.capture_sdpa_mask(**CALL) is None and len(got) == 1


def test_other_attention_implementations_are_left_alone():
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_DECODER, attn_implementation="eager"))
    with masks.causal_capture(model):
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == "eager"
