"""Named finetune recipes: ``qlora finetune --recipe NAME`` takes a recipe's values as its defaults.

A recipe is a preset like the embedded task's ``TASK_PRESET`` (config.py): a dict of config field names to values that
becomes the flags' defaults, so a flag given on the command line still wins.  The one recipe is the paper's Guanaco
run (Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", Appendix B.2 and Table 9, "Training
hyperparameters for QLoRA finetuning on different datasets and across model sizes"; ``qlora.py`` and
``scripts/finetune_guanaco_*.sh`` of github.com/artidoro/qlora):

    field              guanaco        from
    r / alpha          64 / 16        B.2: r 64, alpha 16, LoRA on every linear layer
    dropout            0.1 | 0.05     B.2 / Table 9: 0.1 for models up to 13B, 0.05 for 33B and 65B (by the model's
                                      parameter count, ``guanaco_dropout``)
    lr                 2e-4           Table 9 (7B, 13B; the 33B/65B rows use 1e-4: pass --lr 1e-4), constant schedule
    max_grad_norm      0.3            B.2
    effective batch    16             Table 9: batch size 16 (here 4 micro-batches x 4 accumulated)
    group_by_length    on             B.2: group by length, to save padding
    source / target    384 / 128      Table 9 (the "All" rows): source and target length in tokens
    max_steps          1875           Table 9, OASST1 rows
    data               OASST text     "### Human: ... ### Assistant: ..."; the loss on the assistant turns only
                                      (``assistant_turns``: the earlier turns of a conversation too), not the human's
    optimizer          paged AdamW, 32-bit states, weight decay 0 (the defaults of TrainConfig)

Every value lands in the run's config.json and the printed config; ``config.json["resolved"]["recipe"]`` names
the recipe, the values it set, and the fields a flag changed.
"""

from __future__ import annotations

from .config import UsageError

DROPOUT_BY_SIZE = None  # a recipe's dropout of None: chosen from the model's parameter count (guanaco_dropout)

GUANACO = dict(
    r=64,
    alpha=16.0,
    dropout=DROPOUT_BY_SIZE,
    target="all-linear",
    lr=2e-4,
    max_grad_norm=0.3,
    batch_size=4,
    grad_accum=4,
    max_steps=1875,
    weight_decay=0.0,
    optim_bits=32,
    group_by_length=True,
    source_max_len=384,
    target_max_len=128,
    max_len=512,  # source + target: nothing the two limits keep is cut again
    format="oasst",
    train_on_source=False,
    assistant_turns=True,
)

RECIPES: dict[str, dict] = {"guanaco": GUANACO}

# "Up to 13B": LLaMA-13B has 13.02e9 parameters and the next size the paper trains, 33B, has 32.5e9; a model is
# "up to 13B" when its count rounds to at most 13 billion.
SMALL_MODEL_MAX_PARAMS = 13.5e9


def recipe_defaults(name: str) -> dict:
    """The recipe's values (a copy); an unknown name is a UsageError naming the known ones."""
    if name not in RECIPES:
        raise UsageError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(RECIPES))}")
    return dict(RECIPES[name])


def guanaco_dropout(n_params: int) -> float:
    """LoRA dropout 0.1 for a model up to 13B parameters, 0.05 above (Table 9)."""
    return 0.1 if n_params <= SMALL_MODEL_MAX_PARAMS else 0.05


def count_parameters(model_path: str) -> int:
    """The model's parameter count (tied weights once), from its config alone: the model built on the meta device,
    so no weight is read or allocated."""
    import contextlib
    import io

    import torch
    import transformers

    directory = model_path
    if str(model_path).endswith(".gguf"):
        from backends.torchlib.load import gguf_as_hf_dir

        with contextlib.redirect_stderr(io.StringIO()):  # transformers' GGUF reader draws a bar on stderr
            directory = str(gguf_as_hf_dir(model_path))
    config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def check_recipe(cfg) -> None:
    """What a recipe needs of the command line (before anything slow): the Guanaco recipe trains on a data file."""
    if cfg.train.recipe == "guanaco" and cfg.data.data == "task":
        raise UsageError("--recipe guanaco trains on OASST text; pass --data FILE (e.g. an OASST1 .jsonl)")


def resolve_recipe(cfg, model_path: str) -> dict:
    """Settle the recipe's size-dependent values in ``cfg`` (the dropout); returns config.json's record of the recipe:
    its name, the values it set, the fields a flag changed, and how the dropout was chosen."""
    if not cfg.train.recipe:
        if cfg.model.dropout is None:
            raise UsageError("--dropout must be a number without a recipe")
        return {}
    values = recipe_defaults(cfg.train.recipe)
    record: dict = {"name": cfg.train.recipe}
    by_size = cfg.model.dropout is DROPOUT_BY_SIZE
    if by_size:
        n = count_parameters(model_path)
        cfg.model.dropout = guanaco_dropout(n)
        record["dropout_rule"] = f"{cfg.model.dropout} for {n / 1e9:.3g}B parameters (0.1 up to 13B, 0.05 above)"
    flat = {**vars(cfg.model), **vars(cfg.data), **vars(cfg.train)}
    record["values"] = {k: "0.1 up to 13B, 0.05 above" if v is DROPOUT_BY_SIZE else v for k, v in values.items()}
    record["overridden"] = {
        k: flat[k] for k, v in values.items() if (not by_size if v is DROPOUT_BY_SIZE else flat[k] != v)
    }
    return record
