"""The shape of a LLaMA-style decoder, the dimensions that set every term of the memory ledger (memory.py): its
linears, parameter counts, the LLaMA-1 presets, and the shape a Hugging Face config dict describes."""

from __future__ import annotations

from dataclasses import dataclass


def _check_positive_int(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


@dataclass(frozen=True)
class ModelShape:
    """A LLaMA-style decoder: the dimensions that set every memory term."""

    name: str
    hidden: int  # d_model
    intermediate: int  # SwiGLU width (gate/up out, down in)
    layers: int  # decoder blocks
    heads: int  # query heads
    kv_heads: int  # key/value heads (== heads without grouped-query attention)
    vocab: int  # embedding rows
    tie_embeddings: bool = False  # lm_head shares embed_tokens' matrix

    def __post_init__(self) -> None:
        _check_positive_int(
            hidden=self.hidden, intermediate=self.intermediate, layers=self.layers, heads=self.heads,
            kv_heads=self.kv_heads, vocab=self.vocab,
        )  # fmt: skip
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"{self.name}: heads must divide hidden and kv_heads divide heads, got {self}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, in_features, out_features) of one block's seven linears, all quantized and LoRA-adapted."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        return [
            ("q_proj", h, h), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", h, h),
            ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h),
        ]  # fmt: skip

    @property
    def n_linear(self) -> int:
        return self.layers * sum(fin * fout for _, fin, fout in self.linears())

    @property
    def n_embedding(self) -> int:
        return self.vocab * self.hidden * (1 if self.tie_embeddings else 2)

    @property
    def n_norm(self) -> int:
        return (2 * self.layers + 1) * self.hidden  # two RMSNorms per block and the final one

    @property
    def n_params(self) -> int:
        return self.n_linear + self.n_embedding + self.n_norm

    def n_lora(self, r: int) -> int:
        """r * (in + out) summed over every adapted linear (MEM-4)."""
        return self.layers * sum(r * (fin + fout) for _, fin, fout in self.linears())


# LLaMA-1 (Touvron et al., 2023, Table 2), vocabulary 32000, untied embeddings.
llama_7b = ModelShape("llama-7b", hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000)
llama_13b = ModelShape("llama-13b", hidden=5120, intermediate=13824, layers=40, heads=40, kv_heads=40, vocab=32000)
llama_33b = ModelShape("llama-33b", hidden=6656, intermediate=17920, layers=60, heads=52, kv_heads=52, vocab=32000)
llama_65b = ModelShape("llama-65b", hidden=8192, intermediate=22016, layers=80, heads=64, kv_heads=64, vocab=32000)
PRESETS = {s.name: s for s in (llama_7b, llama_13b, llama_33b, llama_65b)}


def shape_from_dict(d: dict) -> ModelShape:
    """ModelShape from a Hugging Face LLaMA config dict (config.json / `config.to_dict()`)."""
    try:
        return ModelShape(
            name=d.get("_name_or_path") or d.get("model_type", "model"),
            hidden=d["hidden_size"], intermediate=d["intermediate_size"], layers=d["num_hidden_layers"],
            heads=d["num_attention_heads"], kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            vocab=d["vocab_size"], tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        )  # fmt: skip
    except KeyError as e:
        raise ValueError(
            f"config dict lacks {e.args[0]!r}; need hidden_size, intermediate_size, ... (LLaMA-style)"
        ) from e
