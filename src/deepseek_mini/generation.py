"""Sampling from the model, reusing the MLA latent cache between steps."""

from __future__ import annotations

import torch

from .model import DeepSeekMini


@torch.inference_mode()
def generate(model: DeepSeekMini, prompt_ids: torch.Tensor, max_new_tokens: int = 50,
             temperature: float = 0.0, use_cache: bool = True) -> torch.Tensor:
    """Greedy (temperature 0) or sampled continuation of ``prompt_ids`` [B, T]."""
    ids = prompt_ids
    cache = model.new_cache(ids.shape[0], ids.shape[1] + max_new_tokens) if use_cache else None
    step_input = ids
    for _ in range(max_new_tokens):
        logits = model(step_input, cache=cache, logits_to_keep=1).logits[:, -1].float()
        if temperature == 0.0:
            token = logits.argmax(dim=-1, keepdim=True)
        else:
            token = torch.multinomial((logits / temperature).softmax(-1), 1)
        ids = torch.cat([ids, token], dim=1)
        step_input = token if use_cache else ids
    return ids
