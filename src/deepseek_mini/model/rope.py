"""Rotary position embedding, applied to queries and keys inside attention.

The rotate-half layout (pairs ``i`` and ``i + d/2``) is Hugging Face Llama's, so SmolLM2's
q/k projections load without permutation.
"""

from __future__ import annotations

import torch


def rope_tables(head_dim: int, max_position: int, theta: float,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [max_position, head_dim], in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64)
                               / head_dim)
    angles = torch.outer(torch.arange(max_position, device=device, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, H, T, D] by per-position tables broadcastable to [B, 1, T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)
