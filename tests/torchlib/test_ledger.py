"""This implementation's memory ledger (backends/torchlib/ledger.py): the spec's terms re-composed for our layer and
memory levers (MEM-13) plus the measured CUDA overhead (MEM-14)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from backends.torchlib.ledger import CUDA_OVERHEAD_BYTES, Runtime, estimate
from qlora_ref import memory as M

SMOLLM2 = M.ModelShape("smollm2-135m", hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152,
                       tie_embeddings=True)  # fmt: skip
# Written by qlora_ref.memory.estimate(shape, **recipe, **runtime) at commit 10a6c9b, before the paper's ledger and
# this one were split apart: (components in ledger order, pageable).  The split must change no number.  (The single
# ledger stepped one tensor at a time inside backward: step_group=1 here.)
BEFORE_THE_SPLIT = [
    ("llama-65b", dict(seq_len=528, batch=1, r=64, lora_dropout=0.05), dict(layer="peft", overhead_bytes=0),
     (33407715520, 1048576000, 5275648, 1599078400, 1599078400, 6396313600, 1048700928, 202752000, 721420288),
     6396313600),
    ("llama-65b", dict(seq_len=512, batch=1), dict(layer="qlora-ref", overhead_bytes=CUDA_OVERHEAD_BYTES),
     (33407715520, 1048576000, 5275648, 1599078400, 1599078400, 6396313600, 907608064, 196608000, 360710144,
      1000000000), 6396313600),
    ("llama-65b", dict(seq_len=512, batch=1), dict(layer="qlora-ref", step_in_backward=True, offload_checkpoints=True,
                                                   embeddings_on_host=True, overhead_bytes=CUDA_OVERHEAD_BYTES,
                                                   step_group=1),
     (33407715520, 524288000, 5275648, 1599078400, 2818048, 6396313600, 236519424, 196608000, 360710144, 1000000000),
     6396313600),
    ("llama-7b", dict(seq_len=256, batch=2, r=16, lora_dtype="float32", attention="eager", checkpointing=False,
                      optimizer="adamw_8bit", dequant_buffers=3), dict(layer="peft", overhead_bytes=0),
     (3340772224, 524288000, 1064960, 159907840, 159907840, 81203200, 5960630272, 196608000, 270532608), 0),
    ("llama-33b", dict(seq_len=1024, batch=1, double_quant=False, blocksize=128, compute_dtype="float16",
                       lora_dropout=0.1, optimizer="paged_adamw_8bit"),
     dict(layer="qlora-ref", step_in_backward=True, overhead_bytes=0, step_group=1),
     (17054269440, 851968000, 3221504, 975175680, 2293760, 990412800, 1202798592, 393216000, 238551040), 990412800),
    ("smollm2-135m", dict(seq_len=512, batch=4, r=8, embed_dtype="float32", norm_dtype="bfloat16"),
     dict(layer="peft", offload_checkpoints=True, overhead_bytes=CUDA_OVERHEAD_BYTES),
     (54770040, 113246208, 70272, 4884480, 4884480, 19537920, 66363392, 1207959552, 3538944, 1000000000), 19537920),
]  # fmt: skip
ORDER = ("base_4bit", "embeddings", "norms", "lora_params", "lora_grads", "optimizer", "activations", "loss_head",
         "dequant_scratch", "overhead")  # fmt: skip


@pytest.mark.parametrize("name, recipe, runtime, parts, pageable", BEFORE_THE_SPLIT)
def test_split_changes_no_number(name, recipe, runtime, parts, pageable):
    """MEM-13, MEM-14: the paper's ledger plus this one give the numbers the single ledger gave, term by term; with
    PEFT's layer and no levers the spec's ledger alone gives them (all but the overhead)."""
    shape = SMOLLM2 if name == SMOLLM2.name else M.PRESETS[name]
    led = estimate(shape, M.Recipe(**recipe), Runtime(**runtime))
    assert list(led.components.items()) == list(zip(ORDER[: len(parts)], parts, strict=True))
    assert led.pageable == pageable
    if runtime["layer"] == "peft" and not any(runtime.get(k) for k in ("step_in_backward", "offload_checkpoints")):
        paper = M.estimate(shape, M.Recipe(**recipe)).components
        assert paper == {k: v for k, v in led.components.items() if k != "overhead"}


def test_mem13_implementation_switches():
    """MEM-13: layer="qlora-ref", step_in_backward and offload_checkpoints change exactly the terms MEM-13 names."""
    recipe = M.Recipe(seq_len=512, batch=1, r=64, lora_dropout=0.05)
    peft = estimate(M.llama_65b, recipe, Runtime(layer="peft"))
    ours = estimate(M.llama_65b, recipe, Runtime(layer="qlora-ref"))
    h, i, L, T = 8192, 22016, 80, 512
    per_in = (1 + 2) * T * (6 * h + i)  # PEFT: dropout mask + dropped copy of the 7 inputs (6 of width h, 1 of i)
    assert peft.components["activations"] - ours.components["activations"] == per_in
    assert peft.components["dequant_scratch"] == 2 * ours.components["dequant_scratch"] == 2 * 2 * i * h
    one = estimate(M.llama_65b, recipe, Runtime(step_in_backward=True, step_group=1))
    assert one.components["lora_grads"] == 2 * 64 * i  # one bf16 adapter gradient at a time: the largest, r x 22016
    fused = estimate(M.llama_65b, recipe, Runtime(step_in_backward=True))
    assert fused.components["lora_grads"] == 16 * 2 * 64 * i  # 16 at a time (the hooks' default), 240 are r x 22016
    assert fused.config["step_group"] == 16 and "step_group" not in ours.config
    off = estimate(M.llama_65b, recipe, Runtime(offload_checkpoints=True))
    assert ours.components["activations"] - off.components["activations"] == L * 2 * T * h
    for other in ("lora_params", "optimizer", "base_4bit", "embeddings", "loss_head"):
        assert fused.components[other] == off.components[other] == ours.components[other], other
    host = estimate(M.llama_65b, recipe, Runtime(embeddings_on_host=True))
    assert ours.components["embeddings"] - host.components["embeddings"] == 2 * 32000 * h  # the input table
    assert peft.config["layer"] == "peft" and list(ours.config)[-4:] == [
        "layer", "step_in_backward", "offload_checkpoints", "embeddings_on_host"
    ]  # fmt: skip


def test_mem14_overhead_is_one_measured_component():
    """MEM-14: the measured CUDA overhead is added as its own component by default; 0 leaves the tensors alone."""
    recipe = M.Recipe(seq_len=512, batch=1)
    with_overhead = estimate(M.llama_7b, recipe)
    bare = estimate(M.llama_7b, recipe, Runtime(overhead_bytes=0))
    assert with_overhead.components["overhead"] == CUDA_OVERHEAD_BYTES == 10**9
    assert "overhead" not in bare.components and with_overhead.total - bare.total == CUDA_OVERHEAD_BYTES
    assert with_overhead.resident - bare.resident == CUDA_OVERHEAD_BYTES  # never pageable


def test_ledger_rejects_bad_runtime():
    """MEM-12, MEM-13: bad switches raise naming the argument."""
    recipe = M.Recipe(seq_len=8, batch=1)
    with pytest.raises(ValueError, match="layer must be one of"):
        Runtime(layer="bnb")
    with pytest.raises(ValueError, match="overhead_bytes must be a non-negative integer"):
        Runtime(overhead_bytes=-1)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="step_group must be a positive integer"):
            Runtime(step_in_backward=True, step_group=bad)
    with pytest.raises(ValueError, match="untied"):
        estimate(SMOLLM2, recipe, Runtime(embeddings_on_host=True))
    with pytest.raises(TypeError, match="Runtime"):
        estimate(M.llama_7b, recipe, dict(layer="peft"))
    with pytest.raises(TypeError, match="Recipe"):
        estimate(M.llama_7b, replace)
