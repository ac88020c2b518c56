"""LoftQ vs plain NF4: the starting reconstruction error on real SmolLM2-135M weights (specs/loftq.md, LOFTQ-4).

For each weight W of the chosen decoder layers (all 7 linears: q/k/v/o/gate/up/down), a rank r and a method:

    plain NF4:   e = ||W - W_hat||_F,                 W_hat = dequantize(quantize_4bit(W))  (B = 0, QLoRA's start)
    LoftQ T:     e = ||W - (dequantize(Q) + s B A)||_F,  (Q, A, B) = qlora_ref.loftq.loftq_init(W, r, T)
    PEFT LoftQ:  e = ||W - (W_q + L R)||_F,            (W_q, R, L) = peft.utils.loftq_utils.loftq_init(W, 4, r, T)
                 (bitsandbytes NF4 without double quant; PEFT moves the weight to CUDA unconditionally, so on a CPU
                 machine the row says why it did not run)

aggregated over the M matrices: total = sqrt(sum_m e_m^2), rel = total / sqrt(sum_m ||W_m||_F^2), and the mean over
matrices of e_m / e_plain,m.  alpha = r (s = 1), the scaling PEFT's LoftQ assumes; ours divides the factors by
sqrt(s), so s B A and the error are the same for every alpha up to float32 rounding.  All NumPy (the spec), CPU.
SmolLM2's only offline copy is a GGUF Q4_1 file, so W is the dequantized Q4_1 weight (as in repro_datatypes.py).

    python benchmarks/loftq_error.py                       # layers 0,1; r 16, 64; T 1, 2, 4 (a few minutes on 2 cores)

Writes benchmarks/results/loftq_error.json and .png.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/loftq_error.py` from anywhere
    sys.path.insert(0, str(REPO))

import qlora_ref  # noqa: E402
from benchmarks.common import cpu_name, save  # noqa: E402
from qlora_ref.loftq import loftq_init, reconstruction_error  # noqa: E402

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Settings:
    layers: list = field(default_factory=lambda: [0, 1])  # decoder layers whose 7 linears are measured
    ranks: list = field(default_factory=lambda: [16, 64])  # LoRA ranks r
    iters: list = field(default_factory=lambda: [1, 2, 4])  # LoftQ's T
    out_name: str = "loftq_error"


def smollm2_weights(layers) -> dict[str, np.ndarray]:
    """{module path: float32 W} for the 7 linears of each decoder layer in ``layers``."""
    import torch

    from backends.app.hub import smollm2_gguf_path
    from backends.torchlib import load_model

    model = load_model(smollm2_gguf_path(), backend="numpy", prepare=False, dtype=torch.float32)
    out = {}
    for i in layers:
        for lin in LINEARS:
            name = f"model.layers.{i}.{'self_attn' if lin in LINEARS[:4] else 'mlp'}.{lin}"
            out[name] = model.get_submodule(name).weight.detach().numpy().astype(np.float32)
    return out


def peft_loftq_error(W: np.ndarray, r: int, T: int) -> float:
    """PEFT's loftq_init on W (its NF4: bitsandbytes, no double quant); raises where it cannot run."""
    import torch
    from peft.utils.loftq_utils import loftq_init as peft_loftq_init

    device = "cuda" if torch.cuda.is_available() else "cpu"
    Wq, lora_A, lora_B = peft_loftq_init(torch.from_numpy(W).to(device), num_bits=4, reduced_rank=r, num_iter=T)
    E = torch.from_numpy(W).double() - (Wq.double().cpu() + lora_B.double().cpu() @ lora_A.double().cpu())
    return float(torch.linalg.norm(E))


def summarise(errs: dict[str, float], plain: dict[str, float], norms: dict[str, float]) -> dict:
    total = float(np.sqrt(sum(e * e for e in errs.values())))
    return {
        "total": total,
        "rel": total / float(np.sqrt(sum(n * n for n in norms.values()))),
        "mean_ratio_to_plain": float(np.mean([errs[k] / plain[k] for k in errs])),
        "per_matrix": errs,
    }


def run(s: Settings) -> dict:
    t0 = time.time()
    weights = smollm2_weights(s.layers)
    norms = {k: float(np.linalg.norm(W.astype(np.float64))) for k, W in weights.items()}
    plain = {k: reconstruction_error(W, qlora_ref.quantize_4bit(W)) for k, W in weights.items()}
    rows = {"plain NF4": summarise(plain, plain, norms)}
    peft_note = None
    for r in s.ranks:
        for T in s.iters:
            errs = {}
            for k, W in weights.items():
                Q, A, B = loftq_init(W, r=r, alpha=r, iters=T)
                errs[k] = reconstruction_error(W, Q, A, B, 1.0)
            rows[f"LoftQ r={r} T={T}"] = {"r": r, "T": T, **summarise(errs, plain, norms)}
            print(f"  r={r} T={T}: {time.time() - t0:.0f} s", flush=True)
            if peft_note is None:
                try:
                    perrs = {k: peft_loftq_error(W, r, T) for k, W in weights.items()}
                    rows[f"PEFT LoftQ r={r} T={T}"] = {"r": r, "T": T, **summarise(perrs, plain, norms)}
                except Exception as e:  # noqa: BLE001  (the reason is the result)
                    peft_note = f"PEFT loftq_init did not run here: {type(e).__name__}: {str(e).splitlines()[0]}"
                    print("  " + peft_note, flush=True)
    return {"rows": rows, "norms": norms, "peft": peft_note or "ran", "seconds": time.time() - t0}


def print_table(result: dict) -> None:
    print(f"\n{'method':<24} {'||W - W0||_F total':>20} {'relative':>10} {'mean e/e_plain':>15}")
    for name, row in result["rows"].items():
        print(f"{name:<24} {row['total']:>20.4f} {row['rel']:>10.5f} {row['mean_ratio_to_plain']:>15.4f}")
    if result["peft"] != "ran":
        print(result["peft"])


def plot(result: dict, path: Path, ranks) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    plain = result["rows"]["plain NF4"]["rel"]
    for i, r in enumerate(ranks):
        rows = [(k, v) for k, v in result["rows"].items() if v.get("r") == r and k.startswith("LoftQ")]
        ax.plot([v["T"] for _, v in rows], [v["rel"] for _, v in rows], "o-", label=f"LoftQ r={r}", color=f"C{i}")
    ax.axhline(plain, color="k", ls="--", label="plain NF4 (B = 0)")
    ax.set_xlabel("LoftQ iterations T")
    ax.set_ylabel("||W - (W_hat + sBA)||_F / ||W||_F")
    ax.set_title("SmolLM2-135M, starting reconstruction error")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("layers", "ranks", "iters"):
        parser.add_argument("--" + name, type=int, nargs="+", default=getattr(Settings(), name))
    parser.add_argument("--out-name", default=Settings.out_name)
    return Settings(**vars(parser.parse_args(argv)))


def main(argv=None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    s = parse_args(argv)
    print(f"settings: {asdict(s)}")
    result = run(s)
    print_table(result)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    payload = {
        "device": f"CPU {cpu_name()}",
        "git_head": head or "unknown",
        "command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "settings": asdict(s),
        "matrices": len(result["norms"]),
        **result,
    }
    path = save(s.out_name, payload)
    plot(result, path.with_suffix(".png"), s.ranks)
    print(f"saved {path} and {path.with_suffix('.png').name} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
