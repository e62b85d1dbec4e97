"""Multi-head Latent Attention (MLA).

Each token is squeezed into one small latent (``kv_latent_dim`` values); keys and
values are rebuilt from it by two up-projections into ``num_kv_heads`` heads shared by
all query heads (GQA). Only the latent needs caching during generation.

Why K and V are rebuilt rather than absorbed: RoPE rotates K after the up-projection, and
the rotation depends on the key's position, so ``q · R(pos) k_up(c)`` cannot be folded into
one query-side matrix (DeepSeek-V2 adds a separate small RoPE key for that; this model has
none). ``v_up`` could be folded into ``o_proj`` (per head ``W_o,h · W_v``), but with one KV
head whose width equals the latent's, that saves only the ``S x latent x head_dim`` V
product per layer while making the output projection per-head. So each decoding step
recomputes ``k_up`` and ``v_up`` over the ``S`` cached latents and rotates the keys: about
``2 * S * latent * kv_heads * head_dim`` multiply-adds per layer, small next to the layer's
weights read per token (BENCHMARKS.md), for a cache of ``latent`` values per token per
layer instead of ``2 * kv_heads * head_dim``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from ..config import ModelConfig
from .rope import apply_rope

if TYPE_CHECKING:
    from .cache import LatentCache


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout  # on the attention probabilities, in training mode only
        kv_width = cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.kv_down = nn.Linear(cfg.hidden_size, cfg.kv_latent_dim, bias=False)
        self.k_up = nn.Linear(cfg.kv_latent_dim, kv_width, bias=False)
        self.v_up = nn.Linear(cfg.kv_latent_dim, kv_width, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rope_q: tuple[torch.Tensor, torch.Tensor],
                rope_k: tuple[torch.Tensor, torch.Tensor],
                cache: LatentCache | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [B, T, hidden]; ``rope_q`` / ``rope_k``: (cos, sin) for the query and key
        positions, shaped [B, 1, T or S, head_dim]. ``mask`` [B, 1, T, S] (True = may see)
        decides when given; without it, attention is causal without a cache and sees every
        key with one (a single new token)."""
        batch, steps, _ = x.shape
        if steps == 1 and mask is None and cache is not None:
            return self._decode_one(x, rope_q, rope_k, cache)
        q = self.q_proj(x).view(batch, steps, self.num_heads, self.head_dim).transpose(1, 2)
        latent = self.kv_down(x)
        if cache is not None:
            latent = cache.update(self.layer_index, latent)
        keys = latent.shape[1]
        k = self.k_up(latent).view(batch, keys, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_up(latent).view(batch, keys, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, *rope_q)
        k = apply_rope(k, *rope_k)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=cache is None and mask is None,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, steps, -1))

    def _decode_one(self, x: torch.Tensor, rope_q: tuple[torch.Tensor, torch.Tensor],
                    rope_k: tuple[torch.Tensor, torch.Tensor],
                    cache: LatentCache) -> torch.Tensor:
        """``forward`` for one new token per row [B, 1, hidden] that sees every cached key
        (no mask): the query heads grouped by their KV head and attended with two batched
        products and a softmax, in place of SDPA's GQA path (some 20 small operators a
        layer on a CPU, where a decoding step is mostly such per-operator costs)."""
        batch, kv_heads = x.shape[0], self.num_kv_heads
        group = self.num_heads // kv_heads
        q = self.q_proj(x).view(batch, kv_heads, group, self.head_dim)
        latent = cache.update(self.layer_index, self.kv_down(x))
        keys = latent.shape[1]
        k = self.k_up(latent).view(batch, keys, kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_up(latent).view(batch, keys, kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, *rope_q)                                   # [B, kv, G, d]
        k = apply_rope(k, *rope_k)                                   # [B, kv, S, d]
        rows = batch * kv_heads
        scores = torch.bmm(q.reshape(rows, group, -1), k.reshape(rows, keys, -1).transpose(1, 2))
        out = torch.bmm(scores.mul_(self.head_dim ** -0.5).softmax(dim=-1),
                        v.reshape(rows, keys, -1))                   # [B * kv, G, d]
        return self.o_proj(out.view(batch, 1, -1))
