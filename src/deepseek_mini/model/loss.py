"""Cross-entropy through the LM head, its gradients worked out in the forward.

With a 49k vocabulary the logits of one 8 × 128 batch are 200 MB in fp32, and the usual
``F.cross_entropy(head(x))`` keeps them, their log-softmax and then their gradient: passes
over memory that cost more than anything but the matmuls. Here the rows are taken a
chunk at a time: logits of the chunk, their log-softmax, and, when a gradient is wanted,
``softmax − one_hot`` in the same memory, kept for a group of rows and turned into the
gradients of the hidden states and of the head weight by one product each (the loss ends
the graph, so its own gradient is a scalar that backward only multiplies in). The matmul
FLOPs are the usual path's; nothing is recomputed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

CHUNK_ROWS = 256
# The logit gradients of up to this many bytes of rows are kept (fp32, or 16-bit under
# autocast) and turned into the head's two gradients by one product each (_gradients).
GRADIENT_GROUP_BYTES = 1 << 28


def _autocast_operands(hidden: torch.Tensor, weight: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``hidden`` and ``weight`` in autocast's dtype when it is on: cast once per call,
    where autocast would cast ``weight.T`` (a view, which its cast cache skips) again for
    every chunk, a pass over the whole ``[vocab, hidden]`` weight each."""
    device = hidden.device.type
    if not torch.is_autocast_enabled(device):
        return hidden, weight
    dtype = torch.get_autocast_dtype(device)
    return hidden.to(dtype), None if weight is None else weight.to(dtype)


def _log_probs(h: torch.Tensor, weight: torch.Tensor | None,
               head: Callable[[torch.Tensor], torch.Tensor] | None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """The chunk's log-softmax over the vocabulary, fp32 (in ``out`` if given).

    One fused kernel that works a row at a time (a row of 49k logits stays in the core's
    cache for its max, its sum of exponentials and its output): one pass over memory
    where a log-sum-exp by hand took five, and torch.logsumexp seven."""
    logits = h @ weight.T if head is None else head(h)
    if logits.dtype != torch.float32:
        logits = logits.float()
    return torch.log_softmax(logits, dim=-1, out=out)


def _summed_ce(log_probs: torch.Tensor, t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return -(log_probs.gather(1, t) * keep).sum()


def _chunked(hidden: torch.Tensor, weight: torch.Tensor | None, targets: torch.Tensor,
             ignore_index: int, chunk_rows: int, want_grad: bool,
             head: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """Summed CE over valid rows, their count and, with ``want_grad``, the unnormalised
    gradients of ``hidden`` and ``weight`` (fp32, or autocast's dtype under autocast). A
    ``head`` module, if given, makes the logits instead of ``weight`` (forward only)."""
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)
    hidden, weight = _autocast_operands(hidden, weight)
    if want_grad:
        total, grad_hidden, grad_weight = _gradients(hidden, weight, safe_targets, valid,
                                                     chunk_rows)
        return total, valid.sum(), grad_hidden, grad_weight
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        total += _summed_ce(_log_probs(hidden[rows], weight, head), safe_targets[rows, None],
                            valid[rows, None])
    return total, valid.sum(), None, None


def _gradients(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
               valid: torch.Tensor, chunk_rows: int):
    """The summed CE and the gradients of ``hidden`` and ``weight`` (in their dtype: fp32,
    or 16-bit under autocast; the weight's fp32 when the rows took several groups).

    Each chunk's logits become its log-probabilities and then, in place, its logit
    gradients ``softmax - one_hot``, kept for a group of rows (``GRADIENT_GROUP_BYTES``:
    all of an 8 x 128 batch's at a 49k vocabulary, 201 MB in fp32). The group's two
    gradient products are then one GEMM each with the group's rows as their inner
    dimension: the ``[vocab, hidden]`` weight gradient is written once, not zero-filled
    and then read and written again by every chunk's ``addmm_``. Rows whose target is
    ignored keep a gradient row in the buffer; the products leave them out (their hidden
    row is zeroed for the weight's product, their gradient row masked after the other)."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    per_row = vocab * weight.element_size()
    group_rows = max(1, GRADIENT_GROUP_BYTES // per_row // chunk_rows) * chunk_rows
    fp32 = weight.dtype == torch.float32
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grads = hidden.new_empty(min(rows, group_rows), vocab)
    keep = valid[:, None]
    counted = hidden * keep
    grad_hidden = torch.empty_like(hidden)
    grad_weight = None
    for first in range(0, rows, group_rows):
        group = slice(first, min(first + group_rows, rows))
        for start in range(group.start, group.stop, chunk_rows):
            chunk = slice(start, min(start + chunk_rows, group.stop))
            t = targets[chunk, None]
            kept = grads[chunk.start - first:chunk.stop - first]
            log_probs = _log_probs(hidden[chunk], weight, None, kept if fp32 else None)
            total += _summed_ce(log_probs, t, keep[chunk])
            grad = log_probs.exp_().scatter_add_(1, t, log_probs.new_full(t.shape, -1.0))
            if not fp32:
                kept.copy_(grad)
        kept = grads[:group.stop - first]
        grad_hidden[group] = kept @ weight
        product = kept.T @ counted[group]
        grad_weight = (product if grad_weight is None
                       else grad_weight.float().add_(product))
    return total, grad_hidden.mul_(keep), grad_weight


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
        return (_scaled(grad_hidden, factor, hidden_dtype),
                _scaled(grad_weight, factor, weight_dtype), None, None, None)


def _scaled(grad: torch.Tensor, factor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``grad * factor`` in ``dtype``; a 16-bit ``grad`` (autocast's) is widened to fp32
    first, in one pass, so the scaling does not round it a second time."""
    if grad.dtype == torch.float32:
        return (grad * factor).to(dtype)
    return grad.float().mul_(factor).to(dtype)


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
