"""Cross-entropy through the LM head without the ``[tokens, vocab]`` logits tensor.

With a 49k vocabulary the logits of one 8 × 128 batch are 200 MB in fp32, and the usual
``F.cross_entropy(head(x))`` keeps them, their log-softmax and then their gradient: passes
over memory that cost more than anything but the matmuls. Here the rows are taken a
chunk at a time: logits of the chunk, their log-sum-exp, and, when a gradient is wanted,
``softmax − one_hot`` turned into the gradients of the hidden states and of the head
weight at once (the loss ends the graph, so its own gradient is a scalar that backward
only multiplies in). The matmul FLOPs are the usual path's; nothing is recomputed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

CHUNK_ROWS = 256


def _chunked(hidden: torch.Tensor, weight: torch.Tensor | None, targets: torch.Tensor,
             ignore_index: int, chunk_rows: int, want_grad: bool,
             head: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """Summed CE over valid rows, their count and, with ``want_grad``, the unnormalised
    fp32 gradients of ``hidden`` and ``weight``. A ``head`` module, if given, makes the
    logits instead of ``weight`` (forward only)."""
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden, dtype=torch.float32) if want_grad else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_grad else None
    low_precision = torch.is_autocast_enabled(hidden.device.type)
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        h, t, keep = hidden[rows], safe_targets[rows, None], valid[rows, None]
        logits = (h @ weight.T if head is None else head(h)).float()
        picked = logits.gather(1, t)
        # log-sum-exp by hand, in the logits' own memory: four passes where
        # torch.logsumexp and a second exp took seven, with temporaries.
        peak = logits.amax(dim=-1, keepdim=True)
        exp = logits.sub_(peak).exp_()
        norm = exp.sum(dim=-1, keepdim=True)
        total += ((norm.log() + peak - picked) * keep).sum()
        if not want_grad:
            continue
        # d(ce)/d(logits) = softmax - one_hot on valid rows.
        grad = exp.div_(norm)
        grad.scatter_add_(1, t, torch.full_like(norm, -1.0)).mul_(keep)
        grad = grad.to(weight.dtype)
        grad_hidden[rows] = grad @ weight
        if low_precision:  # autocast lowers the product; the in-place GEMM would not
            grad_weight += grad.T @ h
        else:
            grad_weight.addmm_(grad.T, h)
    return total, valid.sum(), grad_hidden, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                ignore_index: int, chunk_rows: int) -> torch.Tensor:
        total, count, grad_hidden, grad_weight = _chunked(hidden, weight, targets,
                                                          ignore_index, chunk_rows, True)
        scale = 1.0 / count.float()
        ctx.save_for_backward(grad_hidden, grad_weight, scale)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_hidden, grad_weight, scale = ctx.saved_tensors
        factor = grad_out * scale
        hidden_dtype, weight_dtype = ctx.dtypes
        return ((grad_hidden * factor).to(hidden_dtype), (grad_weight * factor).to(weight_dtype),
                None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, targets, ignore_index=...)`` for ``hidden``
    [N, h], ``weight`` [V, h], ``targets`` [N], ``chunk_rows`` rows at a time; the
    gradients are worked out only when autograd will want them."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk_rows)
    total, count, _, _ = _chunked(hidden, weight, targets, ignore_index, chunk_rows, False)
    return total / count


def head_cross_entropy(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                       targets: torch.Tensor, ignore_index: int = -100,
                       chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """``linear_cross_entropy`` through a head module (a quantized LM head, which has no
    float weight), ``chunk_rows`` rows at a time; no gradient."""
    total, count, _, _ = _chunked(hidden, None, targets, ignore_index, chunk_rows, False, head)
    return total / count
