"""SmolLM2-135M unquantized vs NF4 on a few MMLU subjects' DEV split, leave-one-out shots, on the CPU.

What this is and is not: MMLU's dev split (5 questions per subject, ../shared/data/mmlu/dev/), each question scored
with k of the OTHER four dev examples as its shots (leave-one-out, so k <= 4), on a handful of subjects — not the
test split, not the paper's 5-shot number, and with 5 questions a subject every accuracy here moves in steps of 0.2.
It shows the evaluator running end to end on real files and whether NF4 moves the letter choices of a real model.

The model is SmolLM2-135M-Instruct from its GGUF (Q4_1 blocks dequantized by transformers), so the "unquantized"
arm is itself a dequantized 4-bit model held in float32 (bfloat16 matmuls are ~3.7x slower on this CPU, and every
bfloat16 value it would hold is the float32 one rounded); the NF4 arm re-quantizes those weights with the numpy
backend (NF4, double quantization, blocksize 64, float32 compute), with LoRA's B = 0 so the adapter adds nothing.

With ``--adapter DIR`` a third arm scores that NF4 base plus a trained PEFT adapter (e.g. a short Alpaca finetune).

    python -m benchmarks.mmlu_dev [--subjects S ...] [--shots 4] [--adapter DIR]  -> results/mmlu_dev_smollm2.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, cpu_name, save

DEFAULT_SUBJECTS = ["world_religions", "management", "conceptual_physics", "miscellaneous"]  # the shortest prompts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subjects", nargs="+", default=DEFAULT_SUBJECTS)
    p.add_argument("--shots", type=int, default=4, help="leave-one-out shots, <= 4")
    p.add_argument("--shared", default="", help="the shared folder (default $QLORA_SHARED or ../shared)")
    p.add_argument("--name", default="mmlu_dev_smollm2")
    p.add_argument("--adapter", default="", help="also score NF4 + this PEFT adapter (a finetune's adapter/)")
    p.add_argument("--adapter-note", default="", help="how the adapter was trained, stored with the result")
    args = p.parse_args(argv)

    from backends.app.hub import smollm2_gguf_path
    from backends.app.mmlu import evaluate_mmlu, format_summary
    from backends.torchlib.load import load_model, load_tokenizer

    shared = Path(args.shared or os.environ.get("QLORA_SHARED", REPO.parent / "shared"))
    mmlu_dir = shared / "data" / "mmlu"
    gguf = str(smollm2_gguf_path())
    tokenizer = load_tokenizer(gguf)
    arms = {
        "unquantized_fp32": lambda: load_model(gguf, prepare=False),
        "nf4_dq_b64": lambda: load_model(gguf, r=8, dropout=0.0, gradient_checkpointing=False),
    }
    if args.adapter:
        from backends.torchlib.export import adapter_prepare_kwargs, load_peft_adapter

        def with_adapter():
            kw = {**adapter_prepare_kwargs(args.adapter), "dropout": 0.0, "gradient_checkpointing": False}
            return load_peft_adapter(load_model(gguf, **kw), args.adapter)

        arms["nf4_dq_b64_adapter"] = with_adapter
    results = {}
    for name, load in arms.items():
        model = load()
        t0 = time.perf_counter()
        r = evaluate_mmlu(model, tokenizer, mmlu_dir, split="dev", shots=args.shots, subjects=args.subjects)
        r["seconds"] = round(time.perf_counter() - t0, 1)
        results[name] = r
        print(f"{name}: {format_summary(r)} ({r['seconds']} s)")
        del model
    a, b = results["unquantized_fp32"], results["nf4_dq_b64"]
    pa, pb = ("".join(r["per_subject"][s]["pred"] for s in args.subjects) for r in (a, b))  # unquantized vs NF4
    agree = sum(x == y for x, y in zip(pa, pb, strict=True))
    path = save(
        args.name,
        {
            "what": "MMLU DEV split, leave-one-out shots, a few subjects (not the test split)",
            "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized by transformers)",
            "device": cpu_name(),
            "command": "python -m benchmarks.mmlu_dev " + " ".join(sys.argv[1:] if argv is None else argv),
            "subjects": args.subjects,
            "shots": args.shots,
            "same_prediction": f"{agree}/{a['n_questions']}",
            "adapter": {"path": args.adapter, "trained": args.adapter_note} if args.adapter else None,
            "variants": results,
        },
    )
    print(f"same letter chosen on {agree}/{a['n_questions']} questions; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
