"""The MLA latent cache: per layer, the per-token latent and nothing else.

K and V are rebuilt from the cached latents at every step (see attention.py for why), so
the cache holds ``kv_latent_dim`` values per token per layer instead of
``2 * num_kv_heads * head_dim``. Buffers are allocated once, at the largest length the
generation may reach, and every later write goes into them in place.

Two ways to read it back. Eager decoding attends to the filled prefix only (``length``,
a Python int). A *static* cache (``static=True``) serves ``torch.compile``: one-token
steps write at a slot held in a tensor and attend to the whole buffer under a mask, so
every step has the same shapes and no Python value changes between steps (gpt-fast's
design); the prompt is still prefilled the eager way.
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
                 device: torch.device | str, dtype: torch.dtype, static: bool = False) -> None:
        self.latents = torch.zeros(num_layers, batch_size, max_len, latent_size,
                                   device=device, dtype=dtype)
        self.positions = torch.zeros(batch_size, max_len, device=device, dtype=torch.long)
        self.valid = torch.zeros(batch_size, max_len, device=device, dtype=torch.bool)
        self.length = 0
        self.start = 0
        self.has_padding = False
        self.static = static
        # static steps: the next slot to write, on the device
        self.slot = torch.zeros(1, device=device, dtype=torch.long)
        self._slots = torch.arange(max_len, device=device)

    @property
    def max_len(self) -> int:
        return self.latents.shape[2]

    @property
    def batch_size(self) -> int:
        return self.latents.shape[1]

    def _stepping(self, steps: int) -> bool:
        """Whether a forward of ``steps`` tokens takes the static path."""
        return self.static and steps == 1 and self.length > 0

    def append(self, positions: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Reserve slots for the next ``T`` tokens of every row; call once per forward.

        ``positions`` [B, T]; ``valid`` [B, T] (nonzero = real token) or None for all real.
        """
        batch, steps = positions.shape
        if batch != self.batch_size:
            raise ValueError(f"cache holds {self.batch_size} rows; got a batch of {batch}")
        if self._stepping(steps):
            self.positions.index_copy_(1, self.slot, positions)
            self.valid.index_fill_(1, self.slot, True)
            self.slot += 1
            return
        if self.length + steps > self.max_len:
            raise ValueError(f"cache holds {self.max_len} tokens; {self.length + steps} needed")
        self.start, self.length = self.length, self.length + steps
        self.positions[:, self.start:self.length] = positions
        if valid is None:
            self.valid[:, self.start:self.length] = True
        else:
            self.valid[:, self.start:self.length] = valid.bool()
            self.has_padding = True
        self.slot.fill_(self.length)

    def truncate(self, length: int) -> None:
        """Forget every slot from ``length`` on, as if they had never been appended: a
        speculative step rolls back past its rejected draft tokens this way (their latents
        stay in the buffer, unread, until later tokens overwrite them)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.start = self.length = length
        self.slot.fill_(length)

    def update(self, layer: int, latent: torch.Tensor) -> torch.Tensor:
        """Store this forward's latents for ``layer``; return all of its latents so far (the
        whole buffer on the static path, where the mask hides what is not yet written)."""
        if self._stepping(latent.shape[1]):
            self.latents[layer].index_copy_(1, self.slot - 1, latent)
            return self.latents[layer]
        self.latents[layer, :, self.start:self.length] = latent
        return self.latents[layer, :, :self.length]

    def key_positions(self, steps: int) -> torch.Tensor:
        return self.positions if self._stepping(steps) else self.positions[:, :self.length]

    def attention_mask(self, steps: int) -> torch.Tensor | None:
        """Boolean ``[B, 1, T, S]`` mask for the ``steps`` tokens just appended, or None when
        every query may see every cached key (one new token and no padding anywhere)."""
        if self._stepping(steps):
            seen = self.valid & (self._slots < self.slot)
            return seen[:, None, None, :]
        if steps == 1 and not self.has_padding:
            return None
        return padded_causal_mask(self.valid[:, :self.length], self.start)
