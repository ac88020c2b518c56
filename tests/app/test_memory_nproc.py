"""Issue 14: `qlora memory --nproc N [--shard]`, the per-GPU ledger of DIST-7 (specs/distributed.md) on the command
line: DDP replicas plus their gradient buckets, FSDP2's shards plus two gathered blocks, and the note's 70B table."""

from __future__ import annotations

import json

from conftest import assert_one_line_error, run_cli

from backends.torchlib.ledger import Runtime, estimate, per_rank_estimate
from qlora_ref import memory

LLAMA2_70B = dict(
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    vocab_size=32000,
)  # fmt: skip  (the shape of specs/distributed.md's table)


def _total_gb(out: str) -> float:
    return float(next(line for line in out.splitlines() if line.startswith("total")).split()[2])


def test_memory_per_gpu_with_ddp_and_fsdp2(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAMA2_70B))
    shape = memory.shape_from_dict(LLAMA2_70B)
    recipe = memory.Recipe(seq_len=512, batch=1)
    totals = {}
    for argv, world, shard in (([], 1, False), (["--nproc", "8"], 8, False), (["--nproc", "8", "--shard"], 8, True)):
        code, out, err = run_cli(["memory", "--model", str(cfg), *argv, "--gpu-gb", "24"], capsys)
        assert code == 0, err
        want = per_rank_estimate(shape, recipe, Runtime(layer="qlora-ref"), world=world, shard=shard)
        assert f"{want.total:,}" in out and f"{want.resident:,}" in out
        totals[(world, shard)] = _total_gb(out)
        if world > 1:
            assert f"per GPU of 8, {'FSDP2' if shard else 'DDP'}" in out and "fits in 24 GB per GPU" in out
            assert ("fsdp_gather" if shard else "ddp_buckets") in out
    # specs/distributed.md DIST-7's table: 48.92 GB on one GPU, 50.58 per GPU under DDP, 10.25 with FSDP2
    assert {k: round(v, 2) for k, v in totals.items()} == {(1, False): 48.92, (8, False): 50.58, (8, True): 10.25}
    assert (
        estimate(shape, recipe, Runtime(layer="qlora-ref")).total
        == per_rank_estimate(shape, recipe, Runtime(layer="qlora-ref"), world=1).total
    )  # --nproc 1 is the single-GPU ledger
    code, out, _ = run_cli(["memory", "--model", "llama-65b", "--nproc", "2", "--shard", "--batch", "2"], capsys)
    assert code == 0 and "batch 2 per GPU (4 in all)" in out


def test_memory_nproc_bad_input_is_one_line(capsys):
    for argv, want in (
        (["--nproc", "0"], "--nproc must be >= 1, got 0"),
        (["--shard"], "--shard splits the model over --nproc N"),
        (["--nproc", "2", "--step-in-backward"], "--step-in-backward"),
        (["--nproc", "two"], "--nproc"),
    ):
        code, out, err = run_cli(["memory", "--model", "llama-7b", *argv], capsys)
        assert_one_line_error(code, err, want)
        assert out == ""
