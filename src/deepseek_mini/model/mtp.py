"""Multi-token prediction (DeepSeek-V3 §2.2): modules that predict tokens further ahead.

Module k (1-based) sees, at position i, the previous depth's hidden state (the main
model's last layer, before its final norm, for k = 1) and the embedding of token i + k;
it predicts token i + k + 1. Each input is RMS-normed, the two are concatenated and
projected back to ``hidden_size``, and one decoder layer of the model's own kind runs
over the result. The final norm, the embedding and the (tied) head are the main model's,
shared rather than copied, so a module costs one layer and a projection.

Training adds their cross-entropy to the loss (a denser signal); decoding uses them as
drafters whose guesses the main model verifies (inference/speculative.py).
"""

from __future__ import annotations

import torch
from torch import nn

from .norm import RMSNorm


class MTPModule(nn.Module):
    """One depth: two norms, the ``2h -> h`` projection and ``layer`` (a DecoderLayer,
    built by the model with the same constructor as its own layers)."""

    def __init__(self, hidden_size: int, norm_eps: float, layer: nn.Module) -> None:
        super().__init__()
        self.hidden_norm = RMSNorm(hidden_size, norm_eps)
        self.embed_norm = RMSNorm(hidden_size, norm_eps)
        self.proj = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        self.layer = layer

    def forward(self, hidden: torch.Tensor, embedded: torch.Tensor, *layer_args):
        """``hidden`` [B, T, h] from the previous depth, ``embedded`` [B, T, h] the
        embeddings of the tokens k ahead; ``layer_args`` go to the decoder layer. Returns
        the layer's output (before the shared final norm) and its router statistics."""
        joined = torch.cat([self.hidden_norm(hidden), self.embed_norm(embedded)], dim=-1)
        return self.layer(self.proj(joined), *layer_args)
