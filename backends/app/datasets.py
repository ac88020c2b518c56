"""The data a finetune runs on: the generated task or a data file (with its eval file or an eval split), read and
tokenized under the length policy, with the counts of what the policy cut or dropped."""

from __future__ import annotations

from dataclasses import dataclass

from .config import RunConfig
from .data import DataError, Example, TokenizedExample


@dataclass
class Datasets:
    """What a finetune trains on (``train``), scores the eval loss on (``eval``) and, for the generated task, scores
    exact match on (``scored``: the held-out examples before tokenization; None for a data file)."""

    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    scored: list[Example] | None = None
    length_notes: tuple[str, ...] = ()  # how many examples the length policy cut or dropped, per file

    @classmethod
    def from_config(cls, cfg: RunConfig, tokenizer) -> Datasets:
        """The generated task (``--data task``) or a data file with its eval file or an eval split, tokenized."""
        from .data import LengthCounts, LengthPolicy, check_data_file, read_examples, split_eval, tokenize_examples
        from .task import make_task

        d = cfg.data
        policy = LengthPolicy(d.source_max_len, d.target_max_len, d.drop_long)
        tk = dict(max_len=d.max_len, model_max=None, train_on_source=d.train_on_source, policy=policy,
                  assistant_turns=d.assistant_turns)  # fmt: skip
        scored = None
        if d.data == "task":
            train_ex, eval_ex = make_task(tokenizer, n_train=d.task_train, n_eval=d.task_eval, seed=cfg.train.seed)
            scored = eval_ex
        else:
            check_data_file(d.data)
            train_ex = read_examples(d.data, d.format)
            if d.max_examples:
                train_ex = train_ex[: d.max_examples]
            if d.eval_data:
                eval_ex = read_examples(d.eval_data, d.format)
            else:
                train_ex, eval_ex = split_eval(train_ex, d.eval_fraction, cfg.train.seed)
        n_train, n_eval = LengthCounts(), LengthCounts()
        train = tokenize_examples(train_ex, tokenizer, source=d.data, counts=n_train, **tk)
        ev = tokenize_examples(eval_ex, tokenizer, source=d.eval_data or d.data, counts=n_eval, **tk) if eval_ex else []
        notes = tuple(
            n.line(f"{name} ({d.eval_data or d.data})" if name == "eval" else f"train ({d.data})", policy, d.max_len)
            for name, n in (("train", n_train), ("eval", n_eval))
            if n.cut or n.dropped
        )
        return cls(train, ev, scored, notes)

    def check_fits(self, model_max: int | None) -> None:
        """Every example within the model's positions (known only once the model is loaded)."""
        too_long = [i for i, t in enumerate(self.train + self.eval) if model_max is not None and len(t) > model_max]
        if too_long:
            raise DataError(
                f"example {too_long[0]} is longer than the model's {model_max} positions; shorten it or drop it"
            )
