"""backends.torchlib.synthetic: LLaMA-shaped random QLoRA models (the memory runs' models), on the CPU backend."""

from __future__ import annotations

import pytest
import torch

from backends.torchlib import QLoRALinear
from backends.torchlib.prepare import enable_checkpointing
from backends.torchlib.synthetic import HostEmbedding, random_qlora_model
from qlora_ref.memory import ModelShape

TINY = ModelShape("tiny", hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, vocab=96)


def test_every_linear_is_4bit_and_only_lora_trains():
    m = random_qlora_model(TINY, backend="numpy", r=4, lora_dtype="float32", std=0.05, seed=1)
    layers = [mod for mod in m.modules() if isinstance(mod, QLoRALinear)]
    assert len(layers) == 7 * TINY.layers
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == TINY.n_lora(4)
    assert {p.device.type for p in m.parameters()} == {"cpu"}  # nothing left on the meta device
    w = layers[0].dequantize_weight(torch.float32)
    assert 0.03 < float(w.std()) < 0.07  # N(0, 0.05^2) after NF4 (a real draw, not zeros)
    same = random_qlora_model(TINY, backend="numpy", r=4, lora_dtype="float32", std=0.05, seed=1)
    other = random_qlora_model(TINY, backend="numpy", r=4, lora_dtype="float32", std=0.05, seed=2)
    first = [mod for mod in same.modules() if isinstance(mod, QLoRALinear)][0].dequantize_weight(torch.float32)
    second = [mod for mod in other.modules() if isinstance(mod, QLoRALinear)][0].dequantize_weight(torch.float32)
    assert torch.equal(w, first) and not torch.equal(w, second)


def test_host_embedding_and_offloaded_checkpoints_train():
    m = random_qlora_model(TINY, backend="numpy", r=4, lora_dtype="float32", embeddings_on_host=True,
                           gradient_checkpointing=False, init_lora="random")  # fmt: skip
    emb = m.get_input_embeddings()
    assert isinstance(emb, HostEmbedding)
    ids = torch.randint(0, TINY.vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(emb(ids), emb.weight[ids])
    enable_checkpointing(m, use_reentrant=True)
    m.enable_input_require_grads()
    m.train()
    with torch.autograd.graph.save_on_cpu():
        loss = m(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_tied_embeddings_cannot_live_on_the_host():
    tied = ModelShape("tied", hidden=64, intermediate=160, layers=1, heads=4, kv_heads=4, vocab=96, tie_embeddings=True)
    with pytest.raises(ValueError, match="untied"):
        random_qlora_model(tied, backend="numpy", r=2, embeddings_on_host=True)
