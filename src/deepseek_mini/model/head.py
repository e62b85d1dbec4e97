"""A trimmed output head (``model.head_vocab`` N > 0): N kept ids plus one "other" class.

The full head is a [V, h] matmul per token, most of a small model's FLOPs, and a corpus
like TinyStories uses a small part of the 49k vocabulary. This head scores the N kept ids
(the training split's most frequent, chosen once per run and stored as the buffer
``ids``) and one learned "other" vector, whose probability the V − N remaining ids share
evenly:

    log p(kept id) = logit(id) − log Z,    log p(other id) = logit_other − log(V − N) − log Z

with Z summed over the N + 1 classes: a proper distribution over all V ids. The kept rows
are gathered from the full head's weight (the embedding, when tied) at every forward, so
their gradient reaches those rows. Training's CE is the chunked loss over the N + 1
classes plus log(V − N) for each "other" target, the full-vocabulary CE of this
distribution; ``logits`` expands the classes to all V ids, so everything that reads logits
(eval, generate, serve) sees the same distribution. With N = V there is no "other"
class: the head is the full one, its rows in id order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .loss import linear_cross_entropy


class TrimmedHead(nn.Module):
    """The kept ids (persistent, sorted), the "other" vector (1-D, so AdamW does not decay
    it, like a bias), and two tables derived from the ids: each id's class (its rank among
    the kept ids, or N for "other") and its log-probability offset (0, or log(V − N))."""

    def __init__(self, vocab_size: int, hidden_size: int, kept: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.register_buffer("ids", torch.arange(kept))  # placeholder until set_ids
        self.register_parameter(
            "other", nn.Parameter(torch.empty(hidden_size)) if kept < vocab_size else None)
        self.register_buffer("classes", torch.empty(vocab_size, dtype=torch.long),
                             persistent=False)
        self.register_buffer("offsets", torch.empty(vocab_size), persistent=False)
        self._build_tables()
        # A loaded checkpoint brings its own ids: the tables follow them.
        self.register_load_state_dict_post_hook(lambda module, _keys: module._build_tables())

    def set_ids(self, ids: torch.Tensor) -> None:
        """Keep ``ids`` (N distinct ids, any order; stored sorted, so the class of an id
        does not depend on how they were chosen)."""
        ids = torch.as_tensor(ids, dtype=torch.long).sort().values
        if (ids.shape != self.ids.shape or (ids.diff() <= 0).any() or ids[0] < 0
                or ids[-1] >= self.vocab_size):
            raise ValueError(f"expected {len(self.ids)} distinct ids below {self.vocab_size}")
        with torch.no_grad():
            self.ids.copy_(ids)
        self._build_tables()

    def _build_tables(self) -> None:
        kept = len(self.ids)
        if self.ids.is_meta:
            return
        with torch.no_grad():
            self.classes.fill_(kept)
            self.classes[self.ids] = torch.arange(kept, device=self.ids.device)
            shared = math.log(self.vocab_size - kept) if kept < self.vocab_size else 0.0
            self.offsets.copy_((self.classes == kept).float() * shared)

    def weight(self, full: torch.Tensor) -> torch.Tensor:
        """The [N (+ 1), h] rows scored: the kept rows of ``full`` [V, h], then "other"."""
        rows = full.index_select(0, self.ids)
        return rows if self.other is None else torch.cat([rows, self.other[None]])

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [..., V] from the N (+ 1) class scores: a kept id's own,
        every other id at logit_other − log(V − N); their log-softmax is the head's."""
        scores = F.linear(hidden, weight)
        return scores.index_select(-1, self.classes) - self.offsets.to(scores.dtype)

    def cross_entropy(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      ignore_index: int = -100) -> torch.Tensor:
        """The mean full-vocabulary CE of ``hidden`` [n, h] on ``targets`` [n]: the chunked
        loss over the classes, plus log(V − N) per "other" target (a constant)."""
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0)
        classes = torch.where(valid, self.classes[safe], ignore_index)
        ce = linear_cross_entropy(hidden, weight, classes, ignore_index)
        return ce + (self.offsets[safe] * valid).sum() / valid.sum()
