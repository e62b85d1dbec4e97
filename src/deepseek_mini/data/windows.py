"""Where training windows start: ``data.windows``.

``grid`` (``BatchSampler``) cuts the token stream on a seeded, shifted grid, so most
windows open mid-document. ``documents`` starts them where documents start (at 0 and
right after each ``<|endoftext|>``), so the model sees a story's opening with its
beginning in context; a document longer than ``seq_len`` gives further windows at
``start + k * seq_len``, so every token is in some window once per epoch (a window that
runs past its document's end reads on into the next, as grid windows do). The starts
are found once, from the end-of-text id in the token array; the epoch order is a seeded
permutation of them, and the state, resume and rank split are ``BatchSampler``'s.
"""

from __future__ import annotations

import numpy as np

from ..config import DataConfig
from .tokens import BatchSampler


def document_windows(tokens: np.ndarray, seq_len: int, eos_id: int) -> np.ndarray:
    """Sorted, distinct window starts: each document's start and every ``seq_len``
    after it within the document; starts too near the end for a whole ``seq_len + 1``
    window move back to the last one that fits."""
    n = len(tokens)
    starts = np.concatenate([[0], np.flatnonzero(np.asarray(tokens) == eos_id) + 1])
    starts = starts[starts < n].astype(np.int64)
    lengths = np.diff(starts, append=n)
    counts = -(-lengths // seq_len)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    windows = np.repeat(starts, counts) + seq_len * (np.arange(counts.sum()) - first)
    return np.unique(np.minimum(windows, n - (seq_len + 1)))


class DocumentSampler(BatchSampler):
    """``BatchSampler`` over ``document_windows`` instead of a shifted grid."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 eos_id: int) -> None:
        super().__init__(tokens, seq_len, batch_size, seed)
        self.windows = document_windows(tokens, seq_len, eos_id)

    def _epoch_starts(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._starts = self.windows[rng.permutation(len(self.windows))]
            self._order_epoch = self.epoch
        return self._starts


def make_sampler(tokens: np.ndarray, data: DataConfig, batch_size: int, seed: int,
                 eos_id: int) -> BatchSampler:
    """The training sampler ``data.windows`` names."""
    if data.windows == "documents":
        return DocumentSampler(tokens, data.seq_len, batch_size, seed, eos_id)
    return BatchSampler(tokens, data.seq_len, batch_size, seed)
