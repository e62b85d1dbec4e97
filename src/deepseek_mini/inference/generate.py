"""Sampling from the model: ``generate``, made of ``prefill`` and ``decode_one``.

The prompt is run through the model once (``prefill``), filling a preallocated MLA latent
cache; then each step (``decode_one``) feeds only the newest token. Prompts of different
lengths share a batch by left padding: ``attention_mask`` marks the real tokens, no token attends to
padding, and each token's RoPE position is its index among its row's real tokens, so every
row gets exactly the tokens it would get alone. ``use_cache=False`` recomputes the whole
sequence at every step instead, the reference the cache is checked against.
``speculative=True`` decodes with the model's MTP modules as drafters (speculative.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from ..model.cache import LatentCache
from ..model.moe import exclude_from_compile
from ..model.transformer import DeepSeekMini
from .sampling import SamplingError, check_sampling, check_seed, next_token
from .speculative import Sampler, SpeculativeStats, speculative_generate

Streamer = Callable[[torch.Tensor], None]


@torch.inference_mode()
def generate(model: DeepSeekMini, prompt_ids: torch.Tensor, max_new_tokens: int = 50,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             *, seed: int | None = None, generator: torch.Generator | None = None,
             use_cache: bool = True, eos_id: int | None = None,
             attention_mask: torch.Tensor | None = None,
             streamer: Streamer | None = None, compile: bool = False,
             speculative: bool = False,
             stats: SpeculativeStats | None = None) -> torch.Tensor:
    """Continue ``prompt_ids`` [B, T]; returns ``[B, T + n]`` ids, ``n <= max_new_tokens``.

    ``temperature`` 0 is greedy; otherwise logits are divided by it and filtered by
    ``top_k`` / ``top_p`` before sampling from ``generator`` (or a new one seeded with
    ``seed``, or torch's global one). ``attention_mask`` [B, T] (1 = real token) allows
    left padding. A row that produces ``eos_id`` is finished and continues with
    ``eos_id``; generation stops once every row is. ``streamer`` receives each step's
    tokens [B]. ``compile`` runs the decode step through ``torch.compile`` over a static
    cache. ``speculative`` drafts with the MTP modules and verifies (one prompt, no
    padding; off by default: no model here has yet measured faster with it, see
    BENCHMARKS.md), counting rounds and acceptances into ``stats``. Bad arguments raise
    ``SamplingError`` (a ValueError and a UserError).
    """
    check_sampling(temperature, top_k, top_p)
    check_seed(seed)
    if seed is not None and generator is not None:
        raise SamplingError("give a seed or a generator, not both")
    if compile and not use_cache:
        raise SamplingError("compile needs the cache (use_cache=True)")
    device = model.device
    prompt_ids = prompt_ids.to(device)
    mask, padded = _check_prompt(model, prompt_ids, attention_mask, max_new_tokens)
    if seed is not None:
        generator = torch.Generator(device).manual_seed(seed)
    if speculative:
        check_speculative(model, prompt_ids, padded, use_cache, compile)
        return speculative_generate(model, prompt_ids, max_new_tokens,
                                    Sampler(temperature, top_k, top_p, generator), eos_id,
                                    streamer, stats)
    batch, prompt_len = prompt_ids.shape
    total = prompt_len + max_new_tokens
    ids = torch.empty(batch, total, dtype=torch.long, device=device)
    ids[:, :prompt_len] = prompt_ids
    positions = torch.empty_like(ids)
    positions[:, :prompt_len] = (mask.cumsum(-1) - 1).clamp_min(0)
    positions[:, prompt_len:] = (mask.sum(-1, keepdim=True)
                                 + torch.arange(max_new_tokens, device=device))
    full_mask = None
    if padded:
        full_mask = torch.ones_like(ids)
        full_mask[:, :prompt_len] = mask
    cache = model.new_cache(batch, total, static=compile) if use_cache else None
    step = compiled_decode_one() if compile else decode_one
    finished = torch.zeros(batch, dtype=torch.bool, device=device)

    logits = prefill(model, ids[:, :prompt_len], cache, positions[:, :prompt_len],
                     None if full_mask is None else full_mask[:, :prompt_len])
    for end in range(prompt_len, total):
        token = next_token(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            token = token.masked_fill(finished, eos_id)
            finished |= token == eos_id
        ids[:, end] = token
        if streamer is not None:
            streamer(token)
        if (eos_id is not None and bool(finished.all())) or end + 1 == total:
            return ids[:, :end + 1]
        if cache is None:  # the reference: the whole sequence again
            logits = prefill(model, ids[:, :end + 1], None, positions[:, :end + 1],
                             None if full_mask is None else full_mask[:, :end + 1])
        else:
            logits = step(model, ids[:, end:end + 1], cache, positions[:, end:end + 1])
    return ids


def prefill(model: DeepSeekMini, ids: torch.Tensor, cache: LatentCache | None,
            positions: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Run the prompt [B, T] through the model, filling ``cache``; the next-token logits
    [B, V] of its last position."""
    return model(ids, cache=cache, positions=positions, attention_mask=attention_mask,
                 logits_to_keep=1).logits[:, -1]


def decode_one(model: DeepSeekMini, token: torch.Tensor, cache: LatentCache,
               position: torch.Tensor) -> torch.Tensor:
    """One token per row [B, 1] at ``position`` [B, 1] against the cache; next-token
    logits [B, V]."""
    return model(token, cache=cache, positions=position, logits_to_keep=1).logits[:, -1]


@functools.cache
def compiled_decode_one(backend: str = "inductor") -> Callable[..., torch.Tensor]:
    """``decode_one`` through ``torch.compile``, made once per process and backend (its
    graphs are kept per model and shape), the grouped expert product left to eager mode."""
    exclude_from_compile()
    return torch.compile(decode_one, backend=backend, dynamic=False)


def check_speculative(model: DeepSeekMini, prompt_ids: torch.Tensor, padded: bool,
                      use_cache: bool, compile: bool) -> None:
    """What speculative decoding needs (MTP modules, one unpadded prompt, the eager
    cache): a command checks it before it prints anything."""
    if model.config.mtp_depth == 0:
        raise SamplingError("speculative decoding drafts with MTP modules, and this model "
                            "has none (model.mtp_depth is 0)")
    if prompt_ids.shape[0] != 1 or padded:
        raise SamplingError(f"speculative decoding takes one unpadded prompt at a time; got "
                            f"{prompt_ids.shape[0]} rows" + (" with padding" if padded else ""))
    if not use_cache or compile:
        raise SamplingError("speculative decoding runs over the eager cache: drop "
                            + ("use_cache=False" if not use_cache else "compile"))


def _check_prompt(model: DeepSeekMini, prompt_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None,
                  max_new_tokens: int) -> tuple[torch.Tensor, bool]:
    """The prompt's mask [B, T] (ones without padding) and whether it pads anything, after
    checking shapes, ids and lengths; one host sync, before the first step."""
    if prompt_ids.dim() != 2 or 0 in prompt_ids.shape:
        raise SamplingError(f"prompt_ids must be a non-empty [batch, tokens] tensor, got shape "
                            f"{tuple(prompt_ids.shape)}")
    if max_new_tokens < 0:
        raise SamplingError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if attention_mask is None:
        mask = torch.ones_like(prompt_ids)
    elif attention_mask.shape != prompt_ids.shape:
        raise SamplingError(f"attention_mask has shape {tuple(attention_mask.shape)} but "
                            f"prompt_ids has {tuple(prompt_ids.shape)}")
    else:
        mask = attention_mask.to(device=prompt_ids.device, dtype=torch.long)
    lengths = mask.sum(-1)
    not_binary = ((mask != 0) & (mask != 1)).any()
    right_padded = (mask.diff(dim=-1) < 0).any()
    lo, hi, shortest, longest, bad_mask = torch.stack([
        prompt_ids.min(), prompt_ids.max(), lengths.min(), lengths.max(),
        (not_binary | right_padded).long()]).tolist()
    vocab, max_position = model.config.vocab_size, model.config.max_position
    if lo < 0 or hi >= vocab:
        raise SamplingError(f"prompt token ids must be in [0, {vocab}), got {lo}..{hi}")
    if bad_mask:
        raise SamplingError("attention_mask must hold 1 for tokens and 0 for padding, and "
                            "padding only on the left")
    if shortest == 0:
        raise SamplingError("a prompt has no tokens: every row needs at least one")
    if longest + max_new_tokens > max_position:
        raise SamplingError(f"a prompt of {longest} tokens plus max_new_tokens "
                            f"{max_new_tokens} exceeds model.max_position {max_position}")
    return mask, shortest < prompt_ids.shape[1]
