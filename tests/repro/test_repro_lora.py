"""benchmarks/repro_lora.py ("QLoRA replicates 16-bit LoRA"): the data readers and splits on the real files, that each
arm trains exactly the intended parameters over the intended frozen base, that the 16-bit arm differs from QLoRA only
in its base weight, and that the NF4 arm learns on real SST-2.

Model: all-MiniLM-L6-v2 (the model cache; downloaded in CI), and a tiny random LLaMA for the causal-LM arms.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from conftest import IN_CI, REPO, require
from torch import nn

SCRIPT = REPO / "benchmarks" / "repro_lora.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("repro_lora", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["repro_lora"] = mod
    spec.loader.exec_module(mod)
    return mod


R = _load_script()
CPU = torch.device("cpu")
N_TARGETS = 36  # 6 encoder layers x (query, key, value, attention output, intermediate, output)


@pytest.fixture(scope="module")
def minilm():
    """(encoder, tokenizer) of all-MiniLM-L6-v2; skipped locally when not cached, downloaded in CI."""
    from backends.app.hub import minilm_path

    try:
        minilm_path(download=IN_CI)
    except FileNotFoundError:
        require(False, "all-MiniLM-L6-v2 not in the model cache (CI downloads it; or call minilm_path())")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see the script's --threads: 2 threads beside another job are far slower
    yield R.load_minilm()
    torch.set_num_threads(threads)  # leave the rest of the session as found


@pytest.fixture(scope="module")
def sst2_dev(shared_dir):
    return R.read_sst2(shared_dir / "data" / "sst2" / "dev.tsv")


def build(arm, encoder, seed=0, r=4):
    return R.build_classifier(arm, encoder, seed, device=CPU, r=r, alpha=8, dropout=0.1)


# --- data ------------------------------------------------------------------------------------------------------------


def test_sst2_dev_is_the_full_glue_dev_set(sst2_dev):
    assert len(sst2_dev) == 872
    labels = [y for _, y in sst2_dev]
    assert labels.count(1) == 444 and labels.count(0) == 428
    assert all(isinstance(t, str) and t.strip() for t, _ in sst2_dev)


def test_sst2_train_subset_is_fixed(shared_dir):
    rows = R.read_sst2(shared_dir / "data" / "sst2" / "train.tsv")
    assert len(rows) == 67349
    a, b = R.sst2_subset(rows, 3000), R.sst2_subset(rows, 3000)
    assert a == b and len(a) == 3000 and len(set(a)) > 2900  # SST-2 train repeats a few short phrases
    assert a != R.sst2_subset(rows, 3000, seed=R.SST2_SUBSET_SEED + 1)
    assert 0.35 < sum(y for _, y in a) / len(a) < 0.75  # both classes present (train is 56% positive)


def test_read_sst2_rejects_a_bad_row(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("text\tlabel\ngood film \t1\nno label here\n")
    with pytest.raises(ValueError, match="bad.tsv:3"):
        R.read_sst2(bad)


def test_alpaca_split_is_deterministic_and_disjoint(shared_dir):
    from backends.app.data import read_examples

    examples = read_examples(str(shared_dir / "data" / "alpaca" / "alpaca_5000.json"), "alpaca")
    assert len(examples) == 5000
    train, held = R.alpaca_split(len(examples), 250)
    assert (train, held) == R.alpaca_split(len(examples), 250)
    assert len(held) == 250 and len(train) == 4750
    assert not set(train) & set(held) and sorted(train + held) == list(range(5000))
    assert held != list(range(4750, 5000))  # shuffled, not the file's tail
    prompts_train = {examples[i].prompt for i in train}
    assert not any(examples[i].prompt in prompts_train for i in held)  # no held-out instruction seen in training
    with pytest.raises(ValueError):
        R.alpaca_split(10, 10)


def test_lr_schedule():
    lrs = [R.lr_at(k, 100, 1e-3, "linear", 0.1) for k in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3) == max(lrs)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False)) and 0 < lrs[-1] < 2e-5
    assert R.lr_at(57, 100, 1e-3, "constant", 0.1) == 1e-3
    with pytest.raises(ValueError):
        R.lr_at(0, 10, 1e-3, "cosine", 0.1)


def test_claim_rule():
    v = R.claim_verdict([0.80, 0.82, 0.81], [0.805, 0.815, 0.80])
    assert v["holds"] and v["gap"] == pytest.approx(-0.0033333, abs=1e-6)
    assert not R.claim_verdict([0.80, 0.801, 0.80], [0.75, 0.751, 0.75])["holds"]
    assert R.mean_std([1.0]) == (1.0, 0.0)


# --- the arms --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arm", R.SST2_ARMS)
def test_each_arm_trains_only_lora_and_the_head(minilm, arm):
    from backends.torchlib import QLoRALinear

    encoder, _ = minilm
    targets = R.bert_target_names(encoder)
    assert len(targets) == N_TARGETS and all(n.startswith("encoder.layer.") for n in targets)
    model = build(arm, encoder)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"encoder.{t}.lora_{x}" for t in targets for x in "AB"} | {"head.weight", "head.bias"}
    assert trainable == expected
    layers = R.lora_layers(model)
    assert sorted(layers) == sorted(f"encoder.{t}" for t in targets)
    kind = R.LoRALinear16 if arm == "bf16-lora" else QLoRALinear
    assert all(type(m) is kind for m in layers.values())
    assert not any(type(m) is nn.Linear for n, m in model.named_modules() if n.startswith("encoder."))
    for m in layers.values():
        assert m.r == 4 and m.scaling == 2.0 and m.lora_A.dtype == torch.float32
        assert m.lora_A.requires_grad and m.lora_B.requires_grad
        assert torch.count_nonzero(m.lora_B) == 0
    if arm != "bf16-lora":
        qt = R.QUANT_TYPE[arm]
        for m in layers.values():
            assert m.q.quant_type == qt and m.q.double_quant and m.q.blocksize == 64
    # the encoder copy given to the arm is untouched
    assert all(type(encoder.get_submodule(t)) is nn.Linear for t in targets)


def test_bf16_arm_weights_are_exactly_bf16(minilm):
    encoder, _ = minilm
    model = build("bf16-lora", encoder)
    changed = 0
    for name, m in R.lora_layers(model).items():
        w = m.weight
        assert w.dtype == torch.float32 and not w.requires_grad
        assert torch.equal(w, w.to(torch.bfloat16).to(torch.float32))  # every value bf16-representable
        orig = encoder.get_submodule(name.removeprefix("encoder.")).weight.detach()
        assert torch.equal(w, orig.to(torch.bfloat16).float())  # one rounding of the original
        changed += int((w != orig).any())
    assert changed == N_TARGETS  # the fp32 originals really were rounded
    # the other frozen parameters are the original ones in every arm
    for arm in R.SST2_ARMS:
        other = build(arm, encoder)
        emb = other.encoder.embeddings.word_embeddings.weight
        assert torch.equal(emb, encoder.embeddings.word_embeddings.weight) and not emb.requires_grad


def test_arms_share_init_per_seed(minilm):
    encoder, _ = minilm
    a, b = build("bf16-lora", encoder, seed=3), build("qlora-nf4", encoder, seed=3)
    la, lb = R.lora_layers(a), R.lora_layers(b)
    assert all(torch.equal(la[n].lora_A, lb[n].lora_A) for n in la)
    assert torch.equal(a.head.weight, b.head.weight)
    c = build("qlora-nf4", encoder, seed=4)
    assert not torch.equal(R.lora_layers(c)[next(iter(lb))].lora_A, next(iter(lb.values())).lora_A)


def test_lora16_is_qlora_with_a_dense_weight():
    """LoRALinear16 holding QLoRALinear's dequantized weight gives the same output and gradients, bit for bit."""
    from backends.torchlib import QLoRALinear

    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    q = QLoRALinear.from_linear(lin, quant_type="nf4", r=4, alpha=8, dropout=0.2, init="random")
    d = R.LoRALinear16(q.dequantize_weight(torch.float32), bias=lin.bias, r=4, alpha=8, dropout=0.2,
                       weight_dtype=torch.float32)  # fmt: skip
    with torch.no_grad():
        d.lora_A.copy_(q.lora_A)
        d.lora_B.copy_(q.lora_B)
    x = torch.randn(3, 5, 64)
    outs = []
    for layer in (q, d):
        layer.train()
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(7)  # the same dropout seed for both
        y = layer(xi)
        (y * torch.linspace(-1, 1, 48)).sum().backward()
        outs.append((y.detach(), xi.grad, layer.lora_A.grad, layer.lora_B.grad))
    for u, v in zip(*outs, strict=True):
        assert torch.equal(u, v)


def test_nf4_arm_lowers_training_loss_on_real_sst2(minilm, shared_dir):
    import torch.nn.functional as F

    encoder, tokenizer = minilm
    rows = R.sst2_subset(R.read_sst2(shared_dir / "data" / "sst2" / "train.tsv"), 48)
    data = R.tokenize_sst2(rows, tokenizer, 64)
    model = build("qlora-nf4", encoder, r=8)
    ids, mask, y = R.collate_cls(data, tokenizer.pad_token_id, CPU)

    def loss():
        model.eval()
        with torch.no_grad():
            return float(F.cross_entropy(model(ids, mask), y))

    before = loss()
    steps = R.train_classifier(model, data, seed=0, epochs=3, batch_size=16, lr=3e-3, max_grad_norm=1.0,
                               pad_id=tokenizer.pad_token_id, progress=False)  # fmt: skip
    after = loss()
    assert len(steps) == 9
    assert after < 0.7 * before, (before, after)  # measured: 0.72 -> 0.08 (seed 0)
    assert any(torch.count_nonzero(m.lora_B) > 0 for m in R.lora_layers(model).values())  # LoRA moved, not only head


def test_sst2_command_end_to_end(minilm, shared_dir, tmp_path, monkeypatch):
    import benchmarks.common as common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    p = R.main(["sst2", "--seeds", "0", "1", "--arms", "bf16-lora", "qlora-fp4", "--train-examples", "32",
                "--eval-examples", "24", "--batch-size", "16", "--no-progress", "--shared", str(shared_dir),
                "--name", "t", "--threads", "0"])  # fmt: skip
    saved = json.loads((tmp_path / "t.json").read_text())
    assert (tmp_path / "t.png").stat().st_size > 1000
    assert saved["summary"].keys() == {"bf16-lora", "qlora-fp4"} and saved["seeds"] == [0, 1]
    s = saved["summary"]["qlora-fp4"]
    assert s["mean"] == pytest.approx(sum(s["per_seed"].values()) / 2)
    v = saved["claim"]["qlora-fp4"]
    assert v["holds"] == (abs(v["gap"]) <= v["noise"]) and saved["claim_holds"] == v["holds"]
    assert saved["settings"]["dev_examples"] == 24 and saved["settings"]["train_examples"] == 32
    assert p["runs"]["bf16-lora"]["steps"] == 2 and "accuracy_before_training" in p["runs"]["qlora-fp4"]


# --- the causal-LM arms (a tiny random LLaMA stands in for SmolLM2) ---------------------------------------------------


def test_lm_arms_share_targets_and_init():
    from transformers import LlamaConfig, LlamaForCausalLM

    from backends.torchlib import QLoRALinear

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).eval()
    kw = dict(device=CPU, r=8, alpha=16, dropout=0.05, gradient_checkpointing=True)
    a = R.build_lm("bf16-lora", base, 1, **kw)
    b = R.build_lm("qlora-nf4", base, 1, **kw)
    la, lb = R.lora_layers(a), R.lora_layers(b)
    assert list(la) == list(lb) == R.llama_target_names(base) and len(la) == 14  # 7 linears x 2 layers, no LM head
    assert all(type(m) is QLoRALinear and m.q.quant_type == "nf4" and m.q.double_quant for m in lb.values())
    assert all(type(m) is R.LoRALinear16 for m in la.values())
    assert all(torch.equal(la[n].lora_A, lb[n].lora_A) for n in la)
    for model in (a, b):
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {f"{n}.lora_{x}" for n in la for x in "AB"}
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
        assert model.model.gradient_checkpointing  # prepare_model's recompute, in both arms
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        la_out, lb_out = a(input_ids=ids).logits, b(input_ids=ids).logits
    assert la_out.shape == lb_out.shape == (2, 9, 128)
    assert 0 < float((la_out - lb_out).abs().max()) < 1.0  # same model up to the base weights' format
