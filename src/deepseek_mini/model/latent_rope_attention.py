"""Multi-head Latent Attention with a decoupled RoPE key (DeepSeek-V2/V3).

Each token is compressed to a latent ``c`` (``kv_latent_dim`` values, RMS-normalised) and
one small rope key ``k_r`` (``qk_rope_head_dim`` values, rotated once, shared by every
head). Per head, the key is ``[W_UK,h c ; k_r]`` and the value ``W_UV,h c``; the query
is ``[q_nope ; RoPE(q_rope)]`` from a plain projection or, when ``q_lora_rank > 0``,
through a normalised low-rank latent. Scores are scaled by ``(nope + rope)^-1/2``.

Because position enters only through ``k_r``, ``q_nope · W_UK,h c = (W_UK,hᵀ q_nope) · c``:
the key up-projection can be folded into the query and, likewise, ``W_UV,h`` applied after
attending to the latents. Decoding does that ("absorbed"): attention runs as one shared
head of width ``latent + rope`` over the cache, which holds just ``c`` and ``k_r`` per token,
and nothing is up-projected over the cached tokens. Training and the prompt's prefill
use the plain form, where the up-projection is the cheaper side of the product.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from ..config import ModelConfig
from .norm import RMSNorm
from .rope import apply_rope

if TYPE_CHECKING:
    from .cache import LatentCache

# DeepSeek-V3 (and transformers' DeepseekV3) normalise both latents with this epsilon,
# whatever the model's norm_eps.
LATENT_NORM_EPS = 1e-6


class LatentRopeAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = cfg.num_heads
        self.nope = cfg.qk_nope_head_dim
        self.rope = cfg.qk_rope_head_dim
        self.value = cfg.v_head_dim
        self.latent = cfg.kv_latent_dim
        self.scale = (self.nope + self.rope) ** -0.5
        self.dropout = cfg.dropout  # on the attention probabilities, in training mode only
        q_width = cfg.num_heads * (self.nope + self.rope)
        if cfg.q_lora_rank:
            self.q_down = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_up = nn.Linear(cfg.q_lora_rank, q_width, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.hidden_size, q_width, bias=False)
        self.kv_down = nn.Linear(cfg.hidden_size, self.latent + self.rope, bias=False)
        self.kv_norm = RMSNorm(self.latent, LATENT_NORM_EPS)
        self.kv_up = nn.Linear(self.latent, cfg.num_heads * (self.nope + self.value), bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * self.value, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rope_q: tuple[torch.Tensor, torch.Tensor],
                rope_k: tuple[torch.Tensor, torch.Tensor],
                cache: LatentCache | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """As ``MultiHeadLatentAttention.forward``; the rope tables are ``qk_rope_head_dim``
        wide and only this forward's tokens' key tables are used (``rope_k``'s last T)."""
        batch, steps, _ = x.shape
        if steps == 1 and mask is None and cache is not None and cache.continues(steps):
            return self._decode_one(x, rope_q, cache)
        q = self._query(x).view(batch, steps, self.num_heads, -1).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        q_rope = apply_rope(q_rope, *rope_q)
        latent, k_rope = self.kv_down(x).split([self.latent, self.rope], dim=-1)
        latent = self.kv_norm(latent)
        k_rope = apply_rope(k_rope[:, None], *rope_q)[:, 0]  # keys of this forward's tokens
        absorbed = cache is not None and cache.continues(steps)
        if cache is not None:
            latent, k_rope = cache.update_with_rope(self.layer_index, latent, k_rope)
        if absorbed:
            out = self._absorbed(q_nope, q_rope, latent, k_rope, mask)
        else:
            out = self._plain(q_nope, q_rope, latent, k_rope, mask, causal=cache is None)
        return self.o_proj(out.transpose(1, 2).reshape(batch, steps, -1))

    def _decode_one(self, x: torch.Tensor, rope_q: tuple[torch.Tensor, torch.Tensor],
                    cache: LatentCache) -> torch.Tensor:
        """``forward`` for one new token per row [B, 1, hidden] that may see every cached
        key (no mask: no padding, the eager cache): the absorbed attention of ``_absorbed``
        as a handful of batched products over the heads, in place of the general path's
        4-D broadcasts and SDPA's math fallback (some 70 small operators a layer on a CPU,
        where one decoding step is mostly such per-operator costs). Both rope keys, the
        query's and the new key's, rotate in one call."""
        batch = x.shape[0]
        q_nope, q_rope = self._query(x).view(batch, self.num_heads, -1).split(
            [self.nope, self.rope], dim=-1)                              # [B, H, ·]
        latent, k_rope = self.kv_down(x).split([self.latent, self.rope], dim=-1)
        cos, sin = (table[:, 0] for table in rope_q)                      # [B, 1, r]
        rotated = apply_rope(torch.cat([q_rope, k_rope], dim=1), cos, sin)
        q_rope, k_rope = rotated.split([self.num_heads, 1], dim=1)
        latent, keys = cache.update_joined(self.layer_index, self.kv_norm(latent), k_rope)
        w_uk, w_uv = self._absorbing_weights(q_nope.dtype)                # [H, nope|v, c]
        q = torch.cat([torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1), q_rope],
                      dim=-1)                                             # [B, H, c + r]
        scores = torch.bmm(q, keys.transpose(1, 2)).mul_(self.scale)      # [B, H, S]
        out = torch.bmm(scores.softmax(dim=-1), latent)                   # [B, H, c]
        out = torch.bmm(out.transpose(0, 1), w_uv.transpose(1, 2))        # [H, B, v]
        return self.o_proj(out.transpose(0, 1).reshape(batch, 1, -1))

    def _absorbing_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``kv_up``'s weight split per head into ``W_UK`` [H, nope, c] and ``W_UV``
        [H, v, c]."""
        w = self._kv_up_weight(dtype).view(self.num_heads, self.nope + self.value, self.latent)
        return w.split([self.nope, self.value], dim=1)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            return self.q_proj(x)
        return self.q_up(self.q_norm(self.q_down(x)))

    def _plain(self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor,
               k_rope: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        """Up-project every key and value, then attend per head: [B, H, T, v_head_dim]."""
        batch, keys, _ = latent.shape
        kv = self.kv_up(latent).view(batch, keys, self.num_heads, -1).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.value], dim=-1)
        k = torch.cat([k_nope, k_rope[:, None].expand(-1, self.num_heads, -1, -1)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                              is_causal=causal and mask is None,
                                              dropout_p=self.dropout if self.training else 0.0,
                                              scale=self.scale)

    def _absorbed(self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor,
                  k_rope: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attend in latent space: queries ``[W_UKᵀ q_nope ; q_rope]`` against the cached
        ``[c ; k_r]`` (one head shared by all), values ``c``; ``W_UV`` applied after."""
        w_uk, w_uv = self._absorbing_weights(q_nope.dtype)
        q = torch.cat([torch.matmul(q_nope, w_uk), q_rope], dim=-1)   # [B, H, T, c + r]
        k = torch.cat([latent, k_rope], dim=-1)[:, None]               # [B, 1, S, c + r]
        out = F.scaled_dot_product_attention(q, k, latent[:, None], attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0,
                                             scale=self.scale, enable_gqa=True)
        return torch.matmul(out, w_uv.transpose(1, 2))                 # [B, H, T, v]

    def _kv_up_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """``kv_up``'s weight [out, in]: the parameter, or a quantized layer's weight as
        ``dtype`` (quantize.py; a small matrix, cast at each step)."""
        if isinstance(self.kv_up, nn.Linear):
            return self.kv_up.weight
        return self.kv_up.dequantized(dtype)
