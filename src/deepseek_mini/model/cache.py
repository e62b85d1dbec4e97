"""The MLA latent cache: per layer, the per-token latent and nothing else.

K and V are rebuilt from the cached latents at every step (see attention.py for why and
what it costs), so the cache holds ``latent_size`` values per token per layer instead of
``2 * num_kv_heads * head_dim``. Buffers are allocated once, at the largest length the
generation may reach, and every later write goes into them in place.
"""

from __future__ import annotations

import torch

from .mask import padded_causal_mask


class LatentCache:
    """Preallocated latents ``[layers, batch, max_len, latent]`` with slot bookkeeping.

    Slot ``s`` of every row holds that row's ``s``-th token of the sequence fed so far.
    ``positions`` is each slot's RoPE position and ``valid`` says whether a slot holds a
    real token (False for left padding), so prompts of different lengths share one batch.
    """

    def __init__(self, num_layers: int, batch_size: int, max_len: int, latent_size: int,
                 device: torch.device | str, dtype: torch.dtype, rope_size: int = 0) -> None:
        self.latents = torch.zeros(num_layers, batch_size, max_len, latent_size,
                                   device=device, dtype=dtype)
        self.rope_keys = (torch.zeros(num_layers, batch_size, max_len, rope_size,
                                      device=device, dtype=dtype) if rope_size else None)
        self.positions = torch.zeros(batch_size, max_len, device=device, dtype=torch.long)
        self.valid = torch.zeros(batch_size, max_len, device=device, dtype=torch.bool)
        self.length = 0
        self.start = 0
        self.has_padding = False

    @property
    def max_len(self) -> int:
        return self.latents.shape[2]

    @property
    def batch_size(self) -> int:
        return self.latents.shape[1]

    def append(self, positions: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Reserve slots for the next ``T`` tokens of every row; call once per forward.

        ``positions`` [B, T]; ``valid`` [B, T] (nonzero = real token) or None for all real.
        """
        batch, steps = positions.shape
        if batch != self.batch_size:
            raise ValueError(f"cache holds {self.batch_size} rows; got a batch of {batch}")
        if self.length + steps > self.max_len:
            raise ValueError(f"cache holds {self.max_len} tokens; {self.length + steps} needed")
        self.start, self.length = self.length, self.length + steps
        self.positions[:, self.start:self.length] = positions
        if valid is None:
            self.valid[:, self.start:self.length] = True
        else:
            self.valid[:, self.start:self.length] = valid.bool()
            self.has_padding = True

    def update(self, layer: int, latent: torch.Tensor) -> torch.Tensor:
        """Store this forward's latents for ``layer``; return all of its latents so far."""
        self.latents[layer, :, self.start:self.length] = latent
        return self.latents[layer, :, :self.length]

    def update_with_rope(self, layer: int, latent: torch.Tensor, rope_key: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """``update`` for a latent and its rotated rope key; returns all of both so far."""
        self.rope_keys[layer, :, self.start:self.length] = rope_key
        return self.update(layer, latent), self.rope_keys[layer, :, :self.length]

    def key_positions(self) -> torch.Tensor:
        return self.positions[:, :self.length]

    def attention_mask(self) -> torch.Tensor | None:
        """Boolean ``[B, 1, T, S]`` mask for the tokens just appended, or None when every
        query may see every cached key (one new token and no padding anywhere)."""
        if self.length - self.start == 1 and not self.has_padding:
            return None
        return padded_causal_mask(self.valid[:, :self.length], self.start)
