"""causal_only on the CPU, with a tiny LLaMA: inside the context no mask reaches SDPA and transformers' packed-sequence
read is never made, eager and in a simulated capture (the capture flag forced on, for transformers too: alone it hands
SDPA an explicit mask there), the logits are the plain eager ones bit for bit, calls that break the promise are
refused, and the model is restored on exit (the GPU capture itself: tests/torchlib/test_graph.py,
benchmarks/bench_train.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_DECODER, spy_sdpa

from backends.torchlib import masks

transformers = pytest.importorskip("transformers")
masking_utils = pytest.importorskip("transformers.masking_utils")


def _llama(**extra):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**TINY_DECODER, attn_implementation="sdpa", use_cache=False, **extra)  # training
    return transformers.LlamaForCausalLM(cfg)


def _count_packed_reads(monkeypatch) -> list:
    calls, find = [], masking_utils.find_packed_sequence_indices

    def counted(*args, **kwargs):
        calls.append(1)
        return find(*args, **kwargs)

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", counted)
    return calls


@pytest.mark.parametrize("capturing", [False, True], ids=["eager", "simulated-capture"])
def test_no_mask_and_no_packed_read_inside(capturing, monkeypatch):
    model = _llama()
    ids = torch.randint(0, TINY_DECODER["vocab_size"], (2, 8))
    want = model(input_ids=ids).logits
    seen, packed = spy_sdpa(monkeypatch), _count_packed_reads(monkeypatch)
    if capturing:
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)  # what transformers asks
    n = TINY_DECODER["num_hidden_layers"]
    assert torch.equal(model(input_ids=ids).logits, want)
    assert packed == [1]  # transformers alone: the packed-sequence check (a host read, eager)
    assert seen == [(False, False) if capturing else (True, True)] * n  # capturing: an explicit mask (why masks.py is)
    seen.clear()
    packed.clear()
    with masks.causal_only(model):
        assert model.config._attn_implementation == masks.NAME
        logits = model(input_ids=ids).logits
    assert seen == [(True, True)] * n and packed == []  # SDPA's causal kernel, nothing read, nothing built
    assert torch.equal(logits, want)
    assert model.config._attn_implementation == "sdpa"


def test_refuses_calls_that_break_the_promise():
    model = _llama()
    ids = torch.randint(0, TINY_DECODER["vocab_size"], (2, 8))
    pad = torch.ones(2, 8, dtype=torch.long)
    pad[1, 5:] = 0
    want_padded = model(input_ids=ids, attention_mask=pad).logits
    with masks.causal_only(model):
        for kwargs in (
            {"attention_mask": pad},
            {"position_ids": torch.arange(8).expand(2, 8)},
            {"past_key_values": transformers.DynamicCache()},
        ):
            name = next(iter(kwargs))
            with pytest.raises(ValueError, match=f"passes {name}.*outside the context"):
                model(input_ids=ids, **kwargs)
        with pytest.raises(ValueError, match="passes attention_mask"):
            model(ids, pad)  # positional, by the forward's signature
    assert torch.equal(model(input_ids=ids, attention_mask=pad).logits, want_padded)  # hook gone on exit


def test_sliding_window_longer_sequences_refused():
    mistral = pytest.importorskip("transformers.models.mistral")
    cfg = mistral.MistralConfig(**TINY_DECODER, attn_implementation="sdpa", use_cache=False, sliding_window=6)
    model = mistral.MistralForCausalLM(cfg)
    assert masks.sliding_window(model.config) == 6
    with masks.causal_only(model):
        model(input_ids=torch.randint(0, 64, (1, 6)))  # inside the window: plain causal
        with pytest.raises(ValueError, match="longer than the model's sliding window"):
            model(input_ids=torch.randint(0, 64, (1, 7)))
    assert masks.sliding_window(_llama().config) is None


def test_other_attention_implementations_are_left_alone():
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_DECODER, attn_implementation="eager"))
    with masks.causal_only(model):
        assert model.config._attn_implementation == "eager"
        model(input_ids=torch.randint(0, 64, (1, 4)), attention_mask=torch.ones(1, 4, dtype=torch.long))  # no hook
    assert model.config._attn_implementation == "eager"
