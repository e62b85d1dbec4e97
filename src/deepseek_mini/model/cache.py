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

The decoupled-RoPE attention (latent_rope_attention.py) also keeps each token's rotated
rope key, ``rope_size`` values per token per layer stored right after its latent in the
same buffer (``entries``), so its decoding step reads ``[c ; k_r]`` as one tensor.
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
                 device: torch.device | str, dtype: torch.dtype, static: bool = False,
                 rope_size: int = 0) -> None:
        # One buffer: each token's latent, then its rope key (if any), side by side, so
        # absorbed decoding reads both as one key tensor without a copy.
        self.entries = torch.zeros(num_layers, batch_size, max_len, latent_size + rope_size,
                                   device=device, dtype=dtype)
        self.latent_size = latent_size
        self.positions = torch.zeros(batch_size, max_len, device=device, dtype=torch.long)
        self.valid = torch.zeros(batch_size, max_len, device=device, dtype=torch.bool)
        self.length = 0
        self.start = 0
        self.has_padding = False
        self.static = static
        # static steps: the next slot to write, on the device
        self.slot = torch.zeros(1, device=device, dtype=torch.long)
        self._slots = torch.arange(max_len, device=device)
        # A trimmed LM head's rows, gathered once for the generation (transformer.py).
        self.head_rows: torch.Tensor | None = None

    @property
    def latents(self) -> torch.Tensor:
        """The latents ``[layers, batch, max_len, latent]`` (a view of ``entries``)."""
        return self.entries[..., :self.latent_size]

    @property
    def rope_keys(self) -> torch.Tensor | None:
        """The rotated rope keys ``[layers, batch, max_len, rope]``, or None without."""
        has_rope = self.entries.shape[-1] > self.latent_size
        return self.entries[..., self.latent_size:] if has_rope else None

    @property
    def max_len(self) -> int:
        return self.entries.shape[2]

    @property
    def batch_size(self) -> int:
        return self.entries.shape[1]

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

    def update_with_rope(self, layer: int, latent: torch.Tensor, rope_key: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """``update`` for a latent and its rotated rope key; returns all of both so far."""
        if self._stepping(latent.shape[1]):
            self.rope_keys[layer].index_copy_(1, self.slot - 1, rope_key)
            return self.update(layer, latent), self.rope_keys[layer]
        self.rope_keys[layer, :, self.start:self.length] = rope_key
        return self.update(layer, latent), self.rope_keys[layer, :, :self.length]

    def update_joined(self, layer: int, latent: torch.Tensor, rope_key: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """``update_with_rope`` for the eager cache, returning all latents so far [B, S,
        latent] and, as one view [B, S, latent + rope], the latents with their rope keys:
        the absorbed decoding step's keys, read without a concatenation."""
        if self._stepping(latent.shape[1]):
            latents, rope_keys = self.update_with_rope(layer, latent, rope_key)
            return latents, torch.cat([latents, rope_keys], dim=-1)
        joined = self.entries[layer, :, :self.length]
        joined[:, self.start:] = torch.cat([latent, rope_key], dim=-1)
        return joined[..., :self.latent_size], joined

    def continues(self, steps: int) -> bool:
        """Whether the ``steps`` tokens just appended follow tokens already cached (a
        decoding step rather than the prefill)."""
        return self._stepping(steps) or self.start > 0

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

    # --- rows joining and leaving a running batch (the server's continuous batching) ---

    def _layer_buffers(self) -> list[tuple[str, torch.Tensor]]:
        """The per-layer, per-token buffers: one, the latents with the rope keys if any."""
        return [("entries", self.entries)]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices, in their new order): finished requests leave the
        batch and the next step runs the others alone."""
        for name, buffer in self._layer_buffers():
            setattr(self, name, buffer[:, rows])
        self.positions = self.positions[rows]
        self.valid = self.valid[rows]
        if self.batch_size == 0:
            self.length = self.start = 0

    def add_rows(self, other: LatentCache) -> None:
        """Append ``other``'s rows (prompts prefilled on their own) with their tokens
        right-aligned to end at this cache's filled length, the slots before them invalid,
        so the next step writes every row's next token into the same slot. A longer
        newcomer lengthens the filled prefix; the running rows see the new slots as
        padding."""
        if self.static or other.static:
            raise ValueError("a static cache has fixed rows")
        if other.length > self.max_len:
            raise ValueError(f"cache holds {self.max_len} tokens; {other.length} needed")
        if other.length > self.length:
            self.valid[:, self.length:other.length] = False
            self.length = other.length
        rows = other.batch_size
        first, end = self.length - other.length, self.length
        for name, buffer in self._layer_buffers():
            theirs = getattr(other, name)
            joined = buffer.new_zeros(buffer.shape[0], rows, self.max_len, buffer.shape[-1])
            joined[:, :, first:end] = theirs[:, :, :other.length]
            setattr(self, name, torch.cat([buffer, joined], dim=1))
        positions = self.positions.new_zeros(rows, self.max_len)
        positions[:, first:end] = other.positions[:, :other.length]
        valid = self.valid.new_zeros(rows, self.max_len)
        valid[:, first:end] = other.valid[:, :other.length]
        self.positions = torch.cat([self.positions, positions])
        self.valid = torch.cat([self.valid, valid])
        self.has_padding = True

    def compact(self) -> None:
        """Move each row's real tokens, in order, to the front of the buffer and shorten
        the filled prefix to the longest row: rows that joined at different times leave
        invalid slots behind, and a long-running batch would otherwise run out of room."""
        valid = self.valid[:, :self.length]
        keep = int(valid.sum(-1).max()) if self.batch_size else 0
        # a stable sort on "is real" puts the padding first and keeps the tokens' order
        order = valid.int().argsort(dim=-1, stable=True)[:, self.length - keep:]
        for _, buffer in self._layer_buffers():
            layers, rows, _, width = buffer.shape
            gather = order[None, :, :, None].expand(layers, rows, keep, width)
            buffer[:, :, :keep] = buffer[:, :, :self.length].gather(2, gather)
        self.positions[:, :keep] = self.positions[:, :self.length].gather(1, order)
        self.valid[:, :keep] = valid.gather(1, order)
        self.valid[:, keep:] = False
        self.length = self.start = keep
