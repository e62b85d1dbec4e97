"""RMSNorm: rescale by the root mean square, no mean subtraction, one learned gain."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm computes in the input dtype; under fp16 autocast the mean of squares
        # can overflow, so normalise in fp32 and cast back. Already fp32 (decoding's usual
        # case), it skips the three no-op casts: a decoding step runs 2-3 norms a layer.
        if x.dtype == self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)
