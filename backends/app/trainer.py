"""The training loop: gradient accumulation, clipping, constant lr, paged AdamW, eval, atomic checkpoint/resume.

One optimizer step over an effective batch of K = grad_accum micro-batches, N response tokens in all:

    loss = (1/N) * sum_k sum_{t in response_k} -log p(x_t | x_<t)        (token-weighted mean over the whole step)
    g    = clip(grad loss, max_grad_norm)      g *= min(1, max_norm / (||g||_2 + 1e-6))    (ADAMW-10)
    p    = PagedAdamW(p, g)                    lr constant (Guanaco: 2e-4)                  (ADAMW-1 .. ADAMW-9)

Resume is bit-for-bit on the CPU: a checkpoint holds the LoRA weights, the optimizer's state dict, every RNG state
(torch CPU/CUDA — the LoRA dropout seeds are drawn from it — Python, NumPy), the data order position
(epoch, batch index; the order of an epoch depends only on the seed) and the step.  A checkpoint directory is
written beside the live one and swapped in with renames, so a crash leaves the previous checkpoint intact.

Exact match (the generated task): greedy decoding reproduces the answer and then stops iff the argmax of the
logits equals the next reference token at every response position (answer tokens and the end token), so one
teacher-forced forward pass scores a batch — no token-by-token generation needed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import RunConfig
from .data import IGNORE_INDEX, BatchStream, DataError, Example, TokenizedExample, collate

CHECKPOINT = "checkpoint"
_CKPT_TMP = ".checkpoint-tmp"
_CKPT_OLD = ".checkpoint-old"


# --- small helpers ---------------------------------------------------------------------------------------------


def model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def trainable_named_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def memory_gb(device: torch.device) -> float:
    """Peak memory in GB: torch's allocator on CUDA, the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is KiB on Linux


def response_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of -log p over response tokens, logits) for one micro-batch; labels -100 are ignored."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits  # (B, T, V)
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
    shift_labels = batch["labels"][:, 1:]  # (B, T-1)
    loss_sum = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss_sum, logits


def n_response_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def pad_id_of(tokenizer) -> int:
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise DataError("the tokenizer has neither a pad nor an eos token")
    return pid


@torch.no_grad()
def eval_loss(model, data: list[TokenizedExample], *, batch_size: int, pad_id: int, max_batches: int = 0) -> float:
    """Mean response-token cross-entropy over (the first max_batches micro-batches of) data, in nats."""
    if not data:
        raise DataError("empty eval set")
    was_training = model.training
    model.eval()
    device = model_device(model)
    total, count = 0.0, 0
    batches = [data[k : k + batch_size] for k in range(0, len(data), batch_size)]
    if max_batches:
        batches = batches[:max_batches]
    for b in batches:
        batch = to_device(collate(b, pad_id), device)
        loss_sum, _ = response_loss_sum(model, batch)
        total += float(loss_sum)
        count += n_response_tokens(batch)
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def exact_match(model, tokenizer, examples: list[Example], *, batch_size: int = 16) -> tuple[float, list[bool]]:
    """Fraction of examples whose greedy continuation is exactly the completion followed by the end token.

    Teacher-forced: correct iff argmax(logits[t]) == input_ids[t+1] at every response position (module docstring).
    """
    from .data import tokenize_example

    was_training = model.training
    model.eval()
    device = model_device(model)
    pad_id = pad_id_of(tokenizer)
    tok = [
        tokenize_example(Example(e.prompt, e.answer if e.answer is not None else e.completion), tokenizer)
        for e in examples
    ]
    correct: list[bool] = []
    for k in range(0, len(tok), batch_size):
        batch = to_device(collate(tok[k : k + batch_size], pad_id), device)
        _, logits = response_loss_sum(model, batch)
        pred = logits[:, :-1, :].argmax(-1)  # (B, T-1)
        target = batch["labels"][:, 1:]  # (B, T-1)
        mask = target != IGNORE_INDEX
        ok = ((pred == target) | ~mask).all(dim=1)  # (B,)
        correct += [bool(v) for v in ok]
    model.train(was_training)
    return sum(correct) / len(correct), correct


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 64) -> list[str]:
    """Greedy continuations (left-padded batch, KV cache), decoded without special tokens."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    pad_id = pad_id_of(tokenizer)
    ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    T = max(len(i) for i in ids)
    input_ids = torch.tensor([[pad_id] * (T - len(i)) + list(i) for i in ids], device=device)  # (B, T)
    attention_mask = torch.tensor([[0] * (T - len(i)) + [1] * len(i) for i in ids], device=device)  # (B, T)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )
    model.train(was_training)
    return [tokenizer.decode(o[T:], skip_special_tokens=True) for o in out]


# --- checkpoints -----------------------------------------------------------------------------------------------


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def rng_preserved():
    """Run a block (an eval) without moving the torch, Python or NumPy RNGs."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
    ):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.train_set, self.eval_set = train_set, eval_set or []
        self.run_dir = run_dir
        self.pad_id = pad_id_of(tokenizer)
        self.device = model_device(model)
        self.params = trainable_named_parameters(model)
        if not self.params:
            raise ValueError("the model has no trainable parameters; call prepare_model(...) first")
        t = cfg.train
        self.optimizer = optimizer or make_optimizer(list(self.params.values()), cfg)
        self.stream = BatchStream(train_set, t.batch_size, seed=t.seed, group_by_length=cfg.data.group_by_length)
        self.step = 0
        self.history: list[dict] = []  # {"step", "loss", ...} and {"step", "eval_loss"}
        os.makedirs(run_dir, exist_ok=True)

    # -- one step --

    def train_step(self) -> StepResult:
        t0 = time.perf_counter()
        cfg = self.cfg.train
        self.model.train()
        micro = [collate(self.stream.next_batch(), self.pad_id) for _ in range(cfg.grad_accum)]
        n_tok = sum(n_response_tokens(b) for b in micro)
        tokens = sum(int(b["attention_mask"].sum()) for b in micro)
        total = 0.0
        for b in micro:
            loss_sum, _ = response_loss_sum(self.model, to_device(b, self.device))
            (loss_sum / n_tok).backward()
            total += float(loss_sum.detach())
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
            return eval_loss(
                self.model, self.eval_set, batch_size=b.batch_size, pad_id=self.pad_id, max_batches=b.eval_batches
            )

    # -- the loop --

    def fit(self, *, on_step=None) -> list[dict]:
        """Train to cfg.train.max_steps (from self.step), logging, evaluating and checkpointing as configured."""
        cfg = self.cfg.train
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, desc="finetune", unit="step", dynamic_ncols=True)
        metrics_path = os.path.join(self.run_dir, "metrics.jsonl")
        try:
            while self.step < cfg.max_steps:
                r = self.train_step()
                rec = {
                    "step": r.step,
                    "loss": r.loss,
                    "grad_norm": r.grad_norm,
                    "lr": cfg.lr,
                    "tokens": r.tokens,
                    "tokens_per_s": r.tokens / r.seconds,
                    "mem_gb": memory_gb(self.device),
                }
                self.history.append(rec)
                if cfg.log_every and r.step % cfg.log_every == 0:
                    _append_jsonl(metrics_path, rec)
                if self.eval_set and cfg.eval_every and r.step % cfg.eval_every == 0 and r.step < cfg.max_steps:
                    self._log_eval(metrics_path)
                if cfg.save_every and r.step % cfg.save_every == 0 and r.step < cfg.max_steps:
                    self.save_checkpoint()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{r.loss:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}", mem=f"{rec['mem_gb']:.2f}GB"
                    )
                if on_step is not None:
                    on_step(self, rec)
        finally:
            if bar is not None:
                bar.close()
        if self.eval_set and (not self.history or "eval_loss" not in self.history[-1]):
            self._log_eval(metrics_path)
        self.save_checkpoint()
        return self.history

    def _log_eval(self, metrics_path: str) -> None:
        rec = {"step": self.step, "eval_loss": self.evaluate()}
        self.history.append(rec)
        _append_jsonl(metrics_path, rec)

    # -- checkpoint / resume --

    def save_checkpoint(self) -> str:
        """Write run_dir/checkpoint atomically: build .checkpoint-tmp, then swap it in with renames."""
        from safetensors.torch import save_file

        final = os.path.join(self.run_dir, CHECKPOINT)
        tmp = os.path.join(self.run_dir, _CKPT_TMP)
        old = os.path.join(self.run_dir, _CKPT_OLD)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_file(
            {n: p.detach().cpu().contiguous() for n, p in self.params.items()}, os.path.join(tmp, "adapter.safetensors")
        )
        torch.save(self.optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(rng_state(), os.path.join(tmp, "rng.pt"))
        state = {
            "step": self.step,
            "stream": self.stream.state_dict(),
            "history": self.history,
            "config": self.cfg.to_dict(),
            "param_names": list(self.params),
        }
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(state, f, indent=1)
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(self.run_dir)
        shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, path: str | None = None) -> None:
        """Restore weights, optimizer, RNGs, data position and step from run_dir/checkpoint (or ``path``)."""
        from safetensors.torch import load_file

        path = path or find_checkpoint(self.run_dir)
        if path is None:
            raise ValueError(f"no checkpoint in {self.run_dir!r} to resume from")
        with open(os.path.join(path, "trainer_state.json")) as f:
            state = json.load(f)
        if state["param_names"] != list(self.params):
            raise ValueError(
                f"checkpoint {path!r} holds {len(state['param_names'])} LoRA tensors that do not match this model's "
                f"{len(self.params)}; resume with the same model, --r and --target"
            )
        weights = load_file(os.path.join(path, "adapter.safetensors"))
        with torch.no_grad():
            for n, p in self.params.items():
                if tuple(weights[n].shape) != tuple(p.shape):
                    raise ValueError(
                        f"checkpoint tensor {n} has shape {tuple(weights[n].shape)}, model {tuple(p.shape)}"
                    )
                p.copy_(weights[n])
        self.optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=True))
        self.stream.load_state_dict(state["stream"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "w") as f:  # drop lines logged after the checkpoint
            f.writelines(json.dumps(h) + "\n" for h in self.history)
        set_rng_state(torch.load(os.path.join(path, "rng.pt"), weights_only=False))


def find_checkpoint(run_dir: str) -> str | None:
    """run_dir/checkpoint, or the previous one if a crash happened between the two renames of a save."""
    for name in (CHECKPOINT, _CKPT_OLD):
        p = os.path.join(run_dir, name)
        if os.path.isfile(os.path.join(p, "trainer_state.json")):
            return p
    return None


def make_optimizer(params: list[torch.nn.Parameter], cfg: RunConfig):
    """The paper's paged AdamW (backends.torchlib.PagedAdamW; host-memory states on the CPU)."""
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
    )


def _append_jsonl(path: str, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def plot_loss_curve(history: list[dict], path: str, *, title: str = "QLoRA finetune") -> None:
    """Train loss per step (and eval loss where measured) as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    ev = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss (response tokens)", lw=1.5)
    if ev:
        ax.plot(*zip(*ev, strict=True), "o-", label="eval loss", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
