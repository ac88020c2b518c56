"""The paper's datatype study (QLoRA, Dettmers et al. 2023, Table 2 / Figure 3) on real pretrained weights.

Int4 vs FP4 vs NF4 vs NF4 + double quantization, each at blocksize 64 and computed by the spec (`qlora_ref`, bit-exact
with bitsandbytes).  For a weight matrix W (float32) and a format f:

    W_hat = dequantize_4bit(quantize_4bit(W, f), "float32")        the weight the QLoRA layer computes with

Part 1, quantization error (NumPy on the CPU), aggregated over every target matrix W_1..W_M of a model
(N = total elements):

    MSE = sum_m ||W_m - W_hat_m||_F^2 / N
    MAE = sum_m sum_ij |W_m - W_hat_m|_ij / N
    rel = sqrt(sum_m ||W_m - W_hat_m||_F^2) / sqrt(sum_m ||W_m||_F^2)
    bits/param = 8 * (bytes stored: packed codes + quantization constants) / N

  all-MiniLM-L6-v2: every nn.Linear of the encoder (fp32 as shipped: the clean case).
  SmolLM2-135M-Instruct: every nn.Linear of the decoder layers (q/k/v/o/gate/up/down), fp32 from its only offline
  copy, a GGUF Q4_1 file (already 4-bit: the "original" W is a dequantized Q4_1 weight, 5 bits/param at source).

Part 2, perplexity (torch, float32, no TF32): SmolLM2 on WikiText-2 valid (the file's text as is, lines joined by
"\n", tokenized whole with the model's tokenizer, no special tokens), cut into non-overlapping windows of --seq-len
tokens; each window is scored on its own (no context carried across windows), its first token is not predicted, and
the last, shorter window is INCLUDED (dropped only when it has a single token):

    ppl = exp( sum_windows sum_{t >= 1} -log p(x_t | x_<t within the window) / number of predicted tokens )

  for the model as loaded (Q4_1 dequantized: the baseline) and with every decoder linear weight replaced by W_hat of
  each format (the LM head, tied to the Q8_0 embedding, and the norms stay as loaded, as in QLoRA).

The paper's ordering, best first: NF4+DQ <= NF4 <= FP4 <= Int4 (double quantization costing nothing).  Each part
prints whether it holds, from the numbers, and the DQ cost (NF4+DQ minus NF4).

    python benchmarks/repro_datatypes.py --part error                      # CPU, a few minutes
    python benchmarks/repro_datatypes.py --part ppl --max-tokens 8192      # a CPU try-out
    python benchmarks/repro_datatypes.py --part ppl --device cuda          # the full WikiText-2 valid, on a GPU

Writes benchmarks/results/<out-name>.json and .png; running one part keeps the other part's results from the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/repro_datatypes.py` from anywhere
    sys.path.insert(0, str(REPO))

import qlora_ref as Q  # noqa: E402
from benchmarks.common import RESULTS, commit, cpu_name, save  # noqa: E402

# label -> quantize_4bit keywords; the paper's ranking, best first
FORMATS = {
    "Int4": dict(quant_type="int4", double_quant=False),
    "FP4": dict(quant_type="fp4", double_quant=False),
    "NF4": dict(quant_type="nf4", double_quant=False),
    "NF4+DQ": dict(quant_type="nf4", double_quant=True),
}
PAPER_ORDER = ("NF4+DQ", "NF4", "FP4", "Int4")
BASELINE = "as loaded (Q4_1 dequantized)"
MINILM = "all-MiniLM-L6-v2"
SMOLLM2 = "SmolLM2-135M-Instruct"
SMOLLM2_NOTE = (
    "SmolLM2-135M-Instruct's only offline copy is a GGUF Q4_1 file (already 4-bit, 5 bits/param: 32-element blocks "
    "with an fp16 scale and min; embedding Q8_0). Its 'original' weights are that file dequantized to fp32, so its "
    "errors measure re-quantizing a 4-bit model and its baseline perplexity is the dequantized Q4_1 model's. "
    "all-MiniLM-L6-v2's fp32 weights are the clean case."
)


@dataclass
class Settings:
    part: str = "all"  # error | ppl | all
    device: str = "auto"  # where the ppl forward passes run: auto (cuda if available) | cpu | cuda
    max_tokens: int = 0  # evaluate only the first N tokens of WikiText-2 valid (0 = all)
    seq_len: int = 1024  # tokens per non-overlapping ppl window
    batch_size: int = 4  # windows per forward pass
    blocksize: int = 64  # elements per absmax block, every format
    out_name: str = "repro_datatypes"  # benchmarks/results/<out_name>.json and .png


# --- weights and fake quantization ----------------------------------------------------------------------------------


def linear_layers(model, under: str) -> dict:
    """{full name: module} of every plain nn.Linear inside ``model.get_submodule(under)``, in module order."""
    from torch import nn

    root = model.get_submodule(under)
    return {f"{under}.{n}": m for n, m in root.named_modules() if type(m) is nn.Linear}


def snapshot(layers: dict) -> dict[str, np.ndarray]:
    """{name: a float32 NumPy copy of the layer's weight} (on the CPU), the W each format starts from."""
    return {n: m.weight.detach().to("cpu", copy=True).float().numpy() for n, m in layers.items()}


def quantize_dequantize(w: np.ndarray, fmt: str, blocksize: int = 64) -> tuple[np.ndarray, int]:
    """(W_hat, bytes stored) for one float32 matrix: the spec's quantize_4bit then dequantize_4bit to float32."""
    q = Q.quantize_4bit(w, blocksize=blocksize, **FORMATS[fmt])
    return Q.dequantize_4bit(q, "float32"), q.nbytes()


@dataclass
class ErrorSums:
    """Running sums over matrices, in float64; ``summary()`` gives the aggregate error (module docstring)."""

    n: int = 0  # elements
    matrices: int = 0
    sq_err: float = 0.0  # sum ||W - W_hat||_F^2
    abs_err: float = 0.0  # sum |W - W_hat|
    sq_w: float = 0.0  # sum ||W||_F^2
    nbytes: int = 0  # storage of the quantized matrices

    def add(self, w: np.ndarray, w_hat: np.ndarray, nbytes: int) -> None:
        d = w.astype(np.float64) - w_hat.astype(np.float64)
        self.n += w.size
        self.matrices += 1
        self.sq_err += float(np.dot(d.ravel(), d.ravel()))
        self.abs_err += float(np.abs(d).sum())
        self.sq_w += float(np.dot(w.ravel().astype(np.float64), w.ravel().astype(np.float64)))
        self.nbytes += int(nbytes)

    def summary(self) -> dict:
        return {
            "mse": self.sq_err / self.n,
            "mae": self.abs_err / self.n,
            "rel_error": math.sqrt(self.sq_err / self.sq_w),
            "bits_per_param": 8 * self.nbytes / self.n,
            "n_params": self.n,
            "n_matrices": self.matrices,
        }


def fake_quantize_(layers: dict, fmt: str, originals: dict[str, np.ndarray], blocksize: int = 64) -> ErrorSums:
    """Set every layer's weight to W_hat of its original W (``originals[name]``) in format ``fmt``, in place, matrix
    by matrix (the spec runs on the CPU; W_hat is copied to the weight's device and dtype); returns the error sums."""
    import torch

    sums = ErrorSums()
    for name, module in layers.items():
        w = originals[name]
        w_hat, nbytes = quantize_dequantize(w, fmt, blocksize)
        sums.add(w, w_hat, nbytes)
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(w_hat))
    return sums


# --- the orderings ----------------------------------------------------------------------------------------------


def ordering(values: dict[str, float]) -> dict:
    """Does values[NF4+DQ] <= values[NF4] <= values[FP4] <= values[Int4] hold (lower is better)?  And the DQ cost."""
    broken = [f"{a} > {b}" for a, b in zip(PAPER_ORDER[:-1], PAPER_ORDER[1:], strict=True) if values[a] > values[b]]
    dq = values["NF4+DQ"] - values["NF4"]
    return {
        "expected": " <= ".join(PAPER_ORDER),
        "holds": not broken,
        "broken": broken,
        "measured_best_first": sorted(PAPER_ORDER, key=lambda f: values[f]),
        "dq_cost": dq,
        "dq_cost_rel": dq / values["NF4"],
    }


def ordering_line(what: str, o: dict) -> str:
    verdict = "holds" if o["holds"] else "does NOT hold (" + ", ".join(o["broken"]) + ")"
    return (
        f"ordering {what}: {o['expected']} {verdict}; measured best first: {' < '.join(o['measured_best_first'])}; "
        f"DQ cost (NF4+DQ - NF4) {o['dq_cost']:+.3g} ({100 * o['dq_cost_rel']:+.3f}%)"
    )


# --- the models and the data ----------------------------------------------------------------------------------------


def load_minilm():
    """all-MiniLM-L6-v2 (a BertModel), fp32 as shipped, and its target layers (the encoder's linears)."""
    import transformers

    from backends.app.hub import minilm_path

    model = transformers.AutoModel.from_pretrained(str(minilm_path()))  # fp32: the dtype it is stored in
    return model, linear_layers(model, "encoder")


def load_smollm2():
    """SmolLM2-135M-Instruct in fp32 (transformers dequantizes the GGUF's Q4_1), its decoder linears, its GGUF path."""
    import torch

    from backends.app.hub import smollm2_gguf_path
    from backends.torchlib import load_model

    path = smollm2_gguf_path()
    model = load_model(path, backend="numpy", prepare=False, dtype=torch.float32)
    return model, linear_layers(model, "model.layers"), path


def gguf_tensor_types(path) -> dict:
    """How the GGUF file stores the decoder linears ({type: count}) and the token embedding (type)."""
    from gguf import GGUFReader

    tensors = GGUFReader(str(path)).tensors
    linear = Counter(
        t.tensor_type.name for t in tensors if t.name.startswith("blk.") and "norm" not in t.name and "weight" in t.name
    )
    embd = [t.tensor_type.name for t in tensors if t.name == "token_embd.weight"]
    return {"decoder_linears": dict(linear), "token_embd": embd[0] if embd else None}


def shared_dir() -> Path:
    return Path(os.environ.get("QLORA_SHARED", REPO.parent / "shared"))


def wikitext_ids(tokenizer, path: Path | None = None):
    """WikiText-2 valid as one LongTensor of token ids: the file's text as is, tokenized whole, no special tokens."""
    import torch

    path = path or shared_dir() / "data" / "wikitext-2" / "valid.txt"
    if not path.is_file():
        raise FileNotFoundError(f"WikiText-2 valid not found at {path} (set QLORA_SHARED to the shared folder)")
    text = path.read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)  # (T,)


# --- perplexity -----------------------------------------------------------------------------------------------------


def window_bounds(n_tokens: int, seq_len: int) -> list[tuple[int, int]]:
    """Non-overlapping [start, end) windows of seq_len tokens; the last, shorter one kept when it has >= 2 tokens."""
    bounds = [(s, min(s + seq_len, n_tokens)) for s in range(0, n_tokens, seq_len)]
    return [(s, e) for s, e in bounds if e - s >= 2]


def perplexity(model, ids, seq_len: int, batch_size: int = 1) -> dict:
    """exp(total NLL / predicted tokens) of ``model`` over ``ids`` in non-overlapping windows (module docstring)."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    bounds = window_bounds(len(ids), seq_len)
    by_len: dict[int, list] = {}
    for s, e in bounds:  # equal-length windows batch together (only the last one can be shorter): no padding
        by_len.setdefault(e - s, []).append((s, e))
    nll, count = 0.0, 0
    with torch.no_grad():
        for group in by_len.values():
            for k in range(0, len(group), batch_size):
                x = torch.stack([ids[s:e] for s, e in group[k : k + batch_size]]).to(device)  # (B, L)
                logits = model(input_ids=x, use_cache=False).logits.float()  # (B, L, V)
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="none")  # (B*(L-1),)
                nll += loss.double().sum().item()
                count += loss.numel()
    return {"ppl": math.exp(nll / count), "nll_sum": nll, "predicted_tokens": count, "windows": len(bounds)}


# --- the two parts --------------------------------------------------------------------------------------------------


def error_table(layers: dict, blocksize: int) -> dict[str, dict]:
    """{format: aggregate error summary} over ``layers`` (their weights end as the last format's W_hat)."""
    originals = snapshot(layers)
    return {fmt: fake_quantize_(layers, fmt, originals, blocksize).summary() for fmt in FORMATS}


def model_errors(name: str, source: str, layers: dict, blocksize: int) -> dict:
    t0 = time.perf_counter()
    results = error_table(layers, blocksize)
    return {
        "model": name,
        "source": source,
        "layers": sorted({n.rsplit(".", 1)[-1] for n in layers}),
        "results": results,
        "ordering": {m: ordering({f: r[m] for f, r in results.items()}) for m in ("mse", "mae", "rel_error")},
        "seconds": time.perf_counter() - t0,
    }


def run_error(s: Settings) -> dict:
    """Part 1 on the CPU: aggregate quantization error of both models' target weights, per format."""
    t0 = time.perf_counter()
    bert, layers = load_minilm()
    dtype = str(next(bert.parameters()).dtype)
    minilm = model_errors(MINILM, f"safetensors, loaded as {dtype} (fp32 as shipped)", layers, s.blocksize)
    del bert, layers
    llama, layers, path = load_smollm2()
    types = gguf_tensor_types(path)
    src = f"GGUF {path.name}: decoder linears {types['decoder_linears']}, dequantized to fp32 by transformers"
    smol = model_errors(SMOLLM2, src, layers, s.blocksize)
    del llama, layers
    return {
        **_stamp("cpu"),
        "seconds": time.perf_counter() - t0,
        "blocksize": s.blocksize,
        "computed_by": "qlora_ref (NumPy spec) on the CPU, matrix by matrix, every element (no sub-sampling)",
        "models": {MINILM: minilm, SMOLLM2: smol},
    }


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    return device


def run_ppl(s: Settings) -> dict:
    """Part 2: SmolLM2's WikiText-2 valid ppl, as loaded and with its decoder linears fake-quantized per format."""
    import torch

    from backends.torchlib import load_tokenizer

    t0 = time.perf_counter()
    device = resolve_device(s.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32
    torch.backends.cudnn.allow_tf32 = False
    llama, layers, path = load_smollm2()
    llama.to(device)
    all_ids = wikitext_ids(load_tokenizer(path))
    ids = all_ids[: s.max_tokens] if s.max_tokens else all_ids
    originals = snapshot(layers)
    results = {BASELINE: perplexity(llama, ids, s.seq_len, s.batch_size)}
    print(f"  {BASELINE}: ppl {results[BASELINE]['ppl']:.4f}", flush=True)
    for fmt in FORMATS:
        sums = fake_quantize_(layers, fmt, originals, s.blocksize)
        results[fmt] = {
            **perplexity(llama, ids, s.seq_len, s.batch_size),
            "weight_rel_error": sums.summary()["rel_error"],
        }
        print(f"  {fmt}: ppl {results[fmt]['ppl']:.4f}", flush=True)
    return {
        **_stamp(device),
        "seconds": time.perf_counter() - t0,
        "settings": {
            "data": "shared/data/wikitext-2/valid.txt: the text as is, tokenized whole, no special tokens",
            "tokens_in_file": len(all_ids),
            "max_tokens": s.max_tokens,
            "tokens_evaluated": len(ids),
            "seq_len": s.seq_len,
            "windows": "non-overlapping, each scored alone; last shorter window included (dropped if 1 token)",
            "batch_size": s.batch_size,
            "blocksize": s.blocksize,
            "compute_dtype": "float32 (TF32 off)",
            "quantized": f"{len(layers)} decoder linears; LM head (tied Q8_0 embedding) and norms as loaded",
        },
        "results": results,
        "ordering": ordering({f: results[f]["ppl"] for f in FORMATS}),
    }


def _stamp(device: str) -> dict:
    import torch

    name = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    return {
        "device": name,
        "command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "torch_threads": torch.get_num_threads(),
    }


# --- printing, merging, plotting -------------------------------------------------------------------------------------


def print_error(part: dict) -> None:
    print(f"\nquantization error, blocksize {part['blocksize']}, {part['computed_by']} ({part['device']})")
    print(f"{'model':24s} {'format':7s} {'bits/param':>10s} {'MSE':>11s} {'MAE':>11s} {'rel ||dW||/||W||':>17s}")
    for name, m in part["models"].items():
        for fmt, r in m["results"].items():
            print(
                f"{name:24s} {fmt:7s} {r['bits_per_param']:10.4f} {r['mse']:11.4e} {r['mae']:11.4e} "
                f"{r['rel_error']:17.5f}"
            )
        r = next(iter(m["results"].values()))
        print(f"{'':24s} ({r['n_matrices']} matrices, {r['n_params']:,} params; {m['source']})")
    for name, m in part["models"].items():
        for metric in ("mse", "mae"):
            print(ordering_line(f"{name} {metric.upper()}", m["ordering"][metric]))


def print_ppl(part: dict) -> None:
    st = part["settings"]
    print(
        f"\nSmolLM2-135M perplexity, WikiText-2 valid: {st['tokens_evaluated']:,} of {st['tokens_in_file']:,} tokens, "
        f"windows of {st['seq_len']} ({st['windows']}), {st['compute_dtype']} on {part['device']}"
    )
    base = part["results"][BASELINE]["ppl"]
    print(f"{'weights':30s} {'ppl':>10s} {'vs baseline':>12s} {'weight rel err':>15s}")
    for fmt, r in part["results"].items():
        rel = f"{r['weight_rel_error']:15.5f}" if "weight_rel_error" in r else f"{'-':>15s}"
        print(f"{fmt:30s} {r['ppl']:10.4f} {100 * (r['ppl'] / base - 1):+11.3f}% {rel}")
    print(ordering_line("ppl", part["ordering"]))
    print(f"note: {SMOLLM2_NOTE}")


def merged(previous: dict | None, new_parts: dict, blocksize: int = 64) -> dict:
    """The payload to save: the previous JSON's parts (error / ppl) kept unless re-run; its stamp dropped."""
    keep = {k: v for k, v in (previous or {}).items() if k in ("error", "ppl") and k not in new_parts}
    return {
        "study": "QLoRA datatype study: Int4 vs FP4 vs NF4 vs NF4+DQ (blockwise 4-bit, qlora_ref spec)",
        "formats": {
            f: {**kw, "bits_per_param_formula": Q.bits_per_param(blocksize, kw["double_quant"])}
            for f, kw in FORMATS.items()
        },
        "paper_order_best_first": list(PAPER_ORDER),
        "note_smollm2": SMOLLM2_NOTE,
        **keep,
        **new_parts,
    }


def plot(payload: dict, path: Path) -> None:
    """Left: relative weight error per format, both models.  Right: SmolLM2's ppl change vs its baseline, per format."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fmts = list(FORMATS)
    x = np.arange(len(fmts))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    if "error" in payload:
        models = payload["error"]["models"]
        width = 0.8 / len(models)
        for i, (name, m) in enumerate(models.items()):
            vals = [100 * m["results"][f]["rel_error"] for f in fmts]
            label = name + (" (from GGUF Q4_1)" if name == SMOLLM2 else " (fp32)")
            bars = ax1.bar(x + (i - (len(models) - 1) / 2) * width, vals, width, label=label)
            ax1.bar_label(bars, fmt="%.2f", fontsize=8)
        bits = next(iter(models.values()))["results"]
        ax1.set_xticks(x, [f"{f}\n{bits[f]['bits_per_param']:.3f} bit/param" for f in fmts])
        ax1.set_ylabel("||W - W_hat||_F / ||W||_F  (%)")
        ax1.set_ylim(top=ax1.get_ylim()[1] * 1.2)  # room for the legend above the bars
        ax1.set_title(f"weight quantization error, blocksize {payload['error']['blocksize']} (lower is better)")
        ax1.legend(fontsize=8, loc="upper right")
    else:
        ax1.text(0.5, 0.5, "quantization error: not run yet (--part error)", ha="center", transform=ax1.transAxes)
    if "ppl" in payload:
        p = payload["ppl"]
        base = p["results"][BASELINE]["ppl"]
        vals = [100 * (p["results"][f]["ppl"] / base - 1) for f in fmts]
        bars = ax2.bar(x, vals, 0.6, color="tab:purple")
        ax2.bar_label(bars, labels=[f"{p['results'][f]['ppl']:.3f}" for f in fmts], fontsize=8)
        ax2.set_xticks(x, fmts)
        ax2.set_ylabel(f"ppl increase over baseline (%); baseline ppl {base:.3f}")
        st = p["settings"]
        ax2.set_title(
            f"SmolLM2-135M ppl, WikiText-2 valid {st['tokens_evaluated']:,} tokens, seq {st['seq_len']}\n"
            f"baseline = GGUF Q4_1 dequantized; {p['device']}",
            fontsize=9,
        )
    else:
        ax2.text(0.5, 0.5, "perplexity: not run yet (--part ppl)", ha="center", transform=ax2.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main -----------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("error", "ppl", "all"), default=Settings.part)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=Settings.device)
    for name in ("max_tokens", "seq_len", "batch_size", "blocksize"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(Settings, name))
    parser.add_argument("--out-name", default=Settings.out_name)
    return Settings(**vars(parser.parse_args(argv)))


def main(argv=None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    s = parse_args(argv)
    print(f"settings: {asdict(s)}")
    new: dict = {}
    if s.part in ("error", "all"):
        new["error"] = run_error(s)
        print_error(new["error"])
        print(f"part error: {new['error']['seconds']:.1f} s")
    if s.part in ("ppl", "all"):
        new["ppl"] = run_ppl(s)
        print_ppl(new["ppl"])
        print(f"part ppl: {new['ppl']['seconds']:.1f} s")
    json_path = RESULTS / f"{s.out_name}.json"
    previous = json.loads(json_path.read_text()) if json_path.is_file() else None
    payload = merged(previous, new, s.blocksize)
    path = save(s.out_name, payload)
    plot(payload, path.with_suffix(".png"))
    print(f"saved {path} and {path.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
