"""Held-out evaluation: response-token loss, exact match on the generated task, greedy generation.

    loss        = (1/N) sum over the N response tokens of -log p(x_t | x_<t)      (nats/token; labels -100 ignored)
    exact match = greedy decoding reproduces the answer and then stops, which holds iff the argmax of the logits
                  equals the next reference token at every response position (answer tokens and the end token),
                  so one teacher-forced forward pass scores a batch — no token-by-token generation needed.

Every function here leaves the model in the train/eval mode it found it in; with ``progress=True`` each shows a tqdm
bar on stderr (batches scored, or tokens generated).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .batching import collate
from .data import IGNORE_INDEX, DataError, Example, TokenizedExample, tokenize_example


def progress_bar(total: int, progress: bool, desc: str, unit: str = "batch"):
    """A tqdm bar on stderr (a no-op one when ``progress`` is False); it disappears once complete."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not progress, leave=False, dynamic_ncols=True)


def model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def pad_id_of(tokenizer) -> int:
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise DataError("the tokenizer has neither a pad nor an eos token")
    return pid


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# Decoders whose logits are exactly lm_head(final hidden state): no soft-capping, no logit scale.  For these the
# head runs on the response positions only (their logits are all the loss reads); any other model computes them all.
HEAD_ON_HIDDEN = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "smollm3"})


def body_and_head(model):
    """(decoder, lm_head) when ``model``'s logits are ``lm_head(decoder(...).last_hidden_state)``, else None."""
    if getattr(getattr(model, "config", None), "model_type", None) not in HEAD_ON_HIDDEN:
        return None
    body, head = model.get_decoder(), model.get_output_embeddings()
    return None if body is None or head is None or body is model else (body, head)


def response_rows(model, batch: dict[str, torch.Tensor]):
    """(x, project, targets, rows): ``project(x)`` are the logits at the N response positions of a micro-batch.

    Position t of row b is a response position iff labels[b, t+1] != -100: its logits predict token t+1.  For a
    HEAD_ON_HIDDEN decoder x is the final hidden state at those positions (N, H) and ``project`` the LM head, so the
    head (V x H, ~20% of a small model's FLOPs) never runs on the whole (B, T, V) tensor; otherwise x is every
    position's logits, already selected (N, V), and ``project`` the identity.
    """
    targets = batch["labels"][:, 1:]  # (B, T-1)
    keep = targets != IGNORE_INDEX
    rows = keep.nonzero()[:, 0]
    split = body_and_head(model)
    if split is None:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return out.logits[:, :-1][keep], torch.nn.Identity(), targets[keep], rows
    body, head = split
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return hidden.last_hidden_state[:, :-1][keep], head, targets[keep], rows


def response_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits (N, V) float32, targets (N,), rows (N,)) at the N response positions of a micro-batch."""
    x, project, targets, rows = response_rows(model, batch)
    return project(x).float(), targets, rows


# Chunked cross-entropy: at most this many float32 logits exist at once (1 GiB); a chunk's logits are recomputed
# in backward from its hidden rows instead of being kept, so memory stays O(chunk x V), not O(N x V).
CE_CHUNK_ELEMENTS = 1 << 28


def _chunk_loss_sum(project, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(project(x).float(), targets, reduction="sum")


def response_loss_sum(
    model, batch: dict[str, torch.Tensor], *, chunk_elements: int = CE_CHUNK_ELEMENTS
) -> torch.Tensor:
    """The sum of -log p over the response tokens of one micro-batch (labels -100 are ignored).

        L = sum_c sum_{i in chunk c} -log softmax(project(x_i))[t_i]      chunks of max(1, chunk_elements // V) rows

    One chunk (the common case: N V <= 2^28) is a plain cross-entropy; more are summed in order, each chunk under
    activation checkpointing, so its (rows, V) logits live only while that chunk's loss (and, in backward, its
    gradient) is computed.  The value is the one-chunk value up to float32 summation order."""
    from torch.utils.checkpoint import checkpoint

    x, project, targets, _ = response_rows(model, batch)
    vocab = getattr(project, "out_features", None) or x.shape[-1]
    per = max(1, chunk_elements // vocab)
    if len(x) <= per:
        return _chunk_loss_sum(project, x, targets)
    parts = [
        checkpoint(_chunk_loss_sum, project, x[i : i + per], targets[i : i + per], use_reentrant=False)
        for i in range(0, len(x), per)
    ]
    return torch.stack(parts).sum()


class ResponseLoss(torch.nn.Module):
    """The training loss as a module: forward(input_ids, attention_mask, labels) = response_loss_sum(model, batch).

    DistributedDataParallel all-reduces gradients only for a forward called through it, and response_loss_sum calls
    the decoder body and the head itself (not ``model.forward``), so the trainer hands DDP this module
    (``wrap_ddp(ResponseLoss(model))``) and in one process calls it bare: the same function, the same bits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @property
    def qlora_config(self):  # what wrap_ddp's base_fingerprint reads (DIST-1)
        return getattr(self.model, "qlora_config", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        return response_loss_sum(self.model, batch)


def n_response_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@torch.no_grad()
def score_pass(
    model,
    data: list[TokenizedExample],
    *,
    batch_size: int,
    pad_id: int,
    max_batches: int = 0,
    progress: bool = False,
    desc: str = "eval loss",
    per_example: bool = False,
    chunk_elements: int = CE_CHUNK_ELEMENTS,
) -> tuple[float, list[bool]]:
    """One teacher-forced pass over (the first max_batches micro-batches of) data: (mean response-token cross-entropy
    in nats, exact match per example).  Both read the same logits, so a held-out set scored both ways costs one pass;
    the head runs chunk by chunk (as response_loss_sum), so at most ``chunk_elements`` logits exist at once.  The bar
    counts batches, or examples with ``per_example``."""
    if not data:
        raise DataError("empty eval set")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    device = model_device(model)
    total, count, correct = 0.0, 0, []
    batches = [data[k : k + batch_size] for k in range(0, len(data), batch_size)]
    if max_batches:
        batches = batches[:max_batches]
    total_units = sum(map(len, batches)) if per_example else len(batches)
    with progress_bar(total_units, progress, desc, unit="example" if per_example else "batch") as bar:
        for b in batches:
            batch = to_device(collate(b, pad_id), device)
            x, project, targets, rows = response_rows(model, batch)
            wrong = torch.zeros(len(b), dtype=torch.int64, device=targets.device)  # (B,) wrong tokens per example
            per = max(1, chunk_elements // (getattr(project, "out_features", None) or x.shape[-1]))
            for i in range(0, len(x), per):
                logits = project(x[i : i + per]).float()
                total += float(F.cross_entropy(logits, targets[i : i + per], reduction="sum"))
                wrong.index_add_(0, rows[i : i + per], (logits.argmax(-1) != targets[i : i + per]).to(torch.int64))
            count += len(targets)
            correct += [bool(v) for v in wrong == 0]
            bar.update(len(b) if per_example else 1)
            if not per_example:
                bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
    model.train(was_training)
    return total / max(count, 1), correct


def eval_loss(
    model, data: list[TokenizedExample], *, batch_size: int, pad_id: int, max_batches: int = 0, progress: bool = False
) -> float:
    """Mean response-token cross-entropy over (the first max_batches micro-batches of) data, in nats."""
    return score_pass(model, data, batch_size=batch_size, pad_id=pad_id, max_batches=max_batches, progress=progress)[0]


def tokenize_scored(tokenizer, examples: list[Example]) -> list[TokenizedExample]:
    """The examples exact match scores: prompt + the reference answer (or the completion) + the end token."""
    return [
        tokenize_example(Example(e.prompt, e.answer if e.answer is not None else e.completion), tokenizer)
        for e in examples
    ]


def exact_match(
    model, tokenizer, examples: list[Example], *, batch_size: int = 16, progress: bool = False
) -> tuple[float, list[bool]]:
    """Fraction of examples whose greedy continuation is exactly the completion followed by the end token.

    Teacher-forced: correct iff argmax(logits[t]) == input_ids[t+1] at every response position (module docstring).
    """
    tok = tokenize_scored(tokenizer, examples)
    _, correct = score_pass(model, tok, batch_size=batch_size, pad_id=pad_id_of(tokenizer), progress=progress,
                            desc="exact match", per_example=True)  # fmt: skip
    return sum(correct) / len(correct), correct


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 64, progress: bool = False) -> list[str]:
    """Greedy continuations (left-padded batch, KV cache), decoded without special tokens; the bar counts tokens."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class TokenCounter(StoppingCriteria):  # called once per generated token; never stops the generation itself
        def __call__(self, input_ids, scores, **kwargs):
            bar.update(1)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    was_training = model.training
    model.eval()
    device = model_device(model)
    pad_id = pad_id_of(tokenizer)
    ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    T = max(len(i) for i in ids)
    input_ids = torch.tensor([[pad_id] * (T - len(i)) + list(i) for i in ids], device=device)  # (B, T)
    attention_mask = torch.tensor([[0] * (T - len(i)) + [1] * len(i) for i in ids], device=device)  # (B, T)
    with progress_bar(max_new_tokens, progress, "generate", unit="token") as bar:
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
            stopping_criteria=StoppingCriteriaList([TokenCounter()]),
        )
    model.train(was_training)
    return [tokenizer.decode(o[T:], skip_special_tokens=True) for o in out]


def loss_curve_points(history: list[dict], eval_loss_before: float | None = None) -> tuple[list, list]:
    """(train, eval) as (step, loss) pairs; the eval series starts with the base model's loss at step 0."""
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    ev = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if eval_loss_before is not None and not any(step == 0 for step, _ in ev):
        ev.insert(0, (0, eval_loss_before))
    return train, ev


def plot_loss_curve(
    history: list[dict], path: str, *, title: str = "QLoRA finetune", eval_loss_before: float | None = None
) -> None:
    """Train loss per step and eval loss where measured, from the "before" point at step 0, as a PNG (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, ev = loss_curve_points(history, eval_loss_before)
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
