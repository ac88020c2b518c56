"""DoRA's memory terms (specs/memory.md MEM-15, MEM-16) against measurements on the CPU: the trainable bytes, gradient
bytes and AdamW state arrays of a prepared tiny DoRA model, PEFT's trainable count, the saved-tensor bytes of a DoRA
model minus a plain one, and the temporaries of one DoRALinear watched op by op; then the ledger's wiring.

Every comparison is exact (bytes are integers): the terms count tensors, and the measurements count the same tensors.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import replace

import pytest
import torch
from conftest import TINY_DECODER, run_cli
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from backends.torchlib import DoRALinear, PagedAdamW, prepare_model, qlora_layers, trainable_parameters
from backends.torchlib import ledger as impl
from backends.torchlib.dora import weight_norm
from qlora_ref import memory as M

transformers = pytest.importorskip("transformers")
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))  # T = 24 tokens
TOKENS = IDS.numel()
DTYPE_PAIRS = [("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "bfloat16"), ("float32", "bfloat16")]


def tiny_config():
    return transformers.LlamaConfig(**TINY_DECODER, tie_word_embeddings=False)  # grouped-query: kv 32 of h 64


def tiny_shape():
    return M.shape_from_dict(tiny_config().to_dict())


def prepared(*, use_dora, compute="float32", lora="float32", dropout=0.0, seed=0):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(tiny_config())
    prepare_model(model, r=4, alpha=8, dropout=dropout, use_dora=use_dora, compute_dtype=compute, lora_dtype=lora,
                  gradient_checkpointing=False)  # fmt: skip
    return model.train()


def recipe(**kw):
    return M.Recipe(seq_len=IDS.shape[1], batch=IDS.shape[0], r=4, use_dora=True, **kw)


# --- MEM-15: the magnitude as a parameter, a gradient and AdamW state ----------------------------------------------


@pytest.mark.parametrize("lora_dtype", ["float32", "bfloat16"])
def test_mem15_magnitude_bytes_equal_the_prepared_models_tensors(lora_dtype):
    """MEM-15 with MEM-4, MEM-5, MEM-6: a prepared DoRA model's trainable tensors, their gradients after one backward
    and PagedAdamW's 32-bit m and v arrays hold exactly l (P + D), l (P + D) and 8 (P + D) bytes, D the magnitudes."""
    shape, rec = tiny_shape(), recipe(lora_dtype=lora_dtype, optimizer="adamw_32bit")
    model = prepared(use_dora=True, lora=lora_dtype)
    params = trainable_parameters(model)
    magnitudes = [m.lora_magnitude_vector for m in qlora_layers(model).values()]
    assert (
        sum(p.numel() for p in magnitudes)
        == M.dora_magnitude_count(shape)
        == shape.layers * (3 * 64 + 2 * 32 + 2 * 192)
    )
    led = M.estimate(shape, rec).components
    assert sum(p.numel() * p.element_size() for p in params) == led["lora_params"] == M.lora_param_bytes(shape, rec)
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert sum(p.grad.numel() * p.grad.element_size() for p in params) == led["lora_grads"]
    opt = PagedAdamW(params, lr=1e-3)
    opt.step()
    states = opt.state_dict()["state"]
    assert len(states) == len(params)
    held = sum(t.numel() * t.element_size() for s in states.values() for k, t in s.items() if k in ("m", "v"))
    assert held == led["optimizer"] == 8 * M.trainable_count(shape, rec)
    plain = M.estimate(shape, replace(rec, use_dora=False)).components
    assert led["lora_params"] - plain["lora_params"] == M.BYTES[lora_dtype] * M.dora_magnitude_count(shape)


def test_mem15_peft_counts_the_same_trainable_values():
    """MEM-15: PEFT's LoRA with use_dora=True on the seven linears trains P + D values, as ours does."""
    from peft import LoraConfig, get_peft_model

    shape = tiny_shape()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(0)
    pm = get_peft_model(transformers.LlamaForCausalLM(tiny_config()),
                        LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True))  # fmt: skip
    assert sum(p.numel() for p in pm.parameters() if p.requires_grad) == M.trainable_count(shape, recipe())
    assert M.trainable_count(shape, recipe()) == shape.n_lora(4) + M.dora_magnitude_count(shape)


def test_mem15_8bit_optimizer_counts_the_magnitude_as_its_own_tensor():
    """MEM-15, MEM-6: with 8-bit AdamW each magnitude is one more tensor of out values under MEM-6's per-tensor rule
    (2k + 8 ceil(k / 256) from 4096 values, 8k below)."""
    shape = M.llama_65b
    base = M.Recipe(seq_len=512, batch=1, optimizer="adamw_8bit")
    extra = M.optimizer_bytes(shape, replace(base, use_dora=True)) - M.optimizer_bytes(shape, base)
    h, kv, i = 8192, 8192, 22016  # 65B has no grouped-query attention
    per_block = 3 * (2 * h + 8 * (h // 256)) + 2 * (2 * kv + 8 * (kv // 256)) + 2 * (2 * i + 8 * -(-i // 256))
    assert extra == shape.layers * per_block
    tiny = tiny_shape()  # every magnitude < 4096 values: 32-bit state
    rec8 = recipe(optimizer="adamw_8bit")
    tiny_extra = M.optimizer_bytes(tiny, rec8) - M.optimizer_bytes(tiny, replace(rec8, use_dora=False))
    assert tiny_extra == 8 * M.dora_magnitude_count(tiny)


# --- MEM-15: what the backward keeps -----------------------------------------------------------------------------


def saved_bytes(model) -> int:
    """Bytes of the distinct storages autograd saves in one forward, parameters excluded (they are stored anyway)."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.manual_seed(9)
        loss = model(input_ids=IDS, labels=IDS).loss
    storages = {}
    for t in saved:
        st = t.untyped_storage()
        if st.data_ptr() not in param_storages:
            storages[st.data_ptr()] = st.nbytes()
    del loss
    return sum(storages.values())


@pytest.mark.parametrize("compute, lora", DTYPE_PAIRS[:3])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_mem15_a_dora_model_saves_the_row_norms_and_nothing_else(compute, lora, dropout):
    """MEM-15: a DoRA model's saved tensors (saved_tensors_hooks, no checkpointing) minus the plain QLoRA model's are
    the row norms n of every adapted linear, f bytes each: L * dora_norm_bytes, f = 4 when the dtypes differ."""
    shape, rec = tiny_shape(), recipe(compute_dtype=compute, lora_dtype=lora, lora_dropout=dropout)
    plain = saved_bytes(prepared(use_dora=False, compute=compute, lora=lora, dropout=dropout))
    dora = saved_bytes(prepared(use_dora=True, compute=compute, lora=lora, dropout=dropout))
    f = 2 if compute == lora == "bfloat16" else 4
    assert (
        dora - plain == shape.layers * M.dora_norm_bytes(shape, rec) == shape.layers * f * (3 * 64 + 2 * 32 + 2 * 192)
    )


# --- MEM-16: one DoRALinear's temporaries, watched op by op ---------------------------------------------------------


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created under it and still alive, per class (``classify(t)`` -> name or None), and the
    peak of each: every op's outputs are seen, a storage is counted once when it first appears and dropped when it is
    freed (a finalizer on the storage).  Storages in ``known`` (alive before) are never counted."""

    def __init__(self, classify, known=()):
        super().__init__()
        self.classify, self.known = classify, {id(s) for s in known}
        self.live, self.now, self.peak = {}, {}, {}

    def _free(self, key):
        name, nbytes = self.live.pop(key)
        self.now[name] -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            name = self.classify(t)
            if name is None or id(st) in self.known or id(st) in self.live:
                continue
            self.live[id(st)] = (name, st.nbytes())
            weakref.finalize(st, self._free, id(st))
            self.now[name] = self.now.get(name, 0) + st.nbytes()
            self.peak[name] = max(self.peak.get(name, 0), self.now[name])
        return out


T_, IN, OUT, R = 10, 96, 48, 8  # distinct sizes: a (T, out) tensor is told apart by its shape


def dora_layer(compute, lora, dropout, bias=False, block_rows=None):
    torch.manual_seed(0)
    layer = DoRALinear.from_linear(torch.nn.Linear(IN, OUT, bias=bias), r=R, alpha=16, dropout=dropout,
                                   compute_dtype=compute, lora_dtype=lora, block_rows=block_rows)  # fmt: skip
    layer.reset_lora_parameters("random")
    return layer.train()


@pytest.mark.parametrize("compute, lora", DTYPE_PAIRS)
@pytest.mark.parametrize("dropout, bias", [(0.0, False), (0.5, False), (0.0, True), (0.5, True)])
def test_mem16_forward_and_backward_temporaries_equal_the_count(compute, lora, dropout, bias):
    """MEM-16: the (T, out) tensors alive at once while DoRALinear's forward runs (its output included) and while its
    backward runs (the incoming dY excluded) peak at exactly dora_layer_scratch's forward and backward bytes."""
    layer = dora_layer(compute, lora, dropout, bias)
    x = torch.randn(T_, IN).to(getattr(torch, compute)).requires_grad_(True)

    def classify(t):
        return "T_out" if t.numel() == T_ * OUT and t.shape[-1] == OUT else None

    with LiveBytes(classify) as fw:
        y = layer(x)
    dy = torch.randn_like(y)
    with LiveBytes(classify, known=[dy.untyped_storage()]) as bw:
        y.backward(dy)
    want = impl.dora_layer_scratch(T_, IN, OUT, compute_dtype=compute, lora_dtype=lora, dropout=dropout)
    assert (fw.peak["T_out"], bw.peak["T_out"]) == (want["forward"], want["backward"]), (fw.peak, bw.peak, want)
    assert layer.lora_magnitude_vector.grad is not None  # the backward ran through DoRA's magnitude


@pytest.mark.parametrize("compute, lora", DTYPE_PAIRS)
@pytest.mark.parametrize("block_rows", [48, 32, 16, 5])  # one block; two (32 + 16); three and ten (the last partial)
def test_mem16_norm_block_temporaries_equal_the_count(compute, lora, block_rows):
    """MEM-16: weight_norm's (rows, in) blocks alive at once peak at dora_layer_scratch's norm_blocks bytes, the
    previous block's V alive while the next one is formed."""
    layer = dora_layer(compute, lora, 0.0, block_rows=block_rows)
    W = layer.dequantized()
    known = [W.untyped_storage(), layer.lora_A.untyped_storage(), layer.lora_B.untyped_storage()]

    def classify(t):
        return "block" if t.ndim == 2 and t.shape[1] == IN and t.shape[0] != R else None

    with LiveBytes(classify, known=known) as watch:
        n = weight_norm(W, layer.lora_A, layer.lora_B, layer.scaling, block_rows)
    want = impl.dora_layer_scratch(T_, IN, OUT, compute_dtype=compute, lora_dtype=lora, dropout=0.0,
                                   block_rows=block_rows)  # fmt: skip
    assert watch.peak["block"] == want["norm_blocks"], (watch.peak, want)
    assert n.shape == (OUT,) and n.element_size() == (2 if compute == lora == "bfloat16" else 4)  # f (MEM-15)


# --- the ledgers with use_dora -------------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpointing, step_in_backward", list(itertools.product([True, False], [False, True])))
def test_mem15_mem16_estimate_changes_exactly_the_dora_terms(checkpointing, step_in_backward):
    """MEM-15, MEM-16: use_dora adds l D to lora_params (and to lora_grads unless steps free them one at a time:
    the largest tensor is still an A or B), 8 D to 32-bit AdamW, the norms of one block (checkpointing) or of all
    L blocks to activations, and a dora_scratch component; nothing else moves."""
    shape = M.llama_65b
    plain = M.Recipe(seq_len=512, batch=2, lora_dropout=0.05, checkpointing=checkpointing, lora_dtype="float32")
    dora = replace(plain, use_dora=True)
    rt = impl.Runtime(step_in_backward=step_in_backward, overhead_bytes=0)
    a, b = impl.estimate(shape, plain, rt).components, impl.estimate(shape, dora, rt).components
    D, L = M.dora_magnitude_count(shape), shape.layers
    assert b["lora_params"] - a["lora_params"] == 4 * D
    assert b["lora_grads"] - a["lora_grads"] == (0 if step_in_backward else 4 * D)
    assert b["optimizer"] - a["optimizer"] == 8 * D
    norms = M.dora_norm_bytes(shape, dora)
    assert norms == 4 * (3 * 8192 + 2 * 8192 + 2 * 22016)
    assert b["activations"] - a["activations"] == (norms if checkpointing else L * norms)
    assert "dora_scratch" not in a and list(b) == [*a, "dora_scratch"]
    assert {k: v for k, v in b.items() if k not in ("lora_params", "lora_grads", "optimizer", "activations",
                                                    "dora_scratch")} == {k: v for k, v in a.items() if k not in (
        "lora_params", "lora_grads", "optimizer", "activations")}  # fmt: skip
    # the largest linear's backward: gate/up, out = 22016, bf16 compute, float32 LoRA and norms: D = 1, P = 1
    assert b["dora_scratch"] == max((1 + 3) * 4, (1 + 2 + 1) * 4 + 0 + 1 * 2) * 1024 * 22016
    assert M.estimate(shape, dora).config["use_dora"] is True


def test_mem15_per_rank_ledgers_carry_the_magnitude():
    """MEM-15 with DIST-7: DDP's buckets hold the magnitudes' gradients too, FSDP shards them with A and B."""
    shape, dora = M.llama_7b, M.Recipe(seq_len=512, batch=1, use_dora=True)
    plain = replace(dora, use_dora=False)
    ddp = impl.per_rank_estimate(shape, dora, world=2).components
    assert ddp["ddp_buckets"] - impl.per_rank_estimate(shape, plain, world=2).components["ddp_buckets"] == (
        2 * M.dora_magnitude_count(shape)
    )
    fsdp = impl.per_rank_estimate(shape, dora, world=4, shard=True).components
    assert fsdp["lora_params"] == -(-M.lora_param_bytes(shape, dora) // 4)


def test_mem15_refusals():
    """MEM-15: use_dora must be a bool; PEFT's DoRA layer is not modelled, so layer='peft' with use_dora is refused."""
    with pytest.raises(ValueError, match="use_dora must be True or False"):
        M.Recipe(seq_len=8, batch=1, use_dora=1)
    with pytest.raises(ValueError, match="PEFT's DoRA layer"):
        impl.estimate(M.llama_7b, M.Recipe(seq_len=8, batch=1, use_dora=True), impl.Runtime(layer="peft"))
    assert "dora_scratch" not in impl.estimate(M.llama_7b, M.Recipe(seq_len=8, batch=1)).components


def test_qlora_memory_use_dora(capsys):
    """`qlora memory --use-dora` prints the DoRA ledger (MEM-15, MEM-16) and refuses --layer peft in one line."""
    code, out, _ = run_cli(["memory", "--model", "llama-65b", "--use-dora", "--lora-dropout", "0.05"], capsys)
    assert code == 0
    led = impl.estimate(M.llama_65b, M.Recipe(seq_len=512, batch=1, lora_dropout=0.05, use_dora=True))
    assert f"{led.total:,}" in out and "dora_scratch" in out and "DoRA magnitudes" in out
    code, _, err = run_cli(["memory", "--model", "llama-7b", "--use-dora", "--layer", "peft"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--use-dora" in err
