"""Greedy decoding with a static KV cache, the one-token decode step captured once as a CUDA graph and replayed.

    out = greedy_decode(model, input_ids, attention_mask, max_new_tokens=64, eos_token_id=2, pad_token_id=2)
    out.tokens        # (B, n) the new tokens, n <= max_new_tokens; after a row's end token: pad_token_id
    out.captured      # the decode steps after the warm-up were graph replays (out.replays of them)

The decode, for a left-padded batch x (B, T) with mask m (B, T) (0 = pad, 1 = token), N = max_new_tokens, L = T + N:

    cache      a transformers StaticCache of L columns: per layer K, V (B, h_kv, L, d), filled in place
    positions  p[b, t] = cumsum(m[b])_t - 1, a pad column 1            (what generate gives a left-padded row)
    prefill    logits = model(x, m, p, cache)                          eager; K/V columns 0 .. T-1 written
               y_1 = argmax float32(logits[:, -1])                     greedy; torch.argmax: ties to the lowest id
    step k     logits = model(ids, mask, pos, cache)                   k = 1 .. N-1; K/V column T+k-1 written
               y = argmax float32(logits[:, -1]);  y = y if unfinished else pad     (generate's rules)
               unfinished &= y not in eos;  ids <- y;  pos += 1;  cache_position += 1
    stop       after N tokens, or once every row has emitted an end token (one 1-byte read per step, only when an
               end token is given)

What is captured: step k whole — the forward (embedding, every decoder layer with its QLoRA dequantize launches and
the cache's in-place K/V write, the LM head), the argmax, the end-token bookkeeping and the in-place advance of its
own inputs (ids, pos, cache_position with ``add_``/``copy_``) — as one torch.cuda.CUDAGraph, captured once after
``warmup`` real steps run eagerly on a side stream (torch's recipe: cuBLAS handles, kernel caches and allocator pools
exist before the capture), then replayed once per token.  A replay leaves the next step's inputs in place, so the
host's work per token is one replay, one (B,) copy of y into the output and the end-token read.

Static shapes (the same at every step): ids (B, 1) and pos (B, 1) int64; cache_position (1,) int64 for transformers
versions whose forward takes it (newer ones keep the position in the cache layers and advance it in place in their
own update); the 2-D mask (B, L) = [m | 1 .. 1], constant for the whole decode (generate appends a 1 per generated
token, finished rows included, and the columns past the current position are removed by the causal part of the
model's own mask); K, V (B, h_kv, L, d) per layer; logits (B, 1, V).  Attention reads all L columns at every step,
the unwritten ones masked (exp(-inf) = 0): the cost of static shapes.

Why the outputs equal eager's: the graph is the eager step's own kernels, recorded in order with their arguments,
and everything they read sits at a fixed address holding what eager would hold there (the cache, ids, pos, the mask,
the weights and the shared dequantize scratch); nothing in the step reads the host (no ``.item()``, no host-drawn
seeds: the model runs in eval mode, so LoRA dropout is off).  So replay k computes eager step k bit for bit (the GPU
tests compare the tokens).  The eager static-cache loop itself is ``model.generate(do_sample=False)``: the same
forward on the same ids, positions and mask, with generate's end-token and padding rules; only the keys and values
come padded by masked columns.  Its tokens equal generate's in the CPU tests (float32); in bf16 the attention over
the longer, masked key rows may round differently from generate's exact-length cache, so a near-tie can break the
other way there.

Not captured (the same loop runs eagerly and one line on stderr says why): a model on the CPU, an input embedding in
host memory (HostEmbedding reads the ids back each step), or a capture the CUDA runtime refuses (its reason printed).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Decoded:
    tokens: torch.Tensor  # (B, n) int64 new tokens, n <= max_new_tokens; pad after a row's end token
    captured: bool  # the steps after the warm-up were replays of one captured graph
    replays: int  # graph replays (0 when not captured); replays + eager_steps + 1 (the prefill's) == n
    eager_steps: int  # decode steps run eagerly: the warm-up when captured, every step otherwise
    why_not_captured: str | None  # None when captured or when capture=False was asked for


# --- transformers' API, across versions -------------------------------------------------------------------------


def forward_names(model) -> dict:
    """The keyword names this transformers version's causal LM forward takes: the cache's (``cache`` in 5.x,
    ``past_key_values`` before), whether it takes ``cache_position``, and the logits-slicing argument, if any."""
    params = inspect.signature(model.forward).parameters
    cache = next((n for n in ("cache", "past_key_values") if n in params), None)
    if cache is None:
        raise TypeError(
            f"greedy_decode needs a Hugging Face causal LM whose forward takes a KV cache (cache= or past_key_values=);"
            f" {type(model).__name__}.forward takes {sorted(params)}"
        )
    keep = next((n for n in ("logits_to_keep", "num_logits_to_keep") if n in params), None)
    return {"cache": cache, "cache_position": "cache_position" in params, "keep": keep}


def cache_kwargs(names: dict, cache, cache_position: torch.Tensor) -> dict:
    """The forward's cache keywords for this version (``forward_names``): the cache, its column positions where the
    forward takes them, and the logits of the last position only."""
    kw = {names["cache"]: cache, "use_cache": True}
    if names["cache_position"]:
        kw["cache_position"] = cache_position
    if names["keep"]:
        kw[names["keep"]] = 1
    return kw


def static_cache(model, batch: int, max_len: int, device: torch.device, dtype: torch.dtype):
    """A transformers StaticCache of ``max_len`` columns for ``batch`` rows.  Only the constructor arguments this
    version names are passed (4.x allocates at construction from batch size, device and dtype; 5.x at the first
    update, from the keys it is given)."""
    from transformers import StaticCache

    params = inspect.signature(StaticCache.__init__).parameters
    kw = {"config": model.config, "max_cache_len": max_len}
    size = next((n for n in ("batch_size", "max_batch_size") if n in params), None)
    if size is not None:
        kw[size] = batch
    for name, value in (("device", device), ("dtype", dtype)):
        if name in params:
            kw[name] = value
    return StaticCache(**kw)


def decoder_device(model) -> torch.device:
    """Where the decoder computes: the LM head's device (an input table may live in host memory, HostEmbedding)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def decode_blockers(model, device: torch.device) -> list[str]:
    """Why this model's decode step cannot be captured (empty when it can)."""
    from .synthetic import HostEmbedding

    why = []
    if device.type != "cuda":
        why.append(f"the model is on {device} (CUDA graphs are a GPU feature; the decode runs eagerly)")
    if isinstance(model.get_input_embeddings(), HostEmbedding):
        why.append("the input embedding lives in host memory (HostEmbedding reads the ids back to the host)")
    return why


# --- validation -----------------------------------------------------------------------------------------------------


def _eos_list(eos_token_id) -> list[int]:
    if eos_token_id is None:
        return []
    ids = list(eos_token_id) if isinstance(eos_token_id, list | tuple) else [eos_token_id]
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(
            f"eos_token_id must be None, a token id >= 0 or a non-empty list of them; got {eos_token_id!r}"
        )
    return ids


def check_inputs(input_ids, attention_mask, max_new_tokens, vocab_size: int | None) -> torch.Tensor:
    """Refuse what the decode cannot take, naming what was received; returns the mask (all ones when None)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.int64:
        got = f"{tuple(input_ids.shape)} {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) else type(input_ids)
        raise ValueError(f"input_ids must be a 2-D int64 tensor (B, T), got {got}")
    B, T = input_ids.shape
    if B < 1 or T < 1:
        raise ValueError(f"input_ids must hold at least one row and one column, got shape {(B, T)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, T):
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise ValueError(f"attention_mask must have input_ids' shape {(B, T)}, got {got}")
    m = attention_mask.to("cpu", torch.int64)
    if not bool(((m == 0) | (m == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (pad) and 1 (token)")
    bad = ((m[:, 1:] < m[:, :-1]).any(-1) | (m[:, -1] == 0)).nonzero()
    if len(bad):
        row = int(bad[0, 0])
        raise ValueError(
            f"attention_mask must be left padded (0s, then at least one 1, in every row): row {row} is "
            f"{m[row].tolist()} (pad on the left, as the tokenizer does with padding_side='left')"
        )
    if vocab_size is not None:
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"input_ids must lie in [0, {vocab_size}) (the model's vocabulary), got [{lo}, {hi}]")
    return attention_mask


def _say(line: str) -> None:
    print(f"qlora: {line}", file=sys.stderr, flush=True)


# --- the decode -------------------------------------------------------------------------------------------------


class _StaticStep:
    """The decode's static buffers and the one-token step that advances them in place (module docstring)."""

    def __init__(self, model, names: dict, cache, mask, last_pos, T: int, eos: list[int], pad: int):
        device = mask.device
        B = mask.shape[0]
        self.model, self.names, self.cache, self.pad = model, names, cache, pad
        self.mask = mask  # (B, L) = [m | 1 .. 1]
        self.ids = torch.zeros((B, 1), dtype=torch.int64, device=device)  # (B, 1) the token fed next
        self.pos = (last_pos + 1).to(torch.int64).view(B, 1).clone()  # (B, 1) its position
        self.cache_position = torch.tensor([T], dtype=torch.int64, device=device)  # (1,) its cache column
        self.unfinished = torch.ones(B, dtype=torch.bool, device=device)  # (B,)
        self.eos = torch.tensor(eos, dtype=torch.int64, device=device) if eos else None  # (E,)

    def select(self, logits: torch.Tensor) -> None:
        """ids <- the greedy choice from the last position's logits, with generate's end-token rules."""
        y = torch.argmax(logits[:, -1].to(torch.float32), dim=-1)  # (B,)
        if self.eos is not None:
            y = torch.where(self.unfinished, y, self.pad)
            self.unfinished.logical_and_(~(y[:, None] == self.eos[None, :]).any(-1))
        self.ids.copy_(y[:, None])

    def __call__(self) -> None:
        kw = cache_kwargs(self.names, self.cache, self.cache_position)
        out = self.model(input_ids=self.ids, attention_mask=self.mask, position_ids=self.pos, **kw)
        self.select(out.logits)
        self.pos.add_(1)
        self.cache_position.add_(1)


def _capture(step: _StaticStep) -> tuple[torch.cuda.CUDAGraph | None, str | None]:
    """(graph, None), or (None, why) when the runtime refuses the capture; the capture itself runs nothing."""
    from .graph import CaptureError, capture

    graph = torch.cuda.CUDAGraph()
    try:
        capture(graph, step)  # puts the caller's stream back when the runtime refuses
    except CaptureError as exc:  # an op the capture refuses (a host read, an allocation it cannot make, ...)
        return None, str(exc)
    return graph, None


@torch.no_grad()
def greedy_decode(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    capture: bool = True,
    warmup: int = 2,
    on_token: Callable[[int], None] | None = None,
    say: Callable[[str], None] | None = None,
) -> Decoded:
    """Greedy continuations of a left-padded batch with a static KV cache (module docstring).

    input_ids (B, T) int64 and attention_mask (B, T) (None: no padding) on any device (moved to the decoder's);
    eos_token_id: one id or a list (None: always N tokens); pad_token_id: what a finished row emits (default: the
    first end token).  ``capture``: replay the decode step as a CUDA graph after ``warmup`` eager steps (on the CPU,
    or when the capture fails, the loop stays eager and ``say`` gets one line saying why; default: stderr).
    ``on_token(n)`` is called after each generated column (n = the columns so far).  The model runs in eval mode
    and is put back in the mode it was found in."""
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0 (eager steps before the capture), got {warmup!r}")
    names = forward_names(model)
    eos = _eos_list(eos_token_id)
    pad = eos[0] if pad_token_id is None and eos else (pad_token_id if pad_token_id is not None else 0)
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad_token_id must be a token id >= 0, got {pad_token_id!r}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    attention_mask = check_inputs(input_ids, attention_mask, max_new_tokens, vocab)
    device = decoder_device(model)
    x = input_ids.to(device)  # (B, T)
    m = attention_mask.to(device, torch.int64)  # (B, T)
    B, T = x.shape
    N, L = max_new_tokens, T + max_new_tokens
    why = decode_blockers(model, device) if capture else []

    was_training = model.training
    model.eval()
    try:
        emb = model.get_input_embeddings().weight
        cache = static_cache(model, B, L, device, emb.dtype)
        pos = (m.cumsum(-1) - 1).masked_fill(m == 0, 1)  # (B, T); a pad's position is masked out of every real row
        mask = torch.cat([m, torch.ones((B, N), dtype=m.dtype, device=device)], dim=-1)  # (B, L)
        step = _StaticStep(model, names, cache, mask, pos[:, -1], T, eos, pad)

        kw = cache_kwargs(names, cache, torch.arange(T, device=device))
        out = model(input_ids=x, attention_mask=m, position_ids=pos, **kw)  # the prefill, eager
        step.select(out.logits)
        del out

        tokens = torch.full((B, N), pad, dtype=torch.int64, device=device)  # (B, N)
        tokens[:, 0].copy_(step.ids[:, 0])
        n, replays, eager_steps, graph = 1, 0, 0, None
        if on_token is not None:
            on_token(n)

        def going() -> bool:
            return n < N and (step.eos is None or bool(step.unfinished.any()))

        def emit() -> None:
            nonlocal n
            tokens[:, n].copy_(step.ids[:, 0])
            n += 1
            if on_token is not None:
                on_token(n)

        if capture and not why and going():
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up: real steps, eagerly, on a side stream (torch's recipe)
                while eager_steps < warmup and going():
                    step()
                    eager_steps += 1
                    emit()
            torch.cuda.current_stream(device).wait_stream(side)
            if going():
                graph, failure = _capture(step)
                if failure:
                    why.append(failure)
        while going():
            if graph is not None:
                graph.replay()
                replays += 1
            else:
                step()
                eager_steps += 1
            emit()
    finally:
        model.train(was_training)
    if capture and why:
        (say or _say)(f"the decode runs eager, not as a CUDA graph: {'; '.join(why)}")
    captured = graph is not None
    if captured or not capture:
        reason = None
    else:  # refused (printed above), or every token came from the prefill and the warm-up: nothing to replay
        reason = "; ".join(why) or f"no step left to replay after the prefill and {eager_steps} warm-up steps"
    return Decoded(tokens[:, :n], captured, replays, eager_steps, reason)
