"""The training loop and what it trains on: the run's datasets, gradient accumulation, clipping, constant lr, paged
AdamW, the held-out scores before and after, atomic checkpoint/resume.

One optimizer step over an effective batch of K = grad_accum micro-batches, N response tokens in all:

    loss = (1/N) * sum_k sum_{t in response_k} -log p(x_t | x_<t)        (token-weighted mean over the whole step)
    g    = clip(grad loss, max_grad_norm)      g *= min(1, max_norm / (||g||_2 + 1e-6))    (ADAMW-10)
    p    = PagedAdamW(p, g)                    lr constant (Guanaco: 2e-4)                  (ADAMW-1 .. ADAMW-9)

Resume is bit-for-bit on the CPU: a checkpoint holds the LoRA weights, the optimizer's state dict, every RNG state
(torch CPU/CUDA — the LoRA dropout seeds are drawn from it — Python, NumPy), the data order position
(epoch, batch index; the order of an epoch depends only on the seed) and the step.  A checkpoint directory is
written beside the live one and swapped in with renames, so a crash leaves the previous checkpoint intact; Ctrl-C
(KeyboardInterrupt) during ``fit`` saves one before it stops, so an interrupted run can always be resumed.
The held-out scores themselves (eval loss, exact match) are computed in evaluate.py.

On a GPU (``--backend cupy``, one process) the micro-batches run in gpu_step.py: dropout masks from a seed in device
memory, and with ``--cuda-graphs auto`` each forward + backward replayed as a CUDA graph; the same loss and
gradients as its eager step, bit for bit.

Data parallel (``qlora finetune --nproc N``, parallel.py; DIST-8 in specs/distributed.md): inside torchrun's process
group the loss module is DDP-wrapped; every rank draws the same global micro-batches, counts the step's N response
tokens from them, and backpropagates its share's loss sum times world / N, so DDP's mean over the ranks is the
gradient above (``no_sync`` on all but the last micro-batch of a step).  The logged loss is the global one (the ranks'
loss sums all-reduced).  Every rank evaluates (no communication; the replicas are equal, so are the scores); only
rank 0 writes metrics.jsonl and checkpoints, whose format does not depend on N: a run resumes with any N.

MMLU as a callback (``mmlu``: model -> the result of ``mmlu.evaluate_mmlu``, as the QLoRA repository's MMLU
callback): scored before training (step 0), every ``eval_mmlu_every`` steps (0: every ``eval_every``) and after,
each time logged as {"step", "mmlu_macro_acc", "mmlu_micro_acc", "mmlu_n_questions"} in metrics.jsonl and in the
before/after scores.  Like the eval loss it runs without gradients and with every RNG put back as it was, so a run
trains the same with and without it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import time
from dataclasses import dataclass

import torch

from .batching import BatchStream, collate
from .checkpoint import CHECKPOINT, find_checkpoint, read_checkpoint, write_checkpoint
from .config import RunConfig
from .data import Example, TokenizedExample
from .evaluate import (
    ResponseLoss,
    eval_loss,
    exact_match,
    model_device,
    n_response_tokens,
    pad_id_of,
    score_pass,
    to_device,
    tokenize_scored,
)
from .gpu_step import GpuMicroSteps
from .parallel import global_sum, share
from .rng import rng_preserved, rng_state, seed_everything, set_rng_state  # noqa: F401  (re-exported)

# --- small helpers ---------------------------------------------------------------------------------------------


def trainable_named_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def memory_gb(device: torch.device) -> float:
    """Peak memory in GB: torch's allocator on CUDA, the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is KiB on Linux


@dataclass
class StepResult:
    step: int
    loss: float
    grad_norm: float
    tokens: int
    seconds: float


class Trainer:
    """Runs ``cfg.train.max_steps`` optimizer steps of a prepared model over tokenized data; see the module docstring.

    run_dir receives checkpoint/ (resumable state) and metrics.jsonl (one JSON object per logged step or eval).
    ``scored``: examples scored by exact match in ``scores()`` (the generated task's held-out split), if any.
    """

    def __init__(
        self,
        model,
        tokenizer,
        cfg: RunConfig,
        train_set: list[TokenizedExample],
        eval_set: list[TokenizedExample] | None = None,
        *,
        run_dir: str,
        optimizer=None,
        scored: list[Example] | None = None,
        mmlu=None,
    ):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.train_set, self.eval_set, self.scored, self.mmlu = train_set, eval_set or [], scored, mmlu
        self.run_dir = run_dir
        self.pad_id = pad_id_of(tokenizer)
        self.device = model_device(model)
        self.params = trainable_named_parameters(model)
        if not self.params:
            raise ValueError("the model has no trainable parameters; call prepare_model(...) first")
        t = cfg.train
        from backends.torchlib import distributed as D

        self.rank, self.world = D.rank(), D.world_size()
        self.main = self.rank == 0  # the one rank that writes (DIST-5)
        if t.batch_size % self.world:
            raise ValueError(f"--batch-size {t.batch_size} (global) does not split over {self.world} ranks")
        # the loss as a module DDP's forward runs (it arms the gradient all-reduce); one process: called bare
        self.loss_module = ResponseLoss(model) if self.world == 1 else D.wrap_ddp(ResponseLoss(model))
        # the GPU's micro-steps: StepSeed dropout, CUDA graphs (gpu_step.py); the CPU path is the loop below
        self.gpu = GpuMicroSteps(model, self.params, cfg) if self.device.type == "cuda" else None
        self.optimizer = optimizer or make_optimizer(list(self.params.values()), cfg)
        self.stream = BatchStream(train_set, t.batch_size, seed=t.seed, group_by_length=cfg.data.group_by_length)
        self.step = 0
        self.history: list[dict] = []  # {"step", "loss", ...} and {"step", "eval_loss"}
        self._same_sets: bool | None = None  # scored examples == eval set? (decided once, _scored_is_eval)
        self._exact_match_at: tuple[int, float] | None = None  # (step, exact match) of the last combined pass
        if self.main:
            os.makedirs(run_dir, exist_ok=True)

    # -- one step --

    def train_step(self) -> StepResult:
        t0 = time.perf_counter()
        cfg = self.cfg.train
        self.loss_module.train()
        micro = [self.stream.next_batch() for _ in range(cfg.grad_accum)]  # the global micro-batches, every rank
        pad_to = self.gpu.pad_to(self.cfg.data.pad_to_multiple_of) if self.gpu else self.cfg.data.pad_to_multiple_of
        whole = [collate(b, self.pad_id, pad_to) for b in micro]
        n_tok = sum(n_response_tokens(b) for b in whole)  # N_tok of the whole step, on every rank alike
        tokens = sum(int(b["attention_mask"].sum()) for b in whole)
        total = 0.0  # this rank's loss sum
        gpu_micro = self.gpu is not None and self.world == 1
        if gpu_micro:
            total = self.gpu.run(whole, n_tok)
        for i, examples in enumerate([] if gpu_micro else micro):
            if self.gpu is not None and self.gpu.seeds is not None:  # data parallel on GPUs: eager, same masks
                self.gpu.seeds.renew()
            mine, weight = share(examples, self.rank, self.world) if self.world > 1 else (examples, 1.0)
            b = whole[i] if self.world == 1 else collate(mine, self.pad_id, pad_to)
            last = i == len(micro) - 1
            with contextlib.nullcontext() if last or self.world == 1 else self.loss_module.no_sync():
                loss_sum = self.loss_module(**to_device(b, self.device))
                if weight != 1.0:  # a rank without an example of this (last, short) batch: joins with 0
                    loss_sum = loss_sum * weight
                (loss_sum * self.world / n_tok).backward()  # DDP averages: (1/N_tok) sum_ranks loss_sum (DIST-8)
            total += float(loss_sum.detach())
        total = global_sum(total)
        from backends.torchlib import clip_grad_norm_

        grad_norm = float(clip_grad_norm_(list(self.params.values()), cfg.max_grad_norm))  # ADAMW-10
        if not math.isfinite(grad_norm):
            raise FloatingPointError(f"non-finite gradient norm at step {self.step + 1}; lower --lr or check the data")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return StepResult(self.step, total / n_tok, grad_norm, tokens, time.perf_counter() - t0)

    def evaluate(self) -> float:
        """Eval loss; leaves every RNG as it found it, so evaluating never changes the training that follows."""
        b = self.cfg.train
        with rng_preserved():
            return eval_loss(self.model, self.eval_set, batch_size=b.batch_size, pad_id=self.pad_id,
                             max_batches=b.eval_batches, progress=b.progress)  # fmt: skip

    def scores(self) -> dict:
        """The held-out scores of the model as it is now: ``eval_loss`` (None without an eval set; the eval logged at
        this very step when there is one) and, with ``scored`` examples, ``exact_match`` (a fraction)."""
        last = self.history[-1] if self.history else {}
        out: dict = {"eval_loss": None}
        em = self._exact_match_at[1] if self._exact_match_at and self._exact_match_at[0] == self.step else None
        if self.eval_set:
            if "eval_loss" in last and last["step"] == self.step:
                out["eval_loss"] = last["eval_loss"]
            else:
                held = self._score_held_out()
                out["eval_loss"], em = held["eval_loss"], held.get("exact_match", em)
        if self.scored is not None:
            out["exact_match"] = (
                em
                if em is not None
                else exact_match(self.model, self.tokenizer, self.scored, progress=self.cfg.train.progress)[0]
            )
        if self.mmlu is not None:
            logged = [h for h in self.history if "mmlu_macro_acc" in h and h["step"] == self.step]
            rec = logged[-1] if logged else self._log_mmlu(os.path.join(self.run_dir, "metrics.jsonl"))
            out.update(mmlu_macro_acc=rec["mmlu_macro_acc"], mmlu_micro_acc=rec["mmlu_micro_acc"])
        return out

    def _score_held_out(self) -> dict:
        """{"eval_loss"} — plus "exact_match" when the exact-match set is the eval set (the generated task), both
        from one pass; every RNG put back as it was.  Remembers that exact match for ``scores()`` at this step."""
        if not self._scored_is_eval():
            return {"eval_loss": self.evaluate()}
        b = self.cfg.train
        with rng_preserved():
            loss, correct = score_pass(self.model, self.eval_set, batch_size=b.batch_size, pad_id=self.pad_id,
                                       progress=b.progress, desc="scores", per_example=True)  # fmt: skip
        self._exact_match_at = (self.step, sum(correct) / len(correct))
        return {"eval_loss": loss, "exact_match": self._exact_match_at[1]}

    def _scored_is_eval(self) -> bool:
        """True when exact match scores exactly the eval-loss set, whole (the generated task's held-out split)."""
        if self.scored is None or not self.eval_set or self.cfg.train.eval_batches:
            return False
        if self._same_sets is None:
            pairs = [(t.input_ids, t.labels) for t in tokenize_scored(self.tokenizer, self.scored)]
            self._same_sets = pairs == [(t.input_ids, t.labels) for t in self.eval_set]
        return self._same_sets

    def mmlu_every(self) -> int:
        """Steps between MMLU scores inside ``fit`` (0: only before and after)."""
        t = self.cfg.train
        return t.eval_mmlu_every or t.eval_every

    # -- the loop --

    def fit(self, *, on_step=None) -> list[dict]:
        """Train to cfg.train.max_steps (from self.step), logging, evaluating and checkpointing as configured."""
        cfg = self.cfg.train
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, desc="finetune", unit="step", dynamic_ncols=True)
        metrics_path = os.path.join(self.run_dir, "metrics.jsonl")
        last_save = time.monotonic()
        at_start = None  # (step, data position, RNG states) as the step in progress found them
        try:
            while self.step < cfg.max_steps:
                at_start = (self.step, self.stream.state_dict(), rng_state())
                r = self.train_step()
                rec = {
                    "step": r.step,
                    "loss": r.loss,
                    "grad_norm": r.grad_norm,
                    "lr": cfg.lr,
                    "tokens": r.tokens,
                    "tokens_per_s": r.tokens / r.seconds,
                    "step_seconds": r.seconds,
                    "mem_gb": memory_gb(self.device),
                }
                self.history.append(rec)
                if self.main and cfg.log_every and r.step % cfg.log_every == 0:
                    _append_jsonl(metrics_path, rec)
                if self.eval_set and cfg.eval_every and r.step % cfg.eval_every == 0 and r.step < cfg.max_steps:
                    self._log_eval(metrics_path)
                every_mmlu = self.mmlu_every()
                if self.mmlu is not None and every_mmlu and r.step % every_mmlu == 0 and r.step < cfg.max_steps:
                    self._log_mmlu(metrics_path)
                every_n = cfg.save_every and r.step % cfg.save_every == 0
                every_minutes = cfg.save_minutes and time.monotonic() - last_save >= 60 * cfg.save_minutes
                if (every_n or every_minutes) and r.step < cfg.max_steps:
                    self.save_checkpoint()
                    last_save = time.monotonic()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{r.loss:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}", mem=f"{rec['mem_gb']:.2f}GB"
                    )
                if on_step is not None:
                    on_step(self, rec)
        except KeyboardInterrupt:  # Ctrl-C (or SIGTERM, see finetune.py): keep what was trained, resumably
            if at_start is not None and at_start[0] == self.step:  # stopped inside a step: checkpoint its start
                self._rewind(*at_start[1:])
            self.save_checkpoint()
            raise
        finally:
            if bar is not None:
                bar.close()
        if self.eval_set and (not self.history or "eval_loss" not in self.history[-1]):
            self._log_eval(metrics_path)
        self.save_checkpoint()
        return self.history

    def _rewind(self, stream_state: dict, rng: dict) -> None:
        """Undo a step stopped half-way: its batches and RNG draws are put back and its gradients dropped, so a run
        resumed from the checkpoint makes that step exactly as an uninterrupted one would."""
        self.optimizer.zero_grad(set_to_none=True)
        self.stream.load_state_dict(stream_state)
        set_rng_state(rng)

    def _log_eval(self, metrics_path: str) -> None:
        rec = {"step": self.step, "eval_loss": self._score_held_out()["eval_loss"]}
        self.history.append(rec)
        if self.main:
            _append_jsonl(metrics_path, rec)

    def _log_mmlu(self, metrics_path: str) -> dict:
        """Score MMLU now (RNGs put back after), log it in history and metrics.jsonl; returns the record."""
        with rng_preserved():
            r = self.mmlu(self.model)
        rec = {"step": self.step, "mmlu_macro_acc": r["mmlu_macro_acc"], "mmlu_micro_acc": r["mmlu_micro_acc"],
               "mmlu_n_questions": r["n_questions"]}  # fmt: skip
        self.history.append(rec)
        if self.main:
            _append_jsonl(metrics_path, rec)
        return rec

    # -- checkpoint / resume --

    def save_checkpoint(self) -> str:
        """Write run_dir/checkpoint atomically (checkpoint.py), rank 0 only: the replicas are equal, and nothing in
        it depends on the number of ranks."""
        if not self.main:
            return os.path.join(self.run_dir, CHECKPOINT)
        state = {
            "step": self.step,
            "stream": self.stream.state_dict(),
            "history": self.history,
            "config": self.cfg.to_dict(),
            "param_names": list(self.params),
        }
        return write_checkpoint(self.run_dir, self.params, self.optimizer, rng_state(), state)

    def load_checkpoint(self, path: str | None = None) -> None:
        """Restore weights, optimizer, RNGs, data position and step from run_dir/checkpoint (or ``path``)."""
        path = path or find_checkpoint(self.run_dir)
        if path is None:
            raise ValueError(f"no checkpoint in {self.run_dir!r} to resume from")
        state, rng = read_checkpoint(path, self.params, self.optimizer)
        self.stream.load_state_dict(state["stream"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        if self.main:
            with open(os.path.join(self.run_dir, "metrics.jsonl"), "w") as f:  # drop lines logged after the checkpoint
                f.writelines(json.dumps(h) + "\n" for h in self.history)
        set_rng_state(rng)


def make_optimizer(params: list[torch.nn.Parameter], cfg: RunConfig):
    """The paper's paged AdamW (backends.torchlib.PagedAdamW; host-memory states on the CPU).

    Its own non-finite check (a multi-tensor norm and a host sync per step) is off: every step clips first, and the
    clip refuses a non-finite global norm before anything is scaled or stepped; that norm is finite exactly when every
    gradient is (float32 squares cannot overflow a float64 sum), and clipping by min(coef, 1) keeps them finite."""
    from backends.torchlib import PagedAdamW

    t = cfg.train
    return PagedAdamW(
        params,
        lr=t.lr,
        betas=(t.beta1, t.beta2),
        eps=t.eps,
        weight_decay=t.weight_decay,
        decay="after",
        state_bits=t.optim_bits,
        paged=t.paged,
        check_finite=False,
    )


def _append_jsonl(path: str, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
