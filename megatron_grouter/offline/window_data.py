"""Batches of document-aligned windows of an indexed dataset, for the offline Grouter tools.

The Grouter is trained (distillation, tuning) on exactly the unit it routes at training time: a
window of up to W tokens starting at a multiple of W inside one document (routing/windows.py).
Held-out documents (every `holdout_every`-th) give an honest evaluation set. With `lm_split` (the
LM's data.split) only the LM's train documents are used at all (data/lm_split.py): the tools never
learn from, or select on, the documents the LM is validated and tested on. Batches are a pure
function of (seed, step, rank), so the tools resume exactly.
"""

from __future__ import annotations

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_grouter.errors import UserError
from megatron_grouter.routing.windows import DocumentWindows


class WindowBatches:
    def __init__(self, prefix: str, window: int, batch_size: int, seed: int, split: str = "train",
                 holdout_every: int = 50, rank: int = 0, world_size: int = 1, lm_split: str | None = None):
        from megatron_grouter.data.lm_split import train_documents

        self.windows = DocumentWindows(IndexedDataset(prefix, mmap=True), window)
        starts, lengths = self.windows.all_windows()
        document = np.searchsorted(self.windows.starts_D, starts, side="right") - 1
        held_out = document % holdout_every == 0
        keep = (held_out if split == "eval" else ~held_out) & train_documents(
            len(self.windows.starts_D), lm_split)[document]
        self.starts, self.lengths = starts[keep], lengths[keep]
        if len(self.starts) == 0:
            raise UserError(f"dataset {prefix} has no {split} windows; use a larger corpus")
        if batch_size % world_size:
            raise UserError(f"batch size {batch_size} is not divisible by {world_size} processes")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.shuffle = split == "train"
        self._permutation: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.windows.window

    def _order(self, epoch: int) -> np.ndarray:
        if self._permutation is None or self._permutation[0] != epoch:
            order = (np.random.default_rng([self.seed, epoch]).permutation(len(self.starts))
                     if self.shuffle else np.arange(len(self.starts)))
            self._permutation = (epoch, order)
        return self._permutation[1]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of global batch `step`: token ids [b, W] and a validity mask."""
        first = step * self.batch_size + self.rank * (self.batch_size // self.world_size)
        rows = []
        for position in range(first, first + self.batch_size // self.world_size):
            epoch, offset = divmod(position, len(self.starts))
            rows.append(int(self._order(epoch)[offset]))
        return self.gather(np.asarray(rows))

    def gather(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        width = self.windows.window
        tokens = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=bool)
        for row, index in enumerate(rows.tolist()):
            start, length = int(self.starts[index]), int(self.lengths[index])
            tokens[row, :length] = self.windows.tokens[start:start + length]
            mask[row, :length] = True
        return torch.from_numpy(tokens), torch.from_numpy(mask)

    def eval_batches(self, count: int):
        """The first `count` batches of a fixed order (all ranks see their own share)."""
        for step in range(count):
            yield self.batch(step)
