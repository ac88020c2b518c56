"""MMLU (backends/app/mmlu.py): the prompt byte for byte, letter scoring on a fake model whose logits the test sets,
the two averages, both CSV layouts and their errors, truncation counting; and SmolLM2 on real dev files (leave-one-out).
"""

from __future__ import annotations

import json
import os
import re
from types import SimpleNamespace

import pytest
import torch
from conftest import IN_CI, require

from backends.app import mmlu
from backends.app.data import DataError
from backends.app.mmlu import Question


class WordTokenizer:
    """Each token is a run of whitespace plus the non-space run after it: "Answer: A" -> ["Answer:", " A"]."""

    pad_token_id, eos_token_id = 0, None

    def __init__(self):
        self.vocab, self.words = {"<pad>": 0}, ["<pad>"]

    def __call__(self, text, add_special_tokens=True):
        ids = []
        for w in re.findall(r"\s*\S+|\s+$", text):
            if w not in self.vocab:
                self.vocab[w] = len(self.words)
                self.words.append(w)
            ids.append(self.vocab[w])
        return {"input_ids": ids}

    def decode(self, ids):
        return "".join(self.words[i] for i in ids)


class CharTokenizer(WordTokenizer):
    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}


class FakeLM(torch.nn.Module):
    """Next-token logits set by the test: ``table[question]`` for the letters " A".." D", 0 for every other token.

    The question is read back from each row's unpadded tokens (the text between the last blank line and "\\nA."; a
    left-truncated prompt: the table's one question that ends with what is left).
    Checks that every row's positions count 0, 1, ... from its first real token (left padding) and records the rows.
    """

    def __init__(self, tokenizer, table, vocab=64, max_positions=4096):
        super().__init__()
        self.tok, self.table, self.vocab = tokenizer, table, vocab
        self.config = SimpleNamespace(max_position_embeddings=max_positions)
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[str] = []

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep):
        assert logits_to_keep == 1
        letters = mmlu.letter_token_ids(self.tok)
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab)
        for b in range(input_ids.shape[0]):
            keep = attention_mask[b].bool()
            assert position_ids[b][keep].tolist() == list(range(int(keep.sum())))
            text = self.tok.decode(input_ids[b][keep].tolist())
            self.seen.append(text)
            question = text.rsplit("\n\n", 1)[-1].split("\nA. ")[0].strip()  # cut left: the question's tail
            (key,) = [k for k in self.table if k.endswith(question)]
            logits[b, 0, letters] = torch.tensor(self.table[key])
        return SimpleNamespace(logits=logits)


DEV = [
    Question("What is 1+1?", ("1", "2", "3", "4"), 1),
    Question("Which is a colour?", ("red", "dog", "car", "sky"), 0),
]
Q = Question("What is 2+2?", ("3", "5", "4", "22"), 2)

EXPECTED_2_SHOT = (
    "The following are multiple choice questions (with answers) about tiny subject.\n\n"
    "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
    "Which is a colour?\nA. red\nB. dog\nC. car\nD. sky\nAnswer: A\n\n"
    "What is 2+2?\nA. 3\nB. 5\nC. 4\nD. 22\nAnswer:"
)


def write_reformatted(path, questions):
    rows = ["question,choice0,choice1,choice2,choice3,answer"]
    rows += [",".join([f'"{q.question}"', *(f'"{c}"' for c in q.choices), str(q.answer)]) for q in questions]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")


def write_original(path, questions):
    rows = [",".join([f'"{q.question}"', *(f'"{c}"' for c in q.choices), "ABCD"[q.answer]]) for q in questions]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")


# --- the prompt ---------------------------------------------------------------------------------------------------


def test_prompt_text_byte_for_byte():
    assert mmlu.prompt("tiny_subject", DEV, Q) == EXPECTED_2_SHOT
    assert mmlu.prompt("tiny_subject", [], Q) == (
        "The following are multiple choice questions (with answers) about tiny subject.\n\n"
        "What is 2+2?\nA. 3\nB. 5\nC. 4\nD. 22\nAnswer:"
    )


def test_prompt_from_files_in_both_layouts_is_the_same(tmp_path):
    write_reformatted(tmp_path / "a" / "dev" / "tiny_subject_dev.csv", DEV)
    write_original(tmp_path / "b" / "dev" / "tiny_subject_dev.csv", DEV)
    for layout in ("a", "b"):
        dev = mmlu.read_csv(mmlu.subject_files(tmp_path / layout, "dev")["tiny_subject"])
        assert dev == DEV
        assert mmlu.prompt("tiny_subject", dev, Q) == EXPECTED_2_SHOT


def test_quoted_fields_with_commas_and_newlines_are_read(tmp_path):
    path = tmp_path / "x_test.csv"
    path.write_text('"Statement 1 | a, b\nStatement 2 | c","True, True","False, False",x,y,D\n')
    assert mmlu.read_csv(path) == [Question("Statement 1 | a, b\nStatement 2 | c", ("True, True", "False, False", "x",
                                                                                     "y"), 3)]  # fmt: skip


@pytest.mark.parametrize(
    "content, needle",
    [
        ("question,choice0,choice1,choice2,choice3,answer\nq,a,b,c,d,4\n", "answer '4' is not one of 0, 1, 2, 3"),
        ("question,choice0,choice1,choice2,choice3,answer\nq,a,b,c,d,B\n", "answer 'B' is not one of 0, 1, 2, 3"),
        ("q,a,b,c,d,E\n", "answer 'E' is not one of A, B, C, D"),
        ("q,a,b,c,d,1\n", "answer '1' is not one of A, B, C, D"),
        ("q,a,b,c,A\n", "row 1: 5 fields, expected 6"),
        ("question,choice0,choice1,choice2,choice3,answer\nq,a,b,c,d,1\nq,a,b,c,d,e,1\n", "row 3: 7 fields"),
    ],
)
def test_a_malformed_row_is_one_clear_error(tmp_path, content, needle):
    path = tmp_path / "bad_dev.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=re.escape(needle)) as e:
        mmlu.read_csv(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


# --- letter scoring and averages ----------------------------------------------------------------------------------


def test_letter_tokens_are_the_ones_after_answer_colon():
    tok = WordTokenizer()
    ids = mmlu.letter_token_ids(tok)
    assert [tok.decode([i]) for i in ids] == [" A", " B", " C", " D"]
    with pytest.raises(ValueError, match="one letter token"):
        mmlu.letter_token_ids(CharTokenizer())  # "Answer: A" -> ..., ":", " ", "A": no single token after "Answer:"


def test_averages_on_a_hand_checked_example():
    per = {"a": {"correct": 1, "n": 2}, "b": {"correct": 3, "n": 3}, "c": {"correct": 0, "n": 5}}
    s = mmlu.summarize(per)
    # macro = (1/2 + 3/3 + 0/5) / 3 = 0.5;  micro = (1 + 3 + 0) / (2 + 3 + 5) = 0.4
    assert s["mmlu_macro_acc"] == pytest.approx(0.5) and s["mmlu_micro_acc"] == pytest.approx(0.4)
    assert (s["n_questions"], s["n_subjects"]) == (10, 3)
    assert [per[k]["acc"] for k in "abc"] == pytest.approx([0.5, 1.0, 0.0])


def make_dir(tmp_path):
    """dev in the re-formatted layout, test in the original one: alpha (3 questions), beta (2 questions)."""
    write_reformatted(tmp_path / "dev" / "alpha_dev.csv", DEV)
    write_reformatted(tmp_path / "dev" / "beta_dev.csv", DEV)
    alpha = [Question(f"alpha q{i}?", ("w", "x", "y", "z"), a) for i, a in enumerate([0, 3, 2])]
    beta = [Question(f"beta q{i} is longer than the others?", ("w", "x", "y", "z"), a) for i, a in enumerate([1, 1])]
    write_original(tmp_path / "test" / "alpha_test.csv", alpha)
    write_original(tmp_path / "test" / "beta_test.csv", beta)
    table = {
        "alpha q0?": [2.0, 1.0, 0.0, -1.0],  # A, right
        "alpha q1?": [0.0, 0.5, 0.2, 0.4],  # B, wrong (D)
        "alpha q2?": [-3.0, -2.0, -1.0, -4.0],  # C, right
        "beta q0 is longer than the others?": [0.0, 9.0, 1.0, 2.0],  # B, right
        "beta q1 is longer than the others?": [5.0, 4.0, 3.0, 2.0],  # A, wrong (B)
    }
    return table


def test_letter_scoring_and_both_averages_on_a_fake_model(tmp_path):
    table = make_dir(tmp_path)
    tok = WordTokenizer()
    model = FakeLM(tok, table)
    model.train()
    r = mmlu.evaluate_mmlu(model, tok, tmp_path, split="test", shots=2, batch_size=2, progress=False)
    assert model.training  # mode restored
    assert r["per_subject"]["alpha"] == {"correct": 2, "n": 3, "pred": "ABC", "acc": pytest.approx(2 / 3)}
    assert r["per_subject"]["beta"] == {"correct": 1, "n": 2, "pred": "BA", "acc": 0.5}
    assert r["mmlu_macro_acc"] == pytest.approx((2 / 3 + 1 / 2) / 2) and r["mmlu_micro_acc"] == pytest.approx(3 / 5)
    assert r["n_truncated"] == 0 and r["max_length"] == 4096 and not r["leave_one_out"]
    # every prompt is the full 2-shot prompt of its own subject
    assert sorted(model.seen) == sorted(mmlu.prompt(s, DEV, q) for s in ("alpha", "beta")
                                        for q in mmlu.read_csv(tmp_path / "test" / f"{s}_test.csv"))  # fmt: skip

    only = mmlu.evaluate_mmlu(FakeLM(tok, table), tok, tmp_path, shots=0, subjects=["beta"], progress=False)
    assert list(only["per_subject"]) == ["beta"] and only["mmlu_macro_acc"] == only["mmlu_micro_acc"] == 0.5

    mmlu.write_outputs(r, tmp_path / "out" / "mmlu.json", tmp_path / "out" / "mmlu.png")
    assert json.loads((tmp_path / "out" / "mmlu.json").read_text())["mmlu_micro_acc"] == pytest.approx(0.6)
    assert (tmp_path / "out" / "mmlu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dev_scoring_uses_leave_one_out_shots(tmp_path):
    dev = [Question(f"dev q{i}?", ("w", "x", "y", "z"), i % 4) for i in range(5)]
    write_reformatted(tmp_path / "dev" / "gamma_dev.csv", dev)
    tok = WordTokenizer()
    model = FakeLM(tok, {q.question: [float(j == q.answer) for j in range(4)] for q in dev})
    r = mmlu.evaluate_mmlu(model, tok, tmp_path, split="dev", shots=4, progress=False)
    assert r["per_subject"]["gamma"]["pred"] == "ABCDA" and r["mmlu_micro_acc"] == 1.0 and r["leave_one_out"]
    assert sorted(model.seen) == sorted(mmlu.prompt("gamma", dev[:i] + dev[i + 1 :], q) for i, q in enumerate(dev))
    with pytest.raises(DataError, match="5 shots asked, 4 dev examples available for dev"):
        mmlu.evaluate_mmlu(model, tok, tmp_path, split="dev", shots=5, progress=False)


def test_missing_dev_subject_and_split_are_clear_errors(tmp_path):
    table = make_dir(tmp_path)
    write_original(tmp_path / "test" / "delta_test.csv", [Q])
    tok = WordTokenizer()
    with pytest.raises(DataError, match=r"subject 'delta' has no dev examples .*dev/delta_dev.csv.*--shots 0"):
        mmlu.evaluate_mmlu(FakeLM(tok, table), tok, tmp_path, progress=False)
    with pytest.raises(DataError, match="subject 'nope' has no test file"):
        mmlu.evaluate_mmlu(FakeLM(tok, table), tok, tmp_path, subjects=["nope"], progress=False)
    with pytest.raises(DataError, match="no val/ folder"):
        mmlu.evaluate_mmlu(FakeLM(tok, table), tok, tmp_path, split="val", progress=False)


# --- truncation ---------------------------------------------------------------------------------------------------


def test_truncation_drops_shots_first_then_cuts_left():
    tok = WordTokenizer()
    full = mmlu.encode(tok, EXPECTED_2_SHOT)
    one = mmlu.encode(tok, mmlu.prompt("tiny_subject", DEV[:1], Q))
    zero = mmlu.encode(tok, mmlu.prompt("tiny_subject", [], Q))
    assert len(full) > len(one) > len(zero)
    assert mmlu.fit_prompt(tok, "tiny_subject", DEV, Q, len(full)) == (full, False)
    assert mmlu.fit_prompt(tok, "tiny_subject", DEV, Q, len(full) - 1) == (one, True)  # the last shot goes first
    assert mmlu.fit_prompt(tok, "tiny_subject", DEV, Q, len(one)) == (one, True)
    assert mmlu.fit_prompt(tok, "tiny_subject", DEV, Q, len(zero)) == (zero, True)
    assert mmlu.fit_prompt(tok, "tiny_subject", DEV, Q, len(zero) - 3) == (zero[3:], True)  # left-truncated
    assert tok.decode(zero[3:]).endswith("\nD. 22\nAnswer:")


def test_truncated_prompts_are_counted(tmp_path):
    table = make_dir(tmp_path)  # alpha's 3 questions are shorter than beta's 2
    tok = WordTokenizer()
    alpha_len = len(mmlu.encode(tok, mmlu.prompt("alpha", DEV, Question("alpha q0?", ("w", "x", "y", "z"), 0))))
    model = FakeLM(tok, table)
    r = mmlu.evaluate_mmlu(model, tok, tmp_path, shots=2, max_length=alpha_len, progress=False)
    assert r["n_truncated"] == 2 and r["max_length"] == alpha_len  # beta's two prompts lost their last shot
    assert max(len(mmlu.encode(tok, t)) for t in model.seen) == alpha_len
    assert sum(t.count("Answer: ") for t in model.seen) == 3 * 2 + 2 * 1
    model = FakeLM(tok, table)
    r = mmlu.evaluate_mmlu(model, tok, tmp_path, shots=2, max_length=15, progress=False)
    assert r["n_truncated"] == 5  # every prompt: no shot left, then cut to its last 15 tokens; the same scores
    assert [len(mmlu.encode(tok, t)) for t in model.seen] == [15] * 5 and not any("Answer: " in t for t in model.seen)
    assert r["per_subject"]["alpha"]["pred"] == "ABC" and r["per_subject"]["beta"]["pred"] == "BA"


# --- the real model on the real dev files -------------------------------------------------------------------------

REAL_SUBJECTS = ["world_religions", "management"]  # the shortest prompts, to stay quick


@pytest.fixture(scope="module")
def smollm2():
    from backends.app.hub import find_smollm2_gguf, smollm2_gguf_path
    from backends.torchlib.load import load_model

    path = smollm2_gguf_path(download=True) if IN_CI else find_smollm2_gguf()
    require(path is not None, "SmolLM2 GGUF not in the model cache (CI downloads it; or call smollm2_gguf_path())")
    return load_model(str(path), prepare=False)


def test_smollm2_on_real_dev_files_with_leave_one_out_shots(smollm2, tokenizer, shared_dir):
    mmlu_dir = shared_dir / "data" / "mmlu"  # read in place
    assert mmlu.letter_token_ids(tokenizer) == [tokenizer("Answer: " + c)["input_ids"][-1] for c in "ABCD"]
    assert [tokenizer.decode([i]) for i in mmlu.letter_token_ids(tokenizer)] == [" A", " B", " C", " D"]
    r = mmlu.evaluate_mmlu(smollm2, tokenizer, mmlu_dir, split="dev", shots=1, subjects=REAL_SUBJECTS,
                           batch_size=5, progress=False)  # fmt: skip
    assert r["n_questions"] == 10 and r["n_subjects"] == 2 and r["n_truncated"] == 0 and r["max_length"] == 8192
    correct = 0
    for s in REAL_SUBJECTS:
        dev = mmlu.read_csv(os.path.join(mmlu_dir, "dev", f"{s}_dev.csv"))
        pred = r["per_subject"][s]["pred"]
        assert len(pred) == 5 and r["per_subject"][s]["correct"] == sum(
            p == "ABCD"[q.answer] for p, q in zip(pred, dev, strict=True)
        )
        correct += r["per_subject"][s]["correct"]
    assert r["mmlu_micro_acc"] == correct / 10
    assert r["mmlu_macro_acc"] == pytest.approx(sum(r["per_subject"][s]["acc"] for s in REAL_SUBJECTS) / 2)

    # left-padded batched letter logits == each prompt alone with every position's logits (the 2 shortest prompts)
    dev = mmlu.read_csv(os.path.join(mmlu_dir, "dev", "world_religions_dev.csv"))
    prompts = [mmlu.fit_prompt(tokenizer, "world_religions", (dev[:i] + dev[i + 1 :])[:1], q, 8192)[0]
               for i, q in enumerate(dev)]  # fmt: skip
    pick = sorted(range(5), key=lambda i: len(prompts[i]))[:2]
    letters = mmlu.letter_token_ids(tokenizer)
    batched = mmlu.letter_logits(smollm2, [prompts[i] for i in pick], letters, pad_id=0, batch_size=2)  # (2, 4)
    with torch.no_grad():
        alone = torch.stack([smollm2(input_ids=torch.tensor([prompts[i]])).logits[0, -1, letters] for i in pick])
    torch.testing.assert_close(batched, alone.float(), atol=2e-3, rtol=1e-3)
    assert ["ABCD"[j] for j in alone.argmax(-1).tolist()] == [r["per_subject"]["world_religions"]["pred"][i]
                                                               for i in pick]  # fmt: skip


# --- qlora eval --mmlu --------------------------------------------------------------------------------------------


def test_qlora_eval_mmlu_on_a_tiny_model(tokenizer, shared_dir, tmp_path, capsys):
    """The command line end to end (a tiny random LLaMA with SmolLM2's tokenizer, NF4): JSON + PNG, one-line errors."""
    import transformers
    from conftest import TINY_DECODER

    from backends.app.cli import main

    d = tmp_path / "tiny"
    cfg = transformers.LlamaConfig(**{**TINY_DECODER, "vocab_size": len(tokenizer), "max_position_embeddings": 128},
                                   tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    tokenizer.save_pretrained(d)
    mmlu_dir, out = shared_dir / "data" / "mmlu", tmp_path / "res" / "mmlu.json"
    argv = ["eval", "--model", str(d), "--mmlu", str(mmlu_dir), "--mmlu-split", "dev", "--shots", "1", "--subjects",
            "anatomy, management", "--mmlu-out", str(out), "--json", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "macro" in stdout and "micro" in stdout and "prompts truncated to 128 tokens" in stdout
    line = json.loads(stdout.strip().splitlines()[-1])
    saved = json.loads(out.read_text())
    assert saved["n_questions"] == line["n_questions"] == 10 and list(saved["per_subject"]) == ["anatomy", "management"]
    assert (
        saved["n_truncated"]
        == line["n_truncated"]
        == sum(
            mmlu.fit_prompt(tokenizer, s, (dev[:i] + dev[i + 1 :])[:1], q, 128)[1]
            for s in ("anatomy", "management")
            for dev in [mmlu.read_csv(mmlu_dir / "dev" / f"{s}_dev.csv")]
            for i, q in enumerate(dev)
        )
    )
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    for bad, needle in [(["--task"], "give one of --task, --data FILE or --mmlu DIR"),
                        (["--shots", "5"], "5 shots asked, 4 dev examples available"),
                        (["--shots", "-1"], "--shots must be >= 0"),
                        (["--subjects", "nope"], "subject 'nope' has no dev file")]:  # fmt: skip
        code = main(["eval", "--model", str(d), "--mmlu", str(mmlu_dir), "--mmlu-split", "dev", *bad, "--no-progress"])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert code == 2 and len(err) == 1 and needle in err[0], (bad, err)
