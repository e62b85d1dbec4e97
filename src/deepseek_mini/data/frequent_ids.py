"""Which ids a trimmed LM head keeps (``model.head_vocab``): the training split's most
frequent, counted over the memory-mapped token file a chunk at a time (``np.bincount``
needs integer indices, so a whole multi-GB uint16 split would otherwise be copied to
int64 at once)."""

from __future__ import annotations

import numpy as np
import torch

COUNT_CHUNK = 1 << 24  # tokens per bincount: 128 MB of int64 indices


def token_counts(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """How often each id below ``vocab_size`` occurs in ``tokens`` (int64 [vocab_size])."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(tokens), COUNT_CHUNK):
        chunk = np.bincount(tokens[start:start + COUNT_CHUNK], minlength=vocab_size)
        counts += chunk[:vocab_size]
    return counts


def most_frequent_ids(tokens: np.ndarray, kept: int, vocab_size: int) -> torch.Tensor:
    """The ``kept`` most frequent ids of ``tokens``, ties broken by the lower id (so ids
    that never occur fill any remaining places in id order), sorted ascending."""
    counts = token_counts(tokens, vocab_size)
    order = np.argsort(-counts, kind="stable")  # stable: equal counts stay in id order
    return torch.from_numpy(np.sort(order[:kept]))
