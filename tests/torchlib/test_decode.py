"""Greedy decoding with a static KV cache and a captured decode step (backends/torchlib/decode.py, issue 13).

CPU (the eager static-cache loop, which the captured one replays):
- its tokens are transformers' ``model.generate(do_sample=False)``'s, token for token, on a plain tiny LLaMA and on
  a QLoRA-prepared one (numpy backend, LoRA active), for a left-padded batch of different prompt lengths;
- its decode step reads no tensor value back to the host (what a capture forbids);
- an end token stops each row (pad after it, as generate) and the whole decode once every row has one;
- ``qlora generate``'s answers (answers.py) are the same whichever decoder runs, and --backend cupy on a CPU model
  falls back to the eager loop with one line saying why;
- bad input is refused, naming what was received; benchmarks/bench_decode.py --smoke writes its JSON and PNG.
GPU (``-m gpu``): on a tiny QLoRA model with backend="cupy" the captured decode gives the eager decode's tokens,
one replay per token after the prefill and the warm-up; a capture the runtime refuses falls back to eager steps.
"""

from __future__ import annotations

import json
import types

import pytest
import torch
from conftest import TINY_DECODER, assert_process_unharmed_by_refused_capture
from torch.utils._python_dispatch import TorchDispatchMode

from backends.torchlib import prepare_model, qlora_layers
from backends.torchlib.decode import Decoded, greedy_decode

transformers = pytest.importorskip("transformers")

PAD = 0
PROMPTS = [[5, 7, 9, 11, 13, 2, 3], [1, 4, 6], [9, 9, 8, 7, 100]]  # three lengths: left padding differs per row


def _model(kind="hf", backend="numpy", seed=0):
    """A tiny LlamaForCausalLM: plain ('hf'), or QLoRA-prepared with random (active) LoRA weights ('qlora')."""
    cfg = transformers.LlamaConfig(**{**TINY_DECODER, "max_position_embeddings": 128})
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    if kind == "qlora":
        prepare_model(model, backend=backend, r=4, alpha=8, dropout=0.0, gradient_checkpointing=False)
        torch.manual_seed(seed + 1)
        for m in qlora_layers(model).values():
            m.reset_lora_parameters("random")
    return model.eval()


def _batch(prompts=PROMPTS, device="cpu"):
    T = max(map(len, prompts))
    x = torch.tensor([[PAD] * (T - len(p)) + p for p in prompts], device=device)  # (B, T)
    m = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=device)  # (B, T)
    return x, m


def _generate(model, x, m, n, eos=None):
    """transformers' greedy continuation (B, <= n) with the given end token (None: none at all)."""
    model.generation_config.eos_token_id = None  # the config's own end token must not stop the reference
    out = model.generate(input_ids=x, attention_mask=m, max_new_tokens=n, do_sample=False, pad_token_id=PAD,
                         eos_token_id=eos, use_cache=True)  # fmt: skip
    return out[:, x.shape[1] :]


def _end_token_of(row: list[int], start: int = 3) -> tuple[int, int]:
    """(token, k): a token of the row that first appears at index k, the first such k >= start if there is one (so
    the row stops mid-decode when that token is its end token), else the last."""
    firsts = sorted({row.index(t) for t in row})
    k = next((i for i in firsts if i >= start), firsts[-1])
    return row[k], k


def _with_end_token(tokens: torch.Tensor, eos: int) -> torch.Tensor:
    """What an end token does to an end-token-free greedy run: each row kept up to and including its first eos, pad
    after it (a row's tokens before its end token do not depend on it), the run cut once every row has ended."""
    rows, ends = [], []
    for row in tokens.tolist():
        k = row.index(eos) + 1 if eos in row else len(row)
        rows.append(row[:k] + [PAD] * (len(row) - k))
        ends.append(k)
    return torch.tensor(rows)[:, : max(ends)]


# --- CPU ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["hf", "qlora"])
def test_static_decode_is_generate_token_for_token(kind, capsys):
    model = _model(kind)
    x, m = _batch()
    want = _generate(model, x, m, 16)
    got = greedy_decode(model, x, m, max_new_tokens=16, capture=False)
    assert isinstance(got, Decoded) and got.tokens.shape == (3, 16)
    assert torch.equal(got.tokens, want), (got.tokens.tolist(), want.tolist())
    assert (got.captured, got.replays, got.eager_steps, got.why_not_captured) == (False, 0, 15, None)
    assert capsys.readouterr().err == ""  # capture=False: nothing to say
    single = greedy_decode(model, x[1:2, -3:], None, max_new_tokens=16, capture=False)  # row 1 unpadded, no mask
    assert torch.equal(single.tokens, want[1:2])  # its continuation does not depend on the batch it sat in


@pytest.mark.parametrize("kind", ["hf", "qlora"])
def test_end_token_stops_each_row_then_the_decode(kind):
    model = _model(kind)
    x, m = _batch()
    free = greedy_decode(model, x, m, max_new_tokens=16, capture=False).tokens  # (3, 16), no end token
    eos, k = _end_token_of(free[0].tolist())  # row 0 stops at its k-th token
    got = greedy_decode(model, x, m, max_new_tokens=16, eos_token_id=eos, pad_token_id=PAD, capture=False)
    want = _with_end_token(free, eos)
    assert torch.equal(got.tokens, want), (got.tokens.tolist(), want.tolist())
    assert torch.equal(got.tokens, _generate(model, x, m, 16, eos=eos))
    assert got.tokens[0, k] == eos and (got.tokens[0, k + 1 :] == PAD).all()
    assert got.eager_steps + 1 == got.tokens.shape[1]

    alone = greedy_decode(model, x[:1], m[:1], max_new_tokens=16, eos_token_id=[eos, 127], capture=False)
    assert alone.tokens.tolist() == [free[0, : k + 1].tolist()]  # every row ended: the decode stops at once
    assert alone.eager_steps == k


class HostReads(TorchDispatchMode):
    """Counts the ops that read a tensor's value back to the host (``.item()``, ``bool(t)``, ``nonzero``): under a
    CUDA-graph capture each is an error, so the decode step must have none."""

    READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default)

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func in self.READS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["hf", "qlora"])
def test_the_decode_step_reads_nothing_back_to_the_host(kind):
    """What makes the step capturable, checked where it runs eagerly: the host reads of a whole decode do not grow
    with its length (they are the input checks), and with an end token grow by one per step (the stop check)."""
    model = _model(kind)
    x, m = _batch()
    reads = {}
    for eos in (None, 127):
        for n in (2, 8):
            with HostReads() as r:
                greedy_decode(model, x, m, max_new_tokens=n, eos_token_id=eos, capture=False)
            reads[eos, n] = r.n
    assert reads[None, 8] == reads[None, 2] > 0, reads
    assert reads[127, 8] - reads[127, 2] == 8 - 2, reads


def test_answers_are_the_same_whichever_decoder_runs(tiny_hf_dir, capsys):
    from backends.app.answers import DECODERS, answer, decoder_of, generate_texts
    from backends.app.config import ModelConfig
    from backends.app.evaluate import generate
    from backends.app.model import load_with_adapter

    model, tok = load_with_adapter(ModelConfig(backend="numpy", dropout=0.0), str(tiny_hf_dir), None)
    torch.manual_seed(5)
    for layer in qlora_layers(model).values():
        layer.reset_lora_parameters("random")
    prompts = ["Why is the sky blue?", "Reverse the list: 1 2 3", "hi", "### Human: Name a colour. ### Assistant:"]
    kw = dict(max_new_tokens=6, batch_size=3, progress=False)
    want = answer(model, tok, prompts, **kw)
    assert [n for _, n in want] and all(0 <= n <= 6 for _, n in want)
    for decoder in DECODERS[1:]:
        assert answer(model, tok, prompts, **kw, decoder=decoder) == want, decoder
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("qlora: ") and "cpu" in err[0]  # 'graph' on the CPU: said once
    with pytest.raises(ValueError, match="decoder must be one of"):
        answer(model, tok, prompts, **kw, decoder="beam")

    c = types.SimpleNamespace(backend="cupy", cuda_graphs="auto", max_new_tokens=6, progress=False)
    assert decoder_of(c) == "graph"
    assert decoder_of(types.SimpleNamespace(backend="cupy", cuda_graphs="off")) == "generate"
    assert decoder_of(types.SimpleNamespace(backend="numpy", cuda_graphs="auto")) == "generate"
    assert generate_texts(c, model, tok, prompts) == generate(model, tok, prompts, max_new_tokens=6)
    assert model.training is False


def test_generate_has_the_cuda_graphs_flag():
    from backends.app.cli import build_parser
    from backends.app.config import UsageError

    assert build_parser().parse_args(["generate", "--prompt", "x"]).cuda_graphs == "auto"
    assert build_parser().parse_args(["generate", "--prompt", "x", "--cuda-graphs", "off"]).cuda_graphs == "off"
    with pytest.raises(UsageError, match="cuda-graphs"):
        build_parser().parse_args(["generate", "--prompt", "x", "--cuda-graphs", "always"])


def test_capture_on_the_cpu_says_why_once_and_keeps_the_mode(capsys):
    model = _model("qlora").train()
    x, m = _batch()
    lines = []
    got = greedy_decode(model, x, m, max_new_tokens=5, say=lines.append)
    assert not got.captured and got.replays == 0 and got.eager_steps == 4
    assert len(lines) == 1 and "cpu" in lines[0] and "cpu" in got.why_not_captured
    assert model.training  # put back as found
    greedy_decode(model, x, m, max_new_tokens=2)  # default say: one line on stderr
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("qlora: the decode runs eager") and "cpu" in err[0]
    assert torch.equal(got.tokens, greedy_decode(model.eval(), x, m, max_new_tokens=5, capture=False).tokens)


def test_bad_input_is_refused_naming_it():
    model = _model()
    x, m = _batch()
    right = torch.flip(m, dims=[1])  # right padding
    cases = [
        (dict(input_ids=x[0]), "2-D int64"),
        (dict(input_ids=x.int()), "2-D int64"),
        (dict(input_ids=x[:, :0], attention_mask=m[:, :0]), "at least one row and one column"),
        (dict(attention_mask=m[:, 1:]), "input_ids' shape"),
        (dict(attention_mask=right), "left padded"),
        (dict(attention_mask=m * 2), "only 0"),
        (dict(attention_mask=torch.zeros_like(m)), "left padded"),
        (dict(input_ids=x + 200), r"\[0, 128\)"),
        (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
        (dict(max_new_tokens=2.0), "max_new_tokens"),
        (dict(eos_token_id=-1), "eos_token_id"),
        (dict(eos_token_id=[]), "eos_token_id"),
        (dict(eos_token_id=True), "eos_token_id"),
        (dict(pad_token_id=-3), "pad_token_id"),
        (dict(warmup=-1), "warmup"),
    ]
    for change, match in cases:
        kw = {**dict(input_ids=x, attention_mask=m, max_new_tokens=4, capture=False), **change}
        with pytest.raises(ValueError, match=match):
            greedy_decode(model, **kw)
    with pytest.raises(TypeError, match="KV cache"):
        greedy_decode(torch.nn.Linear(4, 4), x, m, max_new_tokens=2)


def test_bench_decode_smoke_writes_its_json(tmp_path):
    from benchmarks.bench_decode import main

    variants = ["ours-generate", "ours-static", "ours-graph", "bf16-graph"]
    assert main(["--smoke", "--out", str(tmp_path), "--variants", ",".join(variants)]) == 0
    doc = json.loads((tmp_path / "bench_decode_smoke.json").read_text())
    assert doc["commit"] and doc["device"] and doc["setup"]["device"] == "cpu"
    rows = {(r["variant"], r["batch"]): r for r in doc["rows"]}
    assert set(rows) == {(v, b) for v in variants for b in (1, 2)}
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["call_ms"] > 0 and "error" not in r, r
    assert rows[("ours-graph", 2)]["tokens_match_static"] is True
    assert rows[("ours-graph", 1)]["captured"] is False and "cpu" in rows[("ours-graph", 1)]["why_not_captured"]
    assert (tmp_path / "bench_decode_smoke.png").stat().st_size > 0


# --- GPU ------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_captured_decode_equals_eager_token_for_token():
    model = _model("qlora", backend="cupy", seed=3)
    x, m = _batch(device="cuda")
    want = greedy_decode(model, x, m, max_new_tokens=24, capture=False)
    lines = []
    got = greedy_decode(model, x, m, max_new_tokens=24, warmup=2, say=lines.append)
    assert got.captured and lines == [] and got.why_not_captured is None
    assert torch.equal(got.tokens, want.tokens), (got.tokens.tolist(), want.tokens.tolist())
    assert (got.replays, got.eager_steps) == (24 - 1 - 2, 2)  # one replay per token after the prefill + warm-up

    eos, _ = _end_token_of(want.tokens[0].tolist(), start=6)  # an end token: the replays stop where eager stops
    got = greedy_decode(model, x, m, max_new_tokens=24, eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(got.tokens.cpu(), _with_end_token(want.tokens.cpu(), eos))
    assert got.replays + got.eager_steps + 1 == got.tokens.shape[1]
    assert got.captured or got.tokens.shape[1] <= 3  # captured unless the prefill and warm-up made every token


@pytest.mark.gpu
def test_gpu_a_refused_capture_falls_back_to_eager_steps():
    model = _model("qlora", backend="cupy", seed=4)
    x, m = _batch(device="cuda")
    want = greedy_decode(model, x, m, max_new_tokens=10, capture=False).tokens

    def read_on_host(module, inputs, output):  # returns None: the output stays; the read is what capture refuses
        float(output.float().sum())

    hook = model.model.norm.register_forward_hook(read_on_host)
    stream = torch.cuda.current_stream()
    rng = torch.cuda.get_rng_state()
    rand = torch.rand(8, device="cuda")
    torch.cuda.set_rng_state(rng)
    try:
        lines = []
        got = greedy_decode(model, x, m, max_new_tokens=10, say=lines.append)
    finally:
        hook.remove()
    assert_process_unharmed_by_refused_capture(stream, rand)
    assert not got.captured and got.replays == 0 and got.eager_steps == 9
    assert len(lines) == 1 and "capture failed" in lines[0]
    assert torch.equal(got.tokens, want)
    again = greedy_decode(model, x, m, max_new_tokens=10)  # the device is usable after the refusal
    assert again.captured and torch.equal(again.tokens, want)
