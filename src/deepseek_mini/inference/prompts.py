"""Text in and out of ``generate``: prompts to left-padded ids, new ids back to text.

Each prompt follows an end-of-text token, since every training document followed one,
and a row's text stops at its next end-of-text."""

from __future__ import annotations

import torch

from ..data.tokenizer import Tokenizer
from .sampling import SamplingError


def prompt_ids(tok: Tokenizer, prompts: list[str]) -> list[list[int]]:
    """Each prompt's ids, after the end-of-text every training document followed."""
    return [[tok.eos_id, *ids] for ids in tok.encode_batch(prompts)]


def encode_prompts(tok: Tokenizer, prompts: list[str], max_position: int,
                   max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Left-padded ids and mask for ``prompts``, and how many of ``max_new_tokens`` fit in
    ``max_position`` after the longest."""
    rows = prompt_ids(tok, prompts)
    longest = max(len(r) for r in rows)
    if longest > max_position:
        raise SamplingError(f"the prompt is {longest} tokens long but the model reads at most "
                            f"{max_position} (model.max_position): shorten it")
    ids = torch.full((len(rows), longest), tok.eos_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, longest - len(row):] = torch.tensor(row)
        mask[i, longest - len(row):] = 1
    return ids, mask, min(max_new_tokens, max_position - longest)


def completion_text(tok: Tokenizer, new_ids: list[int]) -> str:
    """The generated text of one row, up to its end-of-text."""
    if tok.eos_id in new_ids:
        new_ids = new_ids[:new_ids.index(tok.eos_id)]
    return tok.decode(new_ids)
