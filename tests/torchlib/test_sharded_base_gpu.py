"""DIST-9's CUDA branch on one GPU: FSDP2 (one nccl rank) over QLoRA layers whose 4-bit base is in Parameters.

The layer reads FSDP's gathered tensors through CuPy views (DeviceQuantized4bit over them, no copy): the loss and
every LoRA gradient must equal the unsharded model's bit for bit, since the same bytes reach the same kernels.  The
2-rank run of the same code on the CPU is tests/torchlib/test_ddp.py; several GPUs are not lent here.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_DECODER, tiny_prepared_llama

from backends.torchlib import qlora_layers, trainable_parameters


@pytest.mark.gpu
def test_gpu_one_rank_fsdp2_with_the_base_sharded_equals_the_plain_model(tmp_path):
    import torch.distributed as dist

    from backends.torchlib.sharded_base import ShardedQLoRALinear, fully_shard_qlora

    ids = torch.randint(0, TINY_DECODER["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0)).cuda()
    plain = tiny_prepared_llama("cupy", dropout=0.0).cuda()
    loss = plain(input_ids=ids, labels=ids).loss
    loss.backward()
    want = [p.grad.clone() for p in trainable_parameters(plain)]
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        sharded = fully_shard_qlora(tiny_prepared_llama("cupy", dropout=0.0).cuda())
        assert all(isinstance(m, ShardedQLoRALinear) for m in qlora_layers(sharded).values())
        got_loss = sharded(input_ids=ids, labels=ids).loss
        got_loss.backward()
        got = [p.grad.full_tensor() for p in trainable_parameters(sharded)]
        assert torch.equal(got_loss.detach(), loss.detach())
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        with pytest.raises(RuntimeError, match="sharded over the ranks"):
            _ = next(iter(qlora_layers(sharded).values())).q
    finally:
        dist.destroy_process_group()
