"""Shared test configuration: hypothesis profiles, the gpu marker, and where ../shared lives.

Profiles (STYLE 13): ``dev`` (default, quick), ``ci`` (derandomized, more examples; chosen when CI=true) and ``gpu``
(no deadline: the first call compiles kernels).  Pick one with ``--hypothesis-profile=NAME``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=40, deadline=None)
settings.register_profile(
    "ci", max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("gpu", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") == "true" else "dev")

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI") == "true"


def _has_cuda() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


HAS_CUDA = _has_cuda()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CuPy and a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


# The tiny LLaMA-family decoder the training tests build (intermediate a multiple of 64: bitsandbytes 0.50.2's CPU
# dequantize is wrong otherwise); tests override vocab, positions, tying and token ids as they need.
TINY_DECODER = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def require(condition: bool, why: str) -> None:
    """Skip locally when an optional input is missing, but fail in CI, where .ci/run provides it."""
    if not condition:
        if IN_CI:
            pytest.fail(f"{why} (CI=true: .ci/run must provide it)")
        pytest.skip(why)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the checkout (real data, golden vectors); its absence fails in CI."""
    path = Path(os.environ.get("QLORA_SHARED", REPO.parent / "shared"))
    require(path.is_dir(), f"shared data folder not found at {path}")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2-135M-Instruct's own tokenizer, from its GGUF (downloaded in CI; skipped locally when not cached)."""
    from backends.app.hub import find_smollm2_gguf, smollm2_gguf_path
    from backends.torchlib import load_tokenizer

    path = smollm2_gguf_path(download=True) if IN_CI else find_smollm2_gguf()
    require(path is not None, "SmolLM2 GGUF not in the model cache (CI downloads it; or call smollm2_gguf_path())")
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def tiny_hf_dir(tokenizer, tmp_path_factory):
    """A tiny random LLaMA (TINY_DECODER) saved as a Hugging Face model dir: safetensors + SmolLM2's tokenizer."""
    import torch
    import transformers

    d = tmp_path_factory.mktemp("tiny-hf")
    cfg = transformers.LlamaConfig(**{**TINY_DECODER, "vocab_size": len(tokenizer), "max_position_embeddings": 256},
                                   tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    tokenizer.save_pretrained(d)
    return d


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of ``qlora ARGV`` run in-process."""
    from backends.app.cli import main

    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    """The CLI's contract for bad input: exit 2 and one line on stderr, starting "qlora", naming each needle."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("qlora"), lines
    for n in needles:
        assert n in lines[0], (n, lines[0])


def assert_process_unharmed_by_refused_capture(stream, rng_before) -> None:
    """After a refused CUDA-graph capture the process is as it was (backends/torchlib/graph.py
    `_recover_from_refused_capture`): the caller's stream is current, the CUDA generator draws what it would have
    drawn (``rng_before``: the first 8 values of ``torch.rand(8, device="cuda")`` from the generator state saved
    before the refusal, restored with ``torch.cuda.set_rng_state``), and the allocator frees a block used on another
    stream (no capture left registered as under way, which would defer that free forever)."""
    import torch

    assert torch.cuda.current_stream() == stream, "the capture's side stream is still current"
    assert torch.equal(torch.rand(8, device="cuda"), rng_before), "the CUDA generator moved or still thinks it captures"
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    reserved = torch.cuda.memory_reserved()
    side = torch.cuda.Stream()
    block = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")  # 64 MiB: its own segment
    block.record_stream(side)
    del block
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_reserved() == reserved, "a block used on another stream was never freed"


def tiny_prepared_llama(backend="numpy", *, dropout=0.0, checkpointing=False, seed=0):
    """A tiny random LLaMA (TINY_DECODER) prepared for QLoRA (r 4, alpha 8) with random LoRA weights, in train mode;
    checkpointing as a capturable step runs it (non-reentrant, no RNG state: the masks come from seeds)."""
    import torch
    import transformers

    from backends.torchlib import prepare_model, qlora_layers
    from backends.torchlib.prepare import enable_checkpointing

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_DECODER))
    prepare_model(model, backend=backend, r=4, alpha=8, dropout=dropout, gradient_checkpointing=False)
    if checkpointing:
        enable_checkpointing(model, use_reentrant=False, preserve_rng_state=False)
    torch.manual_seed(seed + 1)
    for m in qlora_layers(model).values():
        m.reset_lora_parameters("random")
    return model.train()


def spy_sdpa(monkeypatch, *, capturing_only: bool = False) -> list:
    """Record (no mask?, is_causal) of every scaled_dot_product_attention call (only those made while a CUDA stream
    captures, with ``capturing_only``); the calls still run.  Returns the list the calls are appended to."""
    import torch

    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        if not capturing_only or torch.cuda.is_current_stream_capturing():
            seen.append((attn_mask is None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return seen
