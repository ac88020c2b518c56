"""The embedded default task: reverse a list of digits, scored by exact match.

    question:  "Reverse the list: 2 9 1 4 1 7"
    answer:    "7 1 4 1 9 2"

Why this task: it is generated here (no download, any size, deterministic from a seed), its answer is checkable by
string equality, and it isolates what a short fine-tune can teach.  Out of the box SmolLM2-135M-Instruct answers with
prose about reversing lists (0 of 64 held-out lists exactly right); the embedded default run (25 steps x 16 examples,
CPU, numpy backend) gets 53 of 64 right (measured: 0.0% -> 82.8%, eval loss 1.51 -> 0.053).  Digits are single
tokens in SmolLM2's tokenizer, so the task is a pure sequence manipulation, not a tokenization puzzle.

Held-out split: the eval lists are drawn first from their own stream; training lists that collide with an eval list
are redrawn, so no eval question is ever seen in training.  Everything depends only on ``seed``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .data import Example

INSTRUCTION = "Reverse the list:"
SYSTEM = "Answer with the result only."  # short: SmolLM2's default system prompt would double the prompt length


@dataclass(frozen=True)
class ReverseTask:
    min_items: int = 5  # shortest list
    max_items: int = 8  # longest list
    digits: str = "0123456789"  # the items (single tokens in SmolLM2's tokenizer)

    def draw(self, rng: random.Random) -> tuple[str, str]:
        """One (question, answer) pair."""
        n = rng.randint(self.min_items, self.max_items)
        items = [rng.choice(self.digits) for _ in range(n)]
        return f"{INSTRUCTION} {' '.join(items)}", " ".join(reversed(items))


def format_prompt(tokenizer, question: str) -> str:
    """The model's own chat format when it has one (SmolLM2-Instruct does), else the Guanaco format."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"### Human: {question} ### Assistant: "


def make_task(
    tokenizer, *, n_train: int, n_eval: int, seed: int = 0, task: ReverseTask | None = None
) -> tuple[list[Example], list[Example]]:
    """(train, eval) examples; prompts in the tokenizer's chat format, completion = answer, disjoint questions."""
    if n_train < 1 or n_eval < 1:
        raise ValueError(f"n_train and n_eval must be >= 1, got {n_train} and {n_eval}")
    task = task or ReverseTask()
    rng_eval = random.Random(f"reverse-eval-{seed}")
    rng_train = random.Random(f"reverse-train-{seed}")
    eval_qa: dict[str, str] = {}
    while len(eval_qa) < n_eval:
        q, a = task.draw(rng_eval)
        eval_qa.setdefault(q, a)
    train_qa = []
    while len(train_qa) < n_train:
        q, a = task.draw(rng_train)
        if q not in eval_qa:
            train_qa.append((q, a))

    def ex(q: str, a: str) -> Example:
        return Example(prompt=format_prompt(tokenizer, q), completion=a, answer=a)

    return [ex(q, a) for q, a in train_qa], [ex(q, a) for q, a in eval_qa.items()]


def normalize(text: str) -> str:
    """The scored part of a generation: its first non-empty line, surrounding whitespace stripped."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def is_correct(generated: str, answer: str) -> bool:
    return normalize(generated) == answer.strip()
