"""QLoRA replicates 16-bit LoRA (issue 6, item 3): the same LoRA finetune on a 16-bit base and on a 4-bit base.

The QLoRA paper (Dettmers et al. 2023, section 4, Table 3) shows that LoRA on an NF4 + double-quantized base matches
LoRA on a 16-bit base (GLUE with RoBERTa-large, LoRA on all layers).  Here, in small:

    sst2    all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) + mean pooling + a trainable 2-way linear classifier,
            LoRA on all 36 encoder linears (query, key, value, attention output, intermediate, output), r 8,
            alpha 16, dropout 0.1; 1 epoch over a fixed 3,000-sentence sample of SST-2 train (random.Random(1234),
            the same for every arm and seed), batch 16 (length-grouped), lr 1e-3 with 6% warmup and linear decay,
            max grad norm 1, max 64 tokens; accuracy on the FULL SST-2 dev set (872 sentences).  Sized for a 2-core
            CPU: about 1 minute a run, 10 minutes for 3 seeds x 3 arms.  Arms: bf16-lora, qlora-nf4, qlora-fp4.
    alpaca  SmolLM2-135M-Instruct (the GGUF in the model cache; its "16-bit" weights are its Q4_1 blocks dequantized,
            so the baseline is itself a dequantized 4-bit model) on alpaca_5000.json: the last 250 records of a
            random.Random(0) shuffle held out (the same split for every run), loss on the response only, Guanaco's
            recipe (r 64, alpha 16, dropout 0.05, LoRA on every linear but the LM head, lr 2e-4 constant, effective
            batch 16 (16 x 1 by default), max grad norm 0.3, paged AdamW 32-bit), 100 steps; eval loss on the
            held-out split before and after.  No gradient checkpointing by default (same math, 1.6x faster on an
            H100; --gradient-checkpointing turns it on).  On an H100: 4 min 18 s for 3 seeds x 2 arms.
            Arms: bf16-lora, qlora-nf4.

The arms share everything but the format of the frozen base weights of the targeted linears:

    bf16-lora  LoRALinear16 (below): the linear's weight rounded to bfloat16 (on the CPU held as float32 values that
               are exactly bf16-representable, compute float32; on CUDA stored and computed in bf16)
    qlora-nf4  QLoRALinear (backends.torchlib.layer): NF4, blocksize 64, double quantization
    qlora-fp4  the same with FP4

LoRALinear16 runs the very autograd function QLoRALinear runs (QLoRAFunction), with its dense weight standing in for
the dequantized 4-bit one, so the LoRA math, dtypes (LoRA A/B float32), dropout masks (seeded from torch's generator)
and PEFT init (A ~ kaiming_uniform(a=sqrt(5)), B = 0) are the same code.  Every other frozen parameter (embeddings,
LayerNorms / RMSNorms) is identical in all arms: float32 on the CPU, bf16 on CUDA.  Same optimizer (backends.torchlib
PagedAdamW, 32-bit states), same clipping (backends.torchlib.clip_grad_norm_), same steps.  A seed fixes the LoRA and
classifier init, the dropout masks and the data order, and is shared by the arms: seed s of one arm is paired with
seed s of the other (same init, same batches), so the arms differ only by the base weights.

Verdict (stated rule): the claim holds for a 4-bit arm when |mean(4-bit) - mean(bf16)| <= max(std(4-bit), std(bf16)),
std = the sample standard deviation over the seeds (ddof 1), i.e. the gap is within seed noise.

    python benchmarks/repro_lora.py sst2                   # 3 seeds x 3 arms on the CPU (~10 min on 2 cores)
    python benchmarks/repro_lora.py sst2 --device cuda
    python benchmarks/repro_lora.py alpaca --device cuda   # 3 seeds x 2 arms, 100 steps (4.3 min on an H100)
    python benchmarks/repro_lora.py alpaca --steps 2 --seeds 0 1 --batch-size 2 --grad-accum 2 --eval-examples 4 \\
        --name repro_alpaca_smoke                          # CPU smoke test (~2 min)

On the CPU, torch runs 1 thread by default (--threads): beside another job on 2 cores, 2 OpenMP threads were ~5x
slower.  The data is read in place from $QLORA_SHARED or ../shared (--shared); the models come from the model cache
(backends.app.hub: minilm_path, smollm2_gguf_path).

Outputs: a table on stdout, benchmarks/results/<name>.json (commit, date, device, command, settings, per-seed
numbers, mean ± std, verdict) and <name>.png beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import gc
import io
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from backends.torchlib.dtypes import DTYPE_NAMES  # noqa: E402
from backends.torchlib.layer import (  # noqa: E402
    QLoRAFunction,
    QLoRALinear,
    draw_dropout_seed,
    dropout_noise,
)

SST2_ARMS = ("bf16-lora", "qlora-nf4", "qlora-fp4")
ALPACA_ARMS = ("bf16-lora", "qlora-nf4")
QUANT_TYPE = {"qlora-nf4": "nf4", "qlora-fp4": "fp4"}
# The encoder linears of a BERT layer that get LoRA ("all layers", as the paper's RoBERTa GLUE runs).
BERT_TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
SST2_SUBSET_SEED = 1234  # the one fixed sample of SST-2 train, shared by every arm and seed
ALPACA_SPLIT_SEED = 0  # the one fixed shuffle that holds out the last n_eval Alpaca records


# --- small helpers -------------------------------------------------------------------------------------------------


def shared_dir() -> Path:
    """$QLORA_SHARED or ../shared beside the checkout (the real data, read in place)."""
    return Path(os.environ.get("QLORA_SHARED", REPO.parent / "shared"))


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when torch sees a GPU and CuPy imports, else cpu."""
    if name == "auto":
        try:
            import cupy  # noqa: F401

            ok = torch.cuda.is_available()
        except ImportError:
            ok = False
        name = "cuda" if ok else "cpu"
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no CUDA device")
    return torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device("cpu")


def backend_name(device: torch.device) -> str:
    return "cupy" if device.type == "cuda" else "numpy"


def compute_dtype_for(device: torch.device) -> torch.dtype:
    """bf16 on CUDA, float32 on the CPU (QLoRALinear's defaults; torch's bf16 GEMM on the CPU is slow)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from benchmarks.common import cpu_name

    return cpu_name()


def mean_std(xs: list[float]) -> tuple[float, float]:
    """(mean, sample std with ddof 1; 0 for a single value)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def claim_verdict(base: list[float], other: list[float]) -> dict:
    """The stated rule: |mean(other) - mean(base)| <= max(std(other), std(base))."""
    mb, sb = mean_std(base)
    mo, so = mean_std(other)
    gap, noise = mo - mb, max(sb, so)
    return {"gap": gap, "noise": noise, "holds": bool(abs(gap) <= noise), "rule": "|mean gap| <= max(std of arms)"}


def quiet_transformers() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")  # its deprecation notices
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def free_memory(device: torch.device) -> None:
    from backends.torchlib.scratch import release_scratch

    release_scratch()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- the 16-bit arm: a dense frozen weight under the same autograd function ----------------------------------------


class LoRALinear16(nn.Module):
    """y = x W^T + b + s * (drop(x) A^T) B^T with a dense frozen W: the 16-bit LoRA baseline.

    W is the linear's weight rounded once to ``weight_dtype`` (bfloat16) and held in the compute dtype (float32 on
    the CPU: exactly the bf16 values; bf16 on CUDA), as a buffer (no gradient).  The forward is QLoRALinear's, line for
    line, and runs ``QLoRAFunction`` with ``dequantized`` returning W, so this layer differs from QLoRALinear
    only in where W comes from.  Construction draws lora_A from torch's generator exactly as QLoRALinear does.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        *,
        bias: torch.Tensor | None = None,
        r: int = 64,
        alpha: float = 16,
        dropout: float = 0.0,
        lora_dtype=torch.float32,
        compute_dtype=torch.float32,
        weight_dtype=torch.bfloat16,
        device=None,
    ):
        super().__init__()
        device = torch.device(device) if device is not None else weight.device
        self.out_features, self.in_features = weight.shape
        self.r, self.alpha, self.dropout = r, float(alpha), float(dropout)
        self.scaling = self.alpha / r
        self.compute_dtype, self.weight_dtype, self.device = compute_dtype, weight_dtype, device
        w = weight.detach().to(weight_dtype).to(device=device, dtype=compute_dtype)  # one rounding to weight_dtype
        self.register_buffer("weight", w.contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(device, compute_dtype))
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=lora_dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=device, dtype=lora_dtype))
        with torch.no_grad():  # QLoRALinear.reset_lora_parameters("peft"): the same draws in the same order
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kw) -> LoRALinear16:
        return cls(linear.weight, bias=linear.bias, **kw)

    def dequantized(self) -> torch.Tensor:  # what QLoRAFunction calls for W (forward and backward)
        return self.weight

    def noise(self, shape, seed: int, dtype) -> torch.Tensor:  # QLoRALinear's dropout factor, same draws
        backend = "cupy" if self.device.type == "cuda" else "numpy"  # the backend QLoRALinear has on this device
        return dropout_noise(shape, self.dropout, seed, backend, dtype)

    def dropout_factor(self, shape, seed: int, dtype) -> torch.Tensor:  # what QLoRAFunction calls: host seeds only
        return self.noise(shape, seed, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        x = x.to(self.compute_dtype)
        seed = draw_dropout_seed() if self.training and self.dropout > 0.0 else None
        return QLoRAFunction.apply(x, self.lora_A, self.lora_B, self, seed).to(in_dtype)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, weight={DTYPE_NAMES[self.weight_dtype]} values, "
            f"r={self.r}, alpha={self.alpha:g}, dropout={self.dropout:g}, compute={DTYPE_NAMES[self.compute_dtype]}"
        )


def make_lora_layer(arm: str, linear: nn.Linear, *, device, r, alpha, dropout) -> nn.Module:
    """The arm's replacement for one nn.Linear (LoRA A/B float32, compute dtype by device)."""
    cdt = compute_dtype_for(device)
    kw = dict(r=r, alpha=alpha, dropout=dropout, lora_dtype=torch.float32, compute_dtype=cdt)
    if arm == "bf16-lora":
        return LoRALinear16.from_linear(linear, device=device, **kw)
    if arm in QUANT_TYPE:
        return QLoRALinear.from_linear(
            linear, backend=backend_name(device), quant_type=QUANT_TYPE[arm], blocksize=64, double_quant=True, **kw
        )
    raise ValueError(f"unknown arm {arm!r}; known: {SST2_ARMS}")


def attach_lora(model: nn.Module, names: list[str], arm: str, *, device, r, alpha, dropout) -> nn.Module:
    """Replace the named nn.Linear modules by the arm's LoRA layer, in order, freezing everything else.

    Like ``backends.torchlib.prepare_model`` (which handles LLaMA-family causal LMs only): all parameters frozen,
    targets replaced one at a time in module order (so the lora_A draws follow the same sequence in every arm), the
    remaining parameters moved to the device and cast to the compute dtype (tied parameters stay tied), buffers moved.
    """
    cdt = compute_dtype_for(device)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, attr)
        if type(linear) is not nn.Linear:
            raise TypeError(f"{name} is a {type(linear).__name__}, not an nn.Linear")
        new = make_lora_layer(arm, linear, device=device, r=r, alpha=alpha, dropout=dropout)
        new.train(linear.training)
        setattr(parent, attr, new)
    for module in model.modules():
        if isinstance(module, QLoRALinear | LoRALinear16):
            continue
        for p in module.parameters(recurse=False):
            p.data = p.data.to(device, cdt if p.is_floating_point() else p.dtype)
        for bname, b in module.named_buffers(recurse=False):
            if b is not None:
                module._buffers[bname] = b.to(device)
    return model


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QLoRALinear | LoRALinear16)}


# --- (a) SST-2 with all-MiniLM-L6-v2 ---------------------------------------------------------------------------------


def read_sst2(path) -> list[tuple[str, int]]:
    """(text, label) rows of a GLUE SST-2 TSV (header ``text\\tlabel``; texts hold '"' so no CSV quoting)."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        if header != ["text", "label"]:
            raise ValueError(f"{path}: expected the header ['text', 'label'], got {header}")
        rows = []
        for lineno, row in enumerate(reader, 2):
            if len(row) != 2 or row[1] not in ("0", "1"):
                raise ValueError(f"{path}:{lineno}: expected 'text<TAB>0|1', got {row!r}")
            rows.append((row[0], int(row[1])))
    return rows


def sst2_subset(rows: list, n: int, seed: int = SST2_SUBSET_SEED) -> list:
    """A fixed sample of n rows (random.Random(seed).sample), the same for every arm and seed; n <= 0: all."""
    if n <= 0 or n >= len(rows):
        return list(rows)
    return random.Random(seed).sample(rows, n)


class SentenceClassifier(nn.Module):
    """Encoder -> mean pooling over real tokens (float32) -> Linear(hidden, n_classes) (trainable, float32)."""

    def __init__(self, encoder: nn.Module, n_classes: int = 2):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)

    def forward(self, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        m = attention_mask.unsqueeze(-1).to(torch.float32)  # (B, T, 1)
        pooled = (h.float() * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, H)
        return self.head(pooled)  # (B, n_classes)


def load_minilm():
    """(BertModel without pooler, float32, on the CPU; tokenizer) of all-MiniLM-L6-v2 from the model cache."""
    quiet_transformers()
    from transformers import AutoModel, AutoTokenizer

    from backends.app.hub import minilm_path

    path = str(minilm_path())
    with contextlib.redirect_stdout(io.StringIO()):  # the load report (the unused pooler weights)
        encoder = AutoModel.from_pretrained(path, add_pooling_layer=False, dtype=torch.float32)
    return encoder, AutoTokenizer.from_pretrained(path)


def bert_target_names(encoder: nn.Module) -> list[str]:
    """Every encoder linear (q, k, v, attention output, intermediate, output) of every layer, in module order."""
    names = [n for n, m in encoder.named_modules() if type(m) is nn.Linear]
    return [n for n in names if n.startswith("encoder.layer.") and n.endswith(BERT_TARGETS)]


def build_classifier(arm: str, encoder: nn.Module, seed: int, *, device, r, alpha, dropout) -> SentenceClassifier:
    """A fresh copy of the encoder with the arm's LoRA layers + a classifier head, both drawn after seeding."""
    from backends.app.trainer import seed_everything

    enc = copy.deepcopy(encoder)
    names = bert_target_names(enc)
    seed_everything(seed)
    attach_lora(enc, names, arm, device=device, r=r, alpha=alpha, dropout=dropout)
    model = SentenceClassifier(enc).to(device)  # head: nn.Linear's default init from the seeded generator
    model.train()
    return model


def tokenize_sst2(rows, tokenizer, max_len: int) -> list[tuple[list[int], int]]:
    ids = tokenizer([t for t, _ in rows], truncation=True, max_length=max_len)["input_ids"]
    return [(list(i), y) for i, (_, y) in zip(ids, rows, strict=True)]


def collate_cls(items, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = max(len(i) for i, _ in items)
    ids = torch.full((len(items), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(items), T), dtype=torch.long)  # (B, T)
    for b, (i, _) in enumerate(items):
        ids[b, : len(i)] = torch.tensor(i)
        mask[b, : len(i)] = 1
    y = torch.tensor([label for _, label in items], dtype=torch.long)  # (B,)
    return ids.to(device), mask.to(device), y.to(device)


@torch.no_grad()
def accuracy(model, data, *, pad_id: int, batch_size: int = 128) -> float:
    """Dev accuracy (argmax of the logits), batches sorted by length; every RNG left as found."""
    from backends.app.trainer import rng_preserved

    device = next(model.parameters()).device
    was = model.training
    model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data[i][0]))
    correct = 0
    with rng_preserved():
        for k in range(0, len(order), batch_size):
            ids, mask, y = collate_cls([data[i] for i in order[k : k + batch_size]], pad_id, device)
            correct += int((model(ids, mask).argmax(-1) == y).sum())
    model.train(was)
    return correct / len(data)


def lr_at(step: int, steps: int, lr: float, schedule: str, warmup: float) -> float:
    """The learning rate of 0-based step `step` of `steps`: "constant", or "linear" (warm up over the first
    warmup * steps steps, then decay linearly towards 0; the last step still has lr / (steps - warm))."""
    if schedule == "constant":
        return lr
    if schedule != "linear":
        raise ValueError(f"schedule must be 'constant' or 'linear', got {schedule!r}")
    warm = int(round(warmup * steps))
    if step < warm:
        return lr * (step + 1) / warm
    return lr * (steps - step) / max(steps - warm, 1)


def train_classifier(model, data, *, seed: int, epochs: int, batch_size: int, lr: float, max_grad_norm: float,
                     pad_id: int, schedule: str = "linear", warmup: float = 0.06, progress: bool = True,
                     desc: str = "train") -> list[float]:  # fmt: skip
    """Length-grouped batches (order from seed), mean cross-entropy, clip, PagedAdamW with the lr schedule; returns
    the per-step losses."""
    from backends.app.batching import length_grouped_order
    from backends.torchlib import PagedAdamW, clip_grad_norm_

    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = PagedAdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(f"sst2-order-{seed}")
    lengths = [len(i) for i, _ in data]
    epochs_batches = [length_grouped_order(lengths, batch_size, rng) for _ in range(epochs)]
    steps = sum(len(b) for b in epochs_batches)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=desc, unit="step", mininterval=2.0, dynamic_ncols=True, file=sys.stderr)
    losses = []
    model.train()
    try:
        for batches in epochs_batches:
            for idx in batches:
                for group in opt.param_groups:
                    group["lr"] = lr_at(len(losses), steps, lr, schedule, warmup)
                ids, mask, y = collate_cls([data[i] for i in idx], pad_id, device)
                loss = F.cross_entropy(model(ids, mask).float(), y)
                loss.backward()
                clip_grad_norm_(params, max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{statistics.fmean(losses[-20:]):.3f}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
    return losses


def run_sst2(args) -> dict:
    device = resolve_device(args.device)
    sd = Path(args.shared) if args.shared else shared_dir()
    train_rows = sst2_subset(read_sst2(sd / "data" / "sst2" / "train.tsv"), args.train_examples)
    dev_rows = read_sst2(sd / "data" / "sst2" / "dev.tsv")
    if args.eval_examples:
        dev_rows = dev_rows[: args.eval_examples]
    encoder, tokenizer = load_minilm()
    pad_id = tokenizer.pad_token_id
    train_tok = tokenize_sst2(train_rows, tokenizer, args.max_len)
    dev_tok = tokenize_sst2(dev_rows, tokenizer, args.max_len)
    settings = dict(
        model="all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384), mean pooling, Linear(384, 2) head",
        device=str(device), backend=backend_name(device), compute_dtype=DTYPE_NAMES[compute_dtype_for(device)],
        bf16_arm=("base linear weights rounded to bf16, held as float32, float32 compute" if device.type == "cpu"
                  else "base linear weights bf16, bf16 compute"),
        quant="blocksize 64, double quantization", lora_targets=list(BERT_TARGETS),
        n_lora_layers=len(bert_target_names(encoder)),
        r=args.r, alpha=args.alpha, dropout=args.dropout, lora_dtype="float32", init="PEFT (A kaiming_uniform, B 0)",
        lr=args.lr, schedule=args.schedule, warmup=args.warmup, weight_decay=0.0,
        optimizer="backends.torchlib.PagedAdamW (32-bit states)",
        max_grad_norm=args.max_grad_norm, batch_size=args.batch_size, epochs=args.epochs,
        batching="length-grouped (backends.app.data.length_grouped_order), order from the seed",
        train_examples=len(train_tok), train_subset_seed=SST2_SUBSET_SEED,
        train_positive=sum(y for _, y in train_tok), dev_examples=len(dev_tok),
        dev_positive=sum(y for _, y in dev_tok), max_len=args.max_len,
        truncated_train=sum(len(i) >= args.max_len for i, _ in train_tok), encoder_dropout="on (BERT's 0.1)",
        torch_threads=torch.get_num_threads(),
    )  # fmt: skip
    print(f"SST-2: {len(train_tok)} train (fixed sample, seed {SST2_SUBSET_SEED}) / {len(dev_tok)} dev | {device} "
          f"| r {args.r} alpha {args.alpha} dropout {args.dropout} lr {args.lr} batch {args.batch_size} "
          f"epochs {args.epochs}")  # fmt: skip
    results: dict[str, dict] = {}
    for arm in args.arms:
        results[arm] = {"accuracy": {}, "seconds": {}, "final_train_loss": {}}
        for seed in args.seeds:
            t0 = time.perf_counter()
            model = build_classifier(arm, encoder, seed, device=device, r=args.r, alpha=args.alpha,
                                     dropout=args.dropout)  # fmt: skip
            if seed == args.seeds[0]:
                before = accuracy(model, dev_tok, pad_id=pad_id)
                results[arm]["accuracy_before_training"] = {str(seed): before}
                print(f"  {arm} seed {seed}: dev accuracy before training {before:.4f} (random head)")
            losses = train_classifier(model, train_tok, seed=seed, epochs=args.epochs, batch_size=args.batch_size,
                                      lr=args.lr, max_grad_norm=args.max_grad_norm, pad_id=pad_id,
                                      schedule=args.schedule, warmup=args.warmup, progress=not args.no_progress,
                                      desc=f"{arm} seed {seed}")  # fmt: skip
            acc = accuracy(model, dev_tok, pad_id=pad_id)
            dt = time.perf_counter() - t0
            results[arm]["accuracy"][str(seed)] = acc
            results[arm]["seconds"][str(seed)] = dt
            results[arm]["final_train_loss"][str(seed)] = statistics.fmean(losses[-20:])
            results[arm]["steps"] = len(losses)
            print(f"  {arm} seed {seed}: dev accuracy {acc:.4f} | train loss (last 20 steps) "
                  f"{statistics.fmean(losses[-20:]):.4f} | {len(losses)} steps | {dt:.0f} s")  # fmt: skip
            del model
            free_memory(device)
    return summarize("sst2", "accuracy", results, settings, device, args)


# --- (b) Alpaca with SmolLM2-135M ------------------------------------------------------------------------------------


def alpaca_split(n: int, n_eval: int, seed: int = ALPACA_SPLIT_SEED) -> tuple[list[int], list[int]]:
    """(train indices, eval indices): shuffle range(n) with random.Random(seed), hold out the last n_eval."""
    if not 0 < n_eval < n:
        raise ValueError(f"n_eval must be in (0, {n}), got {n_eval}")
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    return idx[:-n_eval], idx[-n_eval:]


def tokenize_within(examples, tokenizer, max_len: int):
    """Tokenize (response-only labels); examples longer than max_len are dropped (counted), never cut."""
    from backends.app.data import tokenize_example

    kept, dropped = [], 0
    for ex in examples:
        t = tokenize_example(ex, tokenizer)
        if len(t) <= max_len and t.n_target > 0:
            kept.append(t)
        else:
            dropped += 1
    return kept, dropped


def load_smollm2(device: torch.device):
    """(SmolLM2-135M-Instruct on the CPU, unprepared, in the compute dtype; its tokenizer; the GGUF path)."""
    quiet_transformers()
    from backends.app.hub import smollm2_gguf_path
    from backends.torchlib.load import load_model, load_tokenizer

    path = smollm2_gguf_path()
    with contextlib.redirect_stderr(io.StringIO()):  # transformers' GGUF reader draws its own bar
        model = load_model(path, backend="numpy", prepare=False, dtype=compute_dtype_for(device))
    return model, load_tokenizer(path), path


def llama_target_names(model: nn.Module) -> list[str]:
    """Every nn.Linear but the LM head (prepare_model's "all-linear")."""
    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and m is not head]


def build_lm(arm: str, base: nn.Module, seed: int, *, device, r, alpha, dropout, gradient_checkpointing: bool):
    """A fresh copy of the causal LM prepared for the arm (LoRA drawn after seeding)."""
    from backends.app.trainer import seed_everything
    from backends.torchlib.prepare import enable_checkpointing, prepare_model

    model = copy.deepcopy(base)
    names = llama_target_names(model)
    seed_everything(seed)
    if arm == "bf16-lora":
        attach_lora(model, names, arm, device=device, r=r, alpha=alpha, dropout=dropout)
        model.config.use_cache = False
        if gradient_checkpointing:
            enable_checkpointing(model, use_reentrant=False)
    else:
        prepare_model(model, backend=backend_name(device), r=r, alpha=alpha, dropout=dropout,
                      target="all-linear", quant_type=QUANT_TYPE[arm], double_quant=True, blocksize=64,
                      lora_dtype="float32", compute_dtype=compute_dtype_for(device),
                      gradient_checkpointing=gradient_checkpointing)  # fmt: skip
        if model.qlora_config.target_modules != names:
            raise RuntimeError("prepare_model targeted other linears than the bf16 arm")
    return model


def alpaca_config(args, seed: int, run_dir: str):
    from backends.app.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    return RunConfig(
        ModelConfig(r=args.r, alpha=args.alpha, dropout=args.dropout),
        DataConfig(max_len=args.max_len, group_by_length=True),
        TrainConfig(output_dir=run_dir, lr=args.lr, max_grad_norm=args.max_grad_norm, batch_size=args.batch_size,
                    grad_accum=args.grad_accum, max_steps=args.steps, seed=seed, eval_every=0, save_every=0,
                    log_every=0, eval_batches=0, progress=not args.no_progress, optim_bits=32, paged=True),
    )  # fmt: skip


def run_alpaca(args) -> dict:
    from backends.app.data import read_examples
    from backends.app.trainer import Trainer

    device = resolve_device(args.device)
    sd = Path(args.shared) if args.shared else shared_dir()
    data_path = sd / "data" / "alpaca" / "alpaca_5000.json"
    examples = read_examples(str(data_path), "alpaca")
    train_idx, eval_idx = alpaca_split(len(examples), args.n_eval)
    t0 = time.perf_counter()
    base, tokenizer, gguf = load_smollm2(device)
    load_s = time.perf_counter() - t0
    train_tok, drop_tr = tokenize_within([examples[i] for i in train_idx], tokenizer, args.max_len)
    eval_tok, drop_ev = tokenize_within([examples[i] for i in eval_idx], tokenizer, args.max_len)
    if args.eval_examples:
        eval_tok = eval_tok[: args.eval_examples]
    settings = dict(
        model=f"SmolLM2-135M-Instruct from {gguf.name}: its weights are the GGUF's Q4_1 blocks dequantized "
        "(the 16-bit baseline is a dequantized 4-bit model); embeddings tied to the LM head",
        device=str(device), backend=backend_name(device), compute_dtype=DTYPE_NAMES[compute_dtype_for(device)],
        bf16_arm=("base linear weights rounded to bf16, held as float32, float32 compute" if device.type == "cpu"
                  else "base linear weights bf16, bf16 compute"),
        quant="NF4, blocksize 64, double quantization (prepare_model)", target="all-linear (not the LM head)",
        n_lora_layers=len(llama_target_names(base)),
        r=args.r, alpha=args.alpha, dropout=args.dropout, lora_dtype="float32", lr=args.lr, schedule="constant",
        max_grad_norm=args.max_grad_norm, batch_size=args.batch_size, grad_accum=args.grad_accum,
        effective_batch=args.batch_size * args.grad_accum, steps=args.steps,
        optimizer="backends.torchlib.PagedAdamW 32-bit (paged)", loss="response tokens only",
        gradient_checkpointing=args.gradient_checkpointing, group_by_length=True, max_len=args.max_len,
        data=str(data_path.name),
        split=f"random.Random({ALPACA_SPLIT_SEED}).shuffle of the {len(examples)} records, last {args.n_eval} held out",
        n_train=len(train_tok), n_train_dropped_too_long=drop_tr, n_eval=len(eval_tok),
        n_eval_dropped_too_long=drop_ev, eval="mean response-token cross-entropy (nats/token) over the held-out set",
        model_load_seconds=load_s,
        torch_threads=torch.get_num_threads(),
    )  # fmt: skip
    print(f"Alpaca: {len(train_tok)} train / {len(eval_tok)} held-out (dropped > {args.max_len} tokens: "
          f"{drop_tr} / {drop_ev}) | {device} | {args.steps} steps x {args.batch_size}x{args.grad_accum} | "
          f"r {args.r} alpha {args.alpha} lr {args.lr}")  # fmt: skip
    results: dict[str, dict] = {}
    for arm in args.arms:
        results[arm] = {"eval_loss": {}, "seconds": {}, "final_train_loss": {}}
        for seed in args.seeds:
            t0 = time.perf_counter()
            model = build_lm(arm, base, seed, device=device, r=args.r, alpha=args.alpha, dropout=args.dropout,
                             gradient_checkpointing=args.gradient_checkpointing)  # fmt: skip
            with tempfile.TemporaryDirectory(prefix="repro-alpaca-") as run_dir:
                trainer = Trainer(model, tokenizer, alpaca_config(args, seed, run_dir), train_tok, eval_tok,
                                  run_dir=run_dir)  # fmt: skip
                if seed == args.seeds[0]:  # B = 0: the model before training does not depend on the seed
                    before = trainer.evaluate()
                    results[arm]["eval_loss_before_training"] = before
                    print(f"  {arm}: eval loss before training {before:.4f}")
                history = trainer.fit()
            steps = [h for h in history if "loss" in h]
            after = [h["eval_loss"] for h in history if "eval_loss" in h][-1]
            dt = time.perf_counter() - t0
            last = statistics.fmean(h["loss"] for h in steps[-10:]) if steps else float("nan")
            results[arm]["eval_loss"][str(seed)] = after
            results[arm]["seconds"][str(seed)] = dt
            results[arm]["final_train_loss"][str(seed)] = last
            if device.type == "cuda":
                results[arm].setdefault("peak_mem_gb", {})[str(seed)] = torch.cuda.max_memory_allocated() / 1e9
                torch.cuda.reset_peak_memory_stats()
            print(f"  {arm} seed {seed}: eval loss {after:.4f} | train loss (last 10 steps) {last:.4f} | "
                  f"{len(steps)} steps | {dt:.0f} s")  # fmt: skip
            del model, trainer
            free_memory(device)
    return summarize("alpaca", "eval_loss", results, settings, device, args)


# --- summary, table, JSON, PNG ---------------------------------------------------------------------------------------


def summarize(task: str, metric: str, results: dict, settings: dict, device, args) -> dict:
    arms = list(results)
    base = "bf16-lora"
    summary = {}
    for arm in arms:
        vals = [results[arm][metric][str(s)] for s in args.seeds]
        m, s = mean_std(vals)
        summary[arm] = {"mean": m, "std": s, "per_seed": dict(zip(map(str, args.seeds), vals, strict=True))}
    verdicts = {}
    if base in results:
        b = [results[base][metric][str(s)] for s in args.seeds]
        for arm in arms:
            if arm == base:
                continue
            o = [results[arm][metric][str(s)] for s in args.seeds]
            v = claim_verdict(b, o)
            paired = [x - y for x, y in zip(o, b, strict=True)]
            v["paired_gap_mean"], v["paired_gap_std"] = mean_std(paired)
            verdicts[arm] = v
    payload = {
        "task": task,
        "metric": metric,
        "device": device_name(device),
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO) if sys.argv[0] else "", *sys.argv[1:]]),
        "seeds": list(args.seeds),
        "settings": settings,
        "std": "sample standard deviation over the seeds (ddof 1)",
        "claim_rule": "holds when |mean(4-bit arm) - mean(bf16-lora)| <= max(std of the two arms)",
        "summary": summary,
        "claim": verdicts,
        "claim_holds": bool(verdicts) and all(v["holds"] for v in verdicts.values()),
        "runs": results,
        "total_seconds": sum(sum(r["seconds"].values()) for r in results.values()),
    }
    print_table(payload)
    if not args.no_save:
        from benchmarks.common import save

        path = save(args.name or f"repro_{task}", payload)
        png = path.with_suffix(".png")
        plot(payload, png)
        print(f"saved {path} and {png.name}")
    return payload


def print_table(p: dict) -> None:
    metric, fmt = p["metric"], ("{:.4f}" if p["metric"] == "eval_loss" else "{:.2%}")
    seeds = [str(s) for s in p["seeds"]]
    label = "dev accuracy" if metric == "accuracy" else "held-out eval loss (nats/token)"
    print(f"\n{p['task']}: {label}, {len(seeds)} seeds, {p['device']}")
    head = (
        f"{'arm':12s} " + " ".join(f"{'seed ' + s:>9s}" for s in seeds) + f" {'mean ± std':>20s} {'gap vs bf16':>12s}"
    )
    print(head)
    print("-" * len(head))
    for arm, s in p["summary"].items():
        cells = " ".join(f"{fmt.format(s['per_seed'][k]):>9s}" for k in seeds)
        ms = f"{fmt.format(s['mean'])} ± {fmt.format(s['std'])}"
        gap = p["claim"].get(arm)
        g = "" if gap is None else (f"{gap['gap']:+.4f}" if metric == "eval_loss" else f"{gap['gap'] * 100:+.2f} pt")
        print(f"{arm:12s} {cells} {ms:>20s} {g:>12s}")
    for arm, v in p["claim"].items():
        n = f"{v['noise']:.4f}" if metric == "eval_loss" else f"{v['noise'] * 100:.2f} pt"
        g = f"{abs(v['gap']):.4f}" if metric == "eval_loss" else f"{abs(v['gap']) * 100:.2f} pt"
        print(f"claim ({arm} vs bf16-lora): {'HOLDS' if v['holds'] else 'does NOT hold'} (|gap| {g} <= noise {n}?)")


def plot(p: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = 100.0 if p["metric"] == "accuracy" else 1.0
    arms = list(p["summary"])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for x, arm in enumerate(arms):
        s = p["summary"][arm]
        ys = [v * scale for v in s["per_seed"].values()]
        ax.scatter([x + 0.08 * (k - (len(ys) - 1) / 2) for k in range(len(ys))], ys, s=22, alpha=0.7, zorder=3,
                   label="per seed" if x == 0 else None)  # fmt: skip
        ax.errorbar([x + 0.3], [s["mean"] * scale], yerr=[s["std"] * scale], fmt="o", color="k", capsize=5,
                    label="mean ± std" if x == 0 else None)  # fmt: skip
    if p["metric"] == "eval_loss":
        before = [(x, p["runs"][a].get("eval_loss_before_training")) for x, a in enumerate(arms)]
        before = [(x, b) for x, b in before if b is not None]
        if before:
            ax.scatter(*zip(*before, strict=True), marker="x", color="gray", label="before training", zorder=2)
    ax.set_xticks(range(len(arms)), arms)
    ax.set_xlim(-0.5, len(arms) - 0.3)
    ax.set_ylabel("SST-2 dev accuracy (%)" if p["metric"] == "accuracy" else "held-out eval loss (nats/token)")
    verdict = "; ".join(f"{a}: {'holds' if v['holds'] else 'does not hold'}" for a, v in p["claim"].items())
    ax.set_title(f"{p['task']}: QLoRA vs 16-bit LoRA ({len(p['seeds'])} seeds)\n{verdict}", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- command line ----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="task", required=True)

    def common(sp, arms):
        sp.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
        sp.add_argument("--arms", nargs="+", default=list(arms), choices=list(arms))
        sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        sp.add_argument("--shared", default="", help="the shared folder (default $QLORA_SHARED or ../shared)")
        sp.add_argument("--eval-examples", type=int, default=0, help="score only the first N eval examples (0 = all)")
        sp.add_argument("--name", default="", help="results/<name>.json (default repro_<task>)")
        sp.add_argument("--no-save", action="store_true", help="print only; write no JSON/PNG")
        sp.add_argument("--no-progress", action="store_true")
        sp.add_argument(
            "--threads",
            type=int,
            default=1,
            help="torch CPU threads (0 = torch's default); 1 because on a 2-core machine shared with another job, "
            "2 OpenMP threads ran elementwise ops ~20x and a training step ~5x slower",
        )

    s = sub.add_parser("sst2", help="all-MiniLM-L6-v2 on SST-2: bf16 LoRA vs QLoRA NF4 vs FP4, dev accuracy")
    common(s, SST2_ARMS)
    s.add_argument("--train-examples", type=int, default=3000, help="fixed sample of SST-2 train (0 = all 67,349)")
    s.add_argument("--epochs", type=int, default=1)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (LoRA and head)")
    s.add_argument("--schedule", default="linear", choices=["linear", "constant"], help="linear: warmup then decay")
    s.add_argument("--warmup", type=float, default=0.06, help="warmup fraction of the steps (linear schedule)")
    s.add_argument("--r", type=int, default=8)
    s.add_argument("--alpha", type=float, default=16.0)
    s.add_argument("--dropout", type=float, default=0.1)
    s.add_argument("--max-grad-norm", type=float, default=1.0)
    s.add_argument("--max-len", type=int, default=64, help="tokens per sentence (truncated beyond)")

    a = sub.add_parser("alpaca", help="SmolLM2-135M on Alpaca: bf16 LoRA vs QLoRA NF4, held-out eval loss")
    common(a, ALPACA_ARMS)
    a.add_argument("--steps", type=int, default=100)
    a.add_argument("--batch-size", type=int, default=16, help="micro-batch (Guanaco: 4 x accum 4; same effective 16)")
    a.add_argument("--grad-accum", type=int, default=1)
    a.add_argument("--lr", type=float, default=2e-4)
    a.add_argument("--r", type=int, default=64)
    a.add_argument("--alpha", type=float, default=16.0)
    a.add_argument("--dropout", type=float, default=0.05)
    a.add_argument("--max-grad-norm", type=float, default=0.3)
    a.add_argument("--max-len", type=int, default=512, help="longer examples are dropped (counted), never cut")
    a.add_argument("--n-eval", type=int, default=250, help="held-out records (fixed seed-0 shuffle, the last N)")
    a.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="recompute activations in backward (saves memory, same math; off: 1.6x faster on an H100)",
    )
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit("--seeds must be distinct")
    if args.threads and resolve_device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
    return run_sst2(args) if args.task == "sst2" else run_alpaca(args)


if __name__ == "__main__":
    main()
