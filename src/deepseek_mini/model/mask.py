"""Attention masks for left-padded batches: which keys each query may see."""

from __future__ import annotations

import torch


def padded_causal_mask(valid: torch.Tensor, query_start: int) -> torch.Tensor:
    """Boolean ``[B, 1, T, S]``: the queries in slots ``query_start..S-1`` see the keys at
    or before their own slot that are real tokens (``valid`` [B, S]).

    A padding query would see no key at all and SDPA would return NaN for it; it is allowed
    to see itself instead, which keeps its (unused) output finite.
    """
    keys = valid.shape[1]
    query_slot = torch.arange(query_start, keys, device=valid.device)[:, None]
    key_slot = torch.arange(keys, device=valid.device)[None, :]
    allowed = (key_slot <= query_slot) & valid[:, None, :]
    allowed |= key_slot == query_slot
    return allowed[:, None]
