"""The training loop on the CPU: loss falls on real Alpaca data, checkpoint/resume continues bit for bit, the
checkpoint swap survives a crash between its renames, exact match agrees with greedy decoding, the PNG is written.

Model: a tiny random LLaMA (2 layers, hidden 64) with SmolLM2-135M-Instruct's real tokenizer and vocabulary (49,152),
prepared by ``prepare_model`` (NF4 base, LoRA on every linear), trained by ``Trainer`` with ``PagedAdamW``.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import TINY_DECODER

from backends.app.checkpoint import CHECKPOINT, find_checkpoint
from backends.app.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from backends.app.data import Example, read_examples, tokenize_examples
from backends.app.evaluate import exact_match, generate, plot_loss_curve
from backends.app.task import is_correct, make_task
from backends.app.trainer import Trainer, seed_everything
from backends.torchlib import prepare_model, qlora_layers

transformers = pytest.importorskip("transformers")


def tiny_model(tokenizer, seed=0, r=8, dropout=0.05):
    cfg = transformers.LlamaConfig(
        **{**TINY_DECODER, "vocab_size": len(tokenizer), "max_position_embeddings": 512},
        tie_word_embeddings=True,
        initializer_range=0.2,  # frozen random embeddings large enough that LoRA can move the logits
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    seed_everything(seed)
    model = transformers.LlamaForCausalLM(cfg)
    return prepare_model(model, backend="numpy", r=r, alpha=16, dropout=dropout)


def run_config(out, **train) -> RunConfig:
    t = dict(output_dir=str(out), lr=1e-3, batch_size=4, grad_accum=2, max_steps=4, progress=False, seed=0)
    t.update(train)
    return RunConfig(ModelConfig(r=8), DataConfig(max_len=256), TrainConfig(**t))


@pytest.fixture(scope="module")
def alpaca_slice(shared_dir, tokenizer):
    examples = read_examples(str(shared_dir / "data" / "alpaca" / "alpaca_5000.json"))
    data = tokenize_examples(examples[:400], tokenizer, max_len=4096)
    return [t for t in data if len(t) <= 96][:48]  # short ones: a fast test


def test_loss_falls_on_real_alpaca(tokenizer, alpaca_slice, tmp_path):
    """16 steps over 8 real Alpaca examples (4 epochs): the response loss on them falls by more than a third."""
    model = tiny_model(tokenizer)
    cfg = run_config(tmp_path, max_steps=16, lr=1e-2, grad_accum=1)
    data = alpaca_slice[:8]
    trainer = Trainer(model, tokenizer, cfg, data, data, run_dir=str(tmp_path))
    before = trainer.evaluate()  # no dropout in eval: a deterministic loss
    history = trainer.fit()
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 16 and all(h["grad_norm"] > 0 for h in history if "loss" in h)
    after = [h["eval_loss"] for h in history if "eval_loss" in h][-1]
    assert after < 0.67 * before, (before, after, losses)  # measured: 11.99 -> 4.77 nats
    assert sum(losses[-4:]) < sum(losses[:4]) - 4.0, losses
    lines = [json.loads(s) for s in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 17))
    assert {"tokens_per_s", "mem_gb", "grad_norm", "lr"} <= set(lines[0])


def _lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_resume_continues_bit_for_bit(tokenizer, alpaca_slice, tmp_path):
    """4 steps straight == 2 steps, checkpoint, a fresh process-like restart (new model, new optimizer), 2 steps.

    Dropout 0.05 is on, grad_accum 2 and group-by-length too: the RNG states and the data position must travel."""
    data, ev = alpaca_slice[:24], alpaca_slice[24:32]  # 24 examples = 3 batches of 4 x 2: step 4 is in epoch 2
    straight = Trainer(
        tiny_model(tokenizer), tokenizer, run_config(tmp_path / "a"), data, ev, run_dir=str(tmp_path / "a")
    )
    straight.fit()
    want = _lora_state(straight.model)

    cfg = run_config(tmp_path / "b", max_steps=2)
    first = Trainer(tiny_model(tokenizer), tokenizer, cfg, data, ev, run_dir=str(tmp_path / "b"))
    first.fit()
    torch.manual_seed(12345)  # the restarted process starts from a different RNG state; the checkpoint restores it
    cfg2 = run_config(tmp_path / "b", max_steps=4)
    restarted = tiny_model(tokenizer)  # the same base weights (a pretrained model) ...
    for m in qlora_layers(restarted).values():
        m.reset_lora_parameters("random")  # ... but LoRA weights that only the checkpoint can put right
    second = Trainer(restarted, tokenizer, cfg2, data, ev, run_dir=str(tmp_path / "b"))
    second.load_checkpoint()
    assert second.step == 2
    second.fit()
    got = _lora_state(second.model)
    assert list(got) == list(want)
    for n in want:
        assert torch.equal(got[n], want[n]), f"{n} differs after resume"
    loss = lambda t: [h["loss"] for h in t.history if "loss" in h]  # noqa: E731
    assert loss(second) == loss(straight)  # the exact float losses, step for step
    sa, sb = straight.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["m"], sb[i]["m"]) and torch.equal(sa[i]["v"], sb[i]["v"]) for i in sa)


def test_checkpoint_is_swapped_atomically(tokenizer, alpaca_slice, tmp_path):
    trainer = Trainer(tiny_model(tokenizer), tokenizer, run_config(tmp_path, max_steps=1), alpaca_slice[:8], None,
                      run_dir=str(tmp_path))  # fmt: skip
    trainer.fit()
    ckpt = tmp_path / CHECKPOINT
    assert sorted(os.listdir(ckpt)) == ["adapter.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json"]
    assert sorted(os.listdir(tmp_path)) == [CHECKPOINT, "metrics.jsonl"]  # no temp or old dirs left
    # a crash between the two renames of a later save: only .checkpoint-old exists; it is still found
    os.replace(ckpt, tmp_path / ".checkpoint-old")
    os.makedirs(tmp_path / ".checkpoint-tmp")  # a half-built new one is ignored
    assert find_checkpoint(str(tmp_path)) == str(tmp_path / ".checkpoint-old")
    resumed = Trainer(tiny_model(tokenizer), tokenizer, run_config(tmp_path, max_steps=2), alpaca_slice[:8], None,
                      run_dir=str(tmp_path))  # fmt: skip
    resumed.load_checkpoint()
    assert resumed.step == 1
    resumed.fit()
    assert find_checkpoint(str(tmp_path)) == str(ckpt)
    assert not (tmp_path / ".checkpoint-old").exists() and not (tmp_path / ".checkpoint-tmp").exists()
    shutil.rmtree(ckpt)
    with pytest.raises(ValueError, match="no checkpoint"):
        resumed.load_checkpoint()


def test_resume_refuses_a_different_model(tokenizer, alpaca_slice, tmp_path):
    Trainer(tiny_model(tokenizer), tokenizer, run_config(tmp_path, max_steps=1), alpaca_slice[:8], None,
            run_dir=str(tmp_path)).fit()  # fmt: skip
    other = Trainer(tiny_model(tokenizer, r=4), tokenizer, run_config(tmp_path), alpaca_slice[:8], None,
                    run_dir=str(tmp_path))  # fmt: skip
    with pytest.raises(ValueError, match="shape"):
        other.load_checkpoint()


def test_exact_match_agrees_with_greedy_generation(tokenizer, tmp_path):
    """Teacher-forced exact match == 'greedy decoding yields the answer, then the end token'.

    The tiny model is first taught the task a little so that both verdicts occur; the 'answers' scored are then the
    model's own greedy outputs (must all be right) and the task's answers (right exactly where generation is)."""
    model = tiny_model(tokenizer, dropout=0.0)
    train, ev = make_task(tokenizer, n_train=64, n_eval=12, seed=1)
    data = tokenize_examples(train, tokenizer, max_len=256)
    Trainer(model, tokenizer, run_config(tmp_path, max_steps=30, lr=1e-2, batch_size=8, grad_accum=1), data, None,
            run_dir=str(tmp_path)).fit()  # fmt: skip
    outs = generate(model, tokenizer, [e.prompt for e in ev], max_new_tokens=24)
    acc, verdicts = exact_match(model, tokenizer, ev)
    assert verdicts == [is_correct(o, e.answer) and o.strip() == e.answer for o, e in zip(outs, ev, strict=True)]
    assert acc == sum(verdicts) / len(ev)
    own = [Example(e.prompt, o, o) for e, o in zip(ev, outs, strict=True) if o and o == o.strip()]
    if own:  # greedy outputs that ended with the end token within 24 tokens are, by definition, exact matches
        finished = [len(tokenizer(o, add_special_tokens=False)["input_ids"]) < 24 for o in (x.answer for x in own)]
        _, own_verdicts = exact_match(model, tokenizer, own)
        assert [v for v, f in zip(own_verdicts, finished, strict=True) if f] == [True] * sum(finished)


def test_loss_curve_png(tmp_path):
    history = [{"step": s, "loss": 3.0 / s} for s in range(1, 6)] + [{"step": 5, "eval_loss": 0.7}]
    plot_loss_curve(history, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_task_scores_come_from_one_pass(tokenizer, tmp_path, monkeypatch):
    """On the generated task the eval-loss set is the exact-match set, so both scores come from one pass (before
    training in scores(), after it in fit's closing eval, which scores() then reuses); they equal the two separate
    passes (eval_loss over the set, exact_match over the examples)."""
    import backends.app.evaluate as ev_mod
    from backends.app.evaluate import eval_loss, pad_id_of

    model = tiny_model(tokenizer, dropout=0.0)
    train, held = make_task(tokenizer, n_train=16, n_eval=12, seed=2)
    data, held_tok = (tokenize_examples(x, tokenizer, max_len=256) for x in (train, held))
    cfg = run_config(tmp_path, max_steps=3, lr=1e-2, batch_size=4, grad_accum=1, eval_batches=0)
    trainer = Trainer(model, tokenizer, cfg, data, held_tok, run_dir=str(tmp_path), scored=held)
    calls = []
    rows = ev_mod.response_rows
    monkeypatch.setattr(ev_mod, "response_rows", lambda m, b: calls.append(len(b["labels"])) or rows(m, b))

    def separately():
        with monkeypatch.context() as mp:
            mp.setattr(ev_mod, "response_rows", rows)
            return eval_loss(model, held_tok, batch_size=4, pad_id=pad_id_of(tokenizer)), exact_match(
                model, tokenizer, held
            )[0]

    for when in ("before", "after"):
        if when == "after":
            trainer.fit()
            assert calls[-3:] == [4, 4, 4]  # fit's closing eval: the one pass
        calls.clear()
        got = trainer.scores()
        assert calls == ([4, 4, 4] if when == "before" else [])
        want_loss, want_em = separately()
        assert got["eval_loss"] == pytest.approx(want_loss, rel=1e-6) and got["exact_match"] == want_em
    trainer.cfg.train.eval_batches = 1  # a partial eval-loss set is not the exact-match set: two passes again
    trainer._same_sets, trainer._exact_match_at, trainer.history = None, None, []
    calls.clear()
    trainer.scores()
    assert calls == [4, 12]  # one eval-loss batch of 4, then exact match over the 12 examples in one batch of 16


def test_save_minutes_checkpoints_during_the_run(tokenizer, alpaca_slice, tmp_path):
    """--save-minutes: with --save-every 0 a checkpoint is still written once that many minutes passed since the last
    one (here: a zero-length interval, so after every step), so a kill loses at most that much of the run."""
    data = alpaca_slice[:16]
    seen = []
    cfg = run_config(tmp_path, max_steps=3, save_every=0, save_minutes=1e-9)
    trainer = Trainer(tiny_model(tokenizer), tokenizer, cfg, data, run_dir=str(tmp_path))

    def on_step(t, rec):
        state = tmp_path / "checkpoint" / "trainer_state.json"
        seen.append(json.loads(state.read_text())["step"] if state.exists() else None)

    trainer.fit(on_step=on_step)
    assert seen == [1, 2, 2]  # after the last step fit() writes the end-of-run checkpoint itself
    off = run_config(tmp_path / "off", max_steps=2, save_every=0, save_minutes=0)
    seen.clear()
    Trainer(tiny_model(tokenizer), tokenizer, off, data, run_dir=str(tmp_path / "off")).fit(
        on_step=lambda t, rec: seen.append((tmp_path / "off" / "checkpoint").exists())
    )
    assert seen == [False, False]


def test_non_finite_gradient_stops_the_step_before_anything_changes(tokenizer, alpaca_slice, tmp_path):
    """A NaN in one LoRA gradient: the step's clip refuses it (the optimizer's own check is off, trainer.py), and no
    weight, optimizer state or step count moves."""
    from qlora_ref.checks import NonFiniteError

    model = tiny_model(tokenizer)
    trainer = Trainer(model, tokenizer, run_config(tmp_path, grad_accum=1), alpaca_slice[:8], run_dir=str(tmp_path))
    assert trainer.optimizer.check_finite is False
    trainer.train_step()
    before, opt_before = _lora_state(model), trainer.optimizer.state_dict()
    p = next(p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n)
    handle = p.register_hook(lambda g: g * float("nan"))
    with pytest.raises((NonFiniteError, FloatingPointError), match="non-finite|NaN"):
        trainer.train_step()
    handle.remove()
    after, opt_after = _lora_state(model), trainer.optimizer.state_dict()
    assert trainer.step == 1 and all(torch.equal(before[n], after[n]) for n in before)
    for i, s in opt_before["state"].items():
        assert all(torch.equal(s[k], opt_after["state"][i][k]) if torch.is_tensor(s[k]) else s[k] ==
                   opt_after["state"][i][k] for k in s)  # fmt: skip
