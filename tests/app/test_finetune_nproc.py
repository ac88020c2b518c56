"""`qlora finetune --nproc 2` (DIST-8): the command re-launches itself under torchrun as 2 gloo ranks on the CPU, and
its per-step losses are the single-process run's within DIST-3's bound; rank 0 alone writes; its checkpoint resumes
in one process on the same curve; bad --nproc input is one line, exit 2, nothing written.

The runs: the tiny LLaMA (conftest's tiny_hf_dir, SmolLM2's tokenizer, 49,152-token vocabulary), the generated task
with 21 training examples in global micro-batches of 4 (an epoch: five of 4 and one of 1, so the run also crosses a
batch that leaves rank 0 without an example), 2 micro-batches per step, r 4, dropout 0 (dropout masks depend on the
micro-batch's shape, so only without dropout are the two runs the same function), lr 1e-2.

The bound, DIST-3 with what the CLI logs: the runs differ only in the order of float32 sums, so at step k (k - 1
updates done) with L_k, |g_k|_2 = grad_norm of the single-process run, u = 2^-24, gamma_j = j u / (1 - j u):

    |L_nproc(k) - L_single(k)| <= 2 gamma_n L_k + 4 (k - 1) lr gamma_m KAPPA sqrt(P) |g_k|_2

n = the step's tokens (>= its response tokens), m = the longest float32 sum in a step (the vocabulary, 49,152 terms,
in the head's backward), P = the LoRA parameters (|g|_1 <= sqrt(P) |g|_2), KAPPA = 10 as DIST-3 assumes.  At step 1
the parameters are equal: the loss within 2 gamma_n L_1 (about 1e-5 relative: a wrong share or a rank training on
the whole batch breaks it), the gradient norm within (2 gamma_m KAPPA + gamma_P) |g_1|_2 (6% relative: a sum where
DDP's mean belongs, i.e. a missing world factor, doubles it).  The tokens per step are integers: equal exactly, which
pins the data position across 2 ranks and the 1-process resume.  Measured: differences of float32 rounding size.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_cli

REPO = Path(__file__).resolve().parents[2]
U = 2.0**-24
KAPPA = 10.0  # DIST-3's assumed weighted condition number of the gradient sums
LR = 1e-2
STEPS, SPLIT_AT = 6, 3  # the single-process curve; the 2-rank run's steps, resumed from there in one process


def gamma(j: int) -> float:
    return j * U / (1 - j * U)


def argv(model_dir, out, *extra) -> list[str]:
    return ["finetune", "--model", str(model_dir), "--data", "task", "--task-train", "21", "--task-eval", "4",
            "--batch-size", "4", "--grad-accum", "2", "--r", "4", "--dropout", "0", "--lr", str(LR),
            "--eval-batches", "1", "--no-progress", "--output-dir", str(out), *extra]  # fmt: skip


def steps_of(run: Path) -> dict[int, dict]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in recs if "loss" in r]
    assert len({r["step"] for r in losses}) == len(losses), "a step logged twice (by two ranks?)"
    return {r["step"]: r for r in losses}


@pytest.fixture(scope="module")
def runs(tiny_hf_dir, tmp_path_factory):
    """The single-process run and the 2-rank run (what it wrote, read now: the resume test continues it)."""
    import torch

    from backends.app.cli import main

    parent = tmp_path_factory.mktemp("two")
    two = parent / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "backends.app.cli", *argv(tiny_hf_dir, two, "--max-steps", str(SPLIT_AT)),
           "--nproc", "2"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )  # fmt: skip  (its own process group: launcher, torchrun, ranks)
    single = tmp_path_factory.mktemp("single") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs (torchrun sets OMP_NUM_THREADS=1)
    try:  # while the 3 processes of the 2-rank run start (mostly importing torch)
        assert main(argv(tiny_hf_dir, single, "--max-steps", str(STEPS))) == 0
    finally:
        torch.set_num_threads(threads)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this test started, ranks included
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-4000:]
    read = {"config": "config.json", "state": "checkpoint/trainer_state.json", "summary": "summary.json"}
    return dict(single=single, two=two, stdout=stdout, listing=sorted(os.listdir(parent)),
                files=sorted(os.listdir(two)), steps=steps_of(two),
                **{name: json.loads((two / path).read_text()) for name, path in read.items()})  # fmt: skip


def lora_count(run: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for t in load_file(run / "checkpoint" / "adapter.safetensors").values())


def bound(rec: dict, k: int, P: int, vocab: int) -> float:
    """DIST-3 at step k (module docstring)."""
    n, m = rec["tokens"], max(vocab, rec["tokens"])
    return 2 * gamma(n) * rec["loss"] + 4 * (k - 1) * LR * gamma(m) * KAPPA * math.sqrt(P) * rec["grad_norm"]


def test_two_ranks_follow_the_single_process_curve(runs, tokenizer):
    """DIST-8, DIST-3: the same global micro-batches split over 2 DDP ranks give the single run's losses."""
    ref, got = steps_of(runs["single"]), runs["steps"]
    assert sorted(ref) == list(range(1, STEPS + 1)) and sorted(got) == list(range(1, SPLIT_AT + 1))
    assert ref[STEPS]["loss"] < ref[1]["loss"] - 0.3  # the curve moves
    P, vocab = lora_count(runs["single"]), len(tokenizer)
    assert len({ref[k]["tokens"] for k in ref}) > 1  # the token counts tell the steps apart
    for k in got:
        assert got[k]["tokens"] == ref[k]["tokens"], k  # the same global micro-batches
        diff = abs(got[k]["loss"] - ref[k]["loss"])
        assert diff <= bound(ref[k], k, P, vocab), (k, diff, bound(ref[k], k, P, vocab))
    assert abs(got[1]["loss"] - ref[1]["loss"]) <= 2 * gamma(ref[1]["tokens"]) * ref[1]["loss"]
    g, g1 = got[1]["grad_norm"], ref[1]["grad_norm"]
    assert abs(g - g1) <= (2 * gamma(vocab) * KAPPA + gamma(P)) * g1, (g, g1)  # DDP's mean, not the ranks' sum


def test_the_2_rank_steps_cross_a_batch_rank_0_has_no_share_of(tiny_hf_dir, tokenizer):
    """DIST-8's weight-0 path is exercised: among the 2-rank run's micro-batches is one of a single example."""
    from backends.app.batching import BatchStream
    from backends.app.cli import finetune_config_from_argv
    from backends.app.datasets import Datasets
    from backends.app.parallel import share

    cfg = finetune_config_from_argv(argv(tiny_hf_dir, "unused")[1:])
    train = Datasets.from_config(cfg, tokenizer).train
    stream = BatchStream(train, 4, seed=cfg.train.seed, group_by_length=cfg.data.group_by_length)
    sizes = [len(stream.next_batch()) for _ in range(2 * SPLIT_AT)]
    assert sorted(sizes) == [1, 4, 4, 4, 4, 4], sizes
    one = [train[0]]
    assert share(one, 0, 2) == (one, 0.0) and share(one, 1, 2) == (one, 1.0)
    assert share(list(range(3)), 0, 2) == ([0], 1.0) and share(list(range(3)), 1, 2) == ([1, 2], 1.0)


def test_rank_0_alone_writes_one_run(runs):
    """DIST-5, DIST-8: one run directory, whole, each step logged once, one 'wrote' line; nothing beside it."""
    assert runs["listing"] == ["run"]  # no run.partial, no second output
    assert runs["files"] == ["adapter", "checkpoint", "config.json", "loss_curve.png", "metrics.jsonl", "summary.json"]
    out = runs["stdout"]
    assert sum(line.startswith("wrote ") for line in out.splitlines()) == 1, out
    assert sum(line.startswith("model ") for line in out.splitlines()) == 1, out  # rank 1 prints nothing
    assert runs["config"]["train"]["nproc"] == 2
    assert runs["state"]["step"] == SPLIT_AT
    assert runs["summary"]["steps"] == SPLIT_AT and runs["summary"]["exact_match_before"] is not None


def test_a_2_rank_checkpoint_resumes_in_one_process(runs, tiny_hf_dir, tokenizer, capsys):
    """DIST-6, DIST-8: --resume --nproc 1 continues the 2-rank run at step 4 on the single-process curve."""
    single, two = runs["single"], runs["two"]
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, out, err = run_cli(argv(tiny_hf_dir, two, "--max-steps", str(STEPS), "--resume", "--nproc", "1"), capsys)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    assert f"at step {SPLIT_AT}" in out
    ref, got = steps_of(single), steps_of(two)
    assert sorted(got) == list(range(1, STEPS + 1))
    P, vocab = lora_count(single), len(tokenizer)
    for k in range(SPLIT_AT + 1, STEPS + 1):
        assert got[k]["tokens"] == ref[k]["tokens"], k  # the global stream's position carried over
        diff = abs(got[k]["loss"] - ref[k]["loss"])
        assert diff <= bound(ref[k], k, P, vocab), (k, diff, bound(ref[k], k, P, vocab))


def test_batch_size_not_a_multiple_of_nproc_is_one_line(tiny_hf_dir, tmp_path, capsys):
    """DIST-8: --batch-size is the global micro-batch; 3 does not split over 2 ranks: exit 2 before anything runs."""
    out = tmp_path / "run"
    code, _, err = run_cli([*argv(tiny_hf_dir, out, "--max-steps", "1"), "--nproc", "2", "--batch-size", "3"], capsys)
    assert_one_line_error(code, err, "--batch-size 3", "--nproc 2", "multiple of 2")
    assert os.listdir(tmp_path) == []


def test_world_size_other_than_nproc_is_one_line(tiny_hf_dir, tmp_path, capsys, monkeypatch):
    """DIST-8: inside torchrun (WORLD_SIZE set), --nproc must say the same number."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_cli([*argv(tiny_hf_dir, tmp_path / "run", "--max-steps", "1"), "--nproc", "4"], capsys)
    assert_one_line_error(code, err, "WORLD_SIZE=2", "--nproc 4")
    assert os.listdir(tmp_path) == []
