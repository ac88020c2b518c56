"""The loss and exact match read the head's logits at response positions only; they equal the full-logits path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import TINY_DECODER

from backends.app.data import IGNORE_INDEX
from backends.app.evaluate import body_and_head, response_logits, response_loss_sum
from backends.torchlib import prepare_model


def full_logits_loss(model, batch):
    """The reference: every position's logits, then the labels' mask."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    ), logits


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_DECODER))
    return prepare_model(m, r=4, alpha=8, dropout=0.0, gradient_checkpointing=False)


def batch_with_masked_prompts(seed: int, b=3, t=12, vocab=TINY_DECODER["vocab_size"]):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    labels = ids.clone()
    starts = torch.randint(1, t - 1, (b,), generator=g)
    for k, s in enumerate(starts):
        labels[k, :s] = IGNORE_INDEX  # the prompt
    mask = torch.ones_like(ids)
    mask[-1, -3:] = 0  # a padded row
    labels[-1, -3:] = IGNORE_INDEX
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


@pytest.mark.parametrize("seed", range(4))
def test_head_on_response_rows_equals_full_logits(model, seed):
    assert body_and_head(model) is not None  # a LLaMA takes the fast path
    batch = batch_with_masked_prompts(seed)
    want_loss, full = full_logits_loss(model, batch)
    got, targets, rows = response_logits(model, batch)
    keep = batch["labels"][:, 1:] != IGNORE_INDEX
    assert got.shape == (int(keep.sum()), TINY_DECODER["vocab_size"]) and got.dtype == torch.float32
    torch.testing.assert_close(got, full[:, :-1][keep].float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(targets, batch["labels"][:, 1:][keep]) and torch.equal(rows, keep.nonzero()[:, 0])
    torch.testing.assert_close(response_loss_sum(model, batch), want_loss, rtol=1e-5, atol=1e-5)


def test_gradients_equal_full_logits(model):
    batch = batch_with_masked_prompts(7)
    params = [p for p in model.parameters() if p.requires_grad]
    want = torch.autograd.grad(full_logits_loss(model, batch)[0], params)
    got = torch.autograd.grad(response_loss_sum(model, batch), params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_other_decoders_compute_every_logit(model, monkeypatch):
    """A model type not known to compute lm_head(hidden) alone (soft-capping, logit scales) takes the full path."""
    monkeypatch.setattr(model.config, "model_type", "gemma2")
    assert body_and_head(model) is None
    batch = batch_with_masked_prompts(3)
    torch.testing.assert_close(response_loss_sum(model, batch), full_logits_loss(model, batch)[0])


@pytest.mark.parametrize("rows_per_chunk", [1, 3, 7])
def test_chunked_cross_entropy_equals_one_chunk(model, rows_per_chunk):
    """Chunks of 1, 3 and 7 rows (7 does not divide N): the same loss up to float32 summation order, the same
    gradients (each chunk's logits recomputed in backward from its hidden rows)."""
    batch = batch_with_masked_prompts(11, b=4, t=16)
    n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert n > 7
    params = [p for p in model.parameters() if p.requires_grad]
    one = response_loss_sum(model, batch)
    chunked = response_loss_sum(model, batch, chunk_elements=rows_per_chunk * TINY_DECODER["vocab_size"])
    # n partial sums of magnitude <= the total, added in another order: within n * eps32 of the total
    assert abs(float(chunked - one)) <= n * 2**-23 * float(one)
    g_one = torch.autograd.grad(one, params)
    g_chunked = torch.autograd.grad(chunked, params)
    for g, w in zip(g_chunked, g_one, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_length_buckets_pad_to_a_multiple_and_keep_the_loss(model):
    """collate(pad_to=16): T rounded up to 16, the extra positions masked and unlabelled, the loss unchanged."""
    from backends.app.batching import collate
    from backends.app.data import TokenizedExample

    g = torch.Generator().manual_seed(5)
    vocab = TINY_DECODER["vocab_size"]
    examples = []
    for n, prompt in ((9, 4), (13, 6), (5, 2)):
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        examples.append(TokenizedExample(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    plain, bucketed = collate(examples, 0), collate(examples, 0, pad_to=16)
    assert plain["input_ids"].shape == (3, 13) and bucketed["input_ids"].shape == (3, 16)
    assert torch.equal(bucketed["input_ids"][:, :13], plain["input_ids"])
    assert not bucketed["attention_mask"][:, 13:].any() and (bucketed["labels"][:, 13:] == IGNORE_INDEX).all()
    torch.testing.assert_close(response_loss_sum(model, bucketed), response_loss_sum(model, plain))
    with pytest.raises(ValueError, match="pad_to"):
        collate(examples, 0, pad_to=0)
