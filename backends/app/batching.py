"""Batching a tokenized data set: the order of each epoch (length-grouped or shuffled, from the seed alone), the
padded micro-batch tensors, and the endless stream of micro-batches whose position is a checkpoint's data state."""

from __future__ import annotations

import random

import torch

from .data import IGNORE_INDEX, DataError, TokenizedExample


def length_grouped_order(lengths: list[int], batch_size: int, rng: random.Random, mega: int = 50) -> list[list[int]]:
    """Group-by-length (as HF's LengthGroupedSampler): shuffle, cut into megabatches of mega*batch_size, sort each by
    length (longest first), cut into batches, then shuffle the batches.  Similar lengths share a batch, so little
    padding; the order stays random from step to step."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    batches = []
    step = mega * batch_size
    for s in range(0, len(idx), step):
        group = sorted(idx[s : s + step], key=lambda i: -lengths[i])
        batches += [group[k : k + batch_size] for k in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


def random_order(n: int, batch_size: int, rng: random.Random) -> list[list[int]]:
    idx = list(range(n))
    rng.shuffle(idx)
    return [idx[k : k + batch_size] for k in range(0, n, batch_size)]


def collate(batch: list[TokenizedExample], pad_id: int, pad_to: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example, rounded up to a multiple of ``pad_to`` (length buckets: a few static shapes
    for CUDA graphs / torch.compile): input_ids/attention_mask/labels, each (B, T) int64.  Padding is masked out of
    attention and carries label -100, and under the causal mask a right pad never reaches a real position, so the
    loss is the unpadded one (up to float32 blocking)."""
    if pad_to < 1:
        raise ValueError(f"pad_to must be >= 1, got {pad_to}")
    T = -(-max(len(t) for t in batch) // pad_to) * pad_to
    input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(batch), T), dtype=torch.long)  # (B, T)
    for b, t in enumerate(batch):
        n = len(t)
        input_ids[b, :n] = torch.tensor(t.input_ids)
        labels[b, :n] = torch.tensor(t.labels)
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class BatchStream:
    """Endless micro-batches over epochs.  The order of epoch e depends only on (seed, e), so the position
    (epoch, index) is all a checkpoint needs to continue the same sequence of batches."""

    def __init__(self, data: list[TokenizedExample], batch_size: int, *, seed: int, group_by_length: bool = True):
        if not data:
            raise DataError("empty dataset (no training examples)")
        self.data, self.batch_size, self.seed, self.group_by_length = data, batch_size, seed, group_by_length
        self.epoch, self.index = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}-{epoch}")
        if self.group_by_length:
            return length_grouped_order([len(t) for t in self.data], self.batch_size, rng)
        return random_order(len(self.data), self.batch_size, rng)

    def next_batch(self) -> list[TokenizedExample]:
        if self.index >= len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        batch = [self.data[i] for i in self._order[self.index]]
        self.index += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "n": len(self.data)}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != len(self.data) or state["seed"] != self.seed:
            raise DataError(
                f"checkpoint was made on {state['n']} examples with seed {state['seed']}, this run has "
                f"{len(self.data)} examples with seed {self.seed}; resume with the same data and --seed"
            )
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._epoch_order(self.epoch)
