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
# fp32 chunks of a smaller head take more rows, up to this many logits (256 rows of a
# 49,152-id head, 50 MB): for the 8,193 classes of a trimmed head, 1,280 rows, whose
# products ran the head's loss 1.15-1.2x faster than 256 rows on an AVX2 EPYC.
CHUNK_LOGITS = CHUNK_ROWS * 49152
# Under autocast, the logit gradients of up to this many bytes of rows are kept (16-bit)
# and turned into the weight's gradient by one product (see _grouped_gradients).
GRADIENT_GROUP_BYTES = 1 << 28


def _autocast_operands(hidden: torch.Tensor, weight: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """``hidden`` and ``weight`` in autocast's dtype when it is on, and whether it is: cast
    once per call, where autocast would cast ``weight.T`` (a view, which its cast cache
    skips) again for every chunk, a pass over the whole ``[vocab, hidden]`` weight each."""
    device = hidden.device.type
    if not torch.is_autocast_enabled(device):
        return hidden, weight, False
    dtype = torch.get_autocast_dtype(device)
    return hidden.to(dtype), None if weight is None else weight.to(dtype), True


def _chunk(h: torch.Tensor, weight: torch.Tensor | None,
           head: Callable[[torch.Tensor], torch.Tensor] | None, t: torch.Tensor,
           keep: torch.Tensor, want_grad: bool, vocab_major: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The summed CE of one chunk's rows and, with ``want_grad``, d(ce)/d(logits) (fp32):
    ``[rows, vocab]``, or ``[vocab, rows]`` when ``vocab_major`` (``weight @ h.T``).

    Vocab-major is the fp32 layout: the chunk's rows are the small side of the product,
    and MKL's fp32 GEMM runs ``W @ h.T`` (the vocabulary as its long side) near the
    model's other products where ``h @ W.T`` ran at 60-80% of their rate (profiles of the
    base-size training step on an AVX2 EPYC); the reductions then run down the columns,
    vectorised across the rows."""
    if vocab_major:
        logits, dim, t, keep = weight @ h.T, 0, t.T, keep.T
    else:
        logits, dim = (h @ weight.T if head is None else head(h)).float(), 1
    picked = logits.gather(dim, t)
    # log-sum-exp by hand, in the logits' own memory: four passes where
    # torch.logsumexp and a second exp took seven, with temporaries.
    peak = logits.amax(dim=dim, keepdim=True)
    exp = logits.sub_(peak).exp_()
    norm = exp.sum(dim=dim, keepdim=True)
    loss = ((norm.log() + peak - picked) * keep).sum()
    if not want_grad:
        return loss, None
    # d(ce)/d(logits) = softmax - one_hot on valid rows.
    grad = exp.div_(norm)
    return loss, grad.scatter_add_(dim, t, torch.full_like(norm, -1.0)).mul_(keep)


def _chunked(hidden: torch.Tensor, weight: torch.Tensor | None, targets: torch.Tensor,
             ignore_index: int, chunk_rows: int, want_grad: bool,
             head: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """Summed CE over valid rows, their count and, with ``want_grad``, the unnormalised
    gradients of ``hidden`` and ``weight`` (fp32, or autocast's dtype under autocast). A
    ``head`` module, if given, makes the logits instead of ``weight`` (forward only)."""
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)
    hidden, weight, low_precision = _autocast_operands(hidden, weight)
    if want_grad and low_precision:
        total, grad_hidden, grad_weight = _grouped_gradients(hidden, weight, safe_targets,
                                                             valid, chunk_rows)
        return total, valid.sum(), grad_hidden, grad_weight
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden, dtype=torch.float32) if want_grad else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_grad else None
    vocab_major = head is None and weight.dtype == torch.float32
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        h, t, keep = hidden[rows], safe_targets[rows, None], valid[rows, None]
        loss, grad = _chunk(h, weight, head, t, keep, want_grad, vocab_major)
        total += loss
        if grad is None:
            continue
        grad = grad.to(weight.dtype)
        if vocab_major:  # grad [vocab, rows]
            grad_hidden[rows] = grad.T @ weight
            grad_weight.addmm_(grad, h)
        else:
            grad_hidden[rows] = grad @ weight
            grad_weight.addmm_(grad.T, h)
    return total, valid.sum(), grad_hidden, grad_weight


def _grouped_gradients(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       valid: torch.Tensor, chunk_rows: int):
    """Under autocast (16-bit ``hidden`` and ``weight``): the summed CE and the 16-bit
    gradients of ``hidden`` and ``weight`` (fp32 when the rows took several groups).

    Summing the weight's gradient chunk by chunk, as the fp32 path does with ``addmm_``,
    cannot stay in place here: a 16-bit product added to an fp32 sum is first converted
    to a temporary, two more passes over a ``[vocab, hidden]`` tensor per chunk, on top of
    zeroing the sum. So each chunk's logit gradients are kept, 16-bit, for a group of
    rows (``GRADIENT_GROUP_BYTES``), and the group's two gradient products are one GEMM
    each, with the group's rows as their inner dimension."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    per_row = vocab * weight.element_size()
    group_rows = max(1, GRADIENT_GROUP_BYTES // per_row // chunk_rows) * chunk_rows
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grads = hidden.new_empty(min(rows, group_rows), vocab)
    grad_hidden = torch.empty_like(hidden)
    grad_weight = None
    for first in range(0, rows, group_rows):
        group = slice(first, min(first + group_rows, rows))
        for start in range(group.start, group.stop, chunk_rows):
            chunk = slice(start, min(start + chunk_rows, group.stop))
            loss, grad = _chunk(hidden[chunk], weight, None, targets[chunk, None],
                                valid[chunk, None], True)
            total += loss
            grads[chunk.start - first:chunk.stop - first] = grad
        kept = grads[:group.stop - first]
        grad_hidden[group] = kept @ weight
        product = kept.T @ hidden[group]
        grad_weight = (product if grad_weight is None
                       else grad_weight.float().add_(product))
    return total, grad_hidden, grad_weight


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


def fp32_chunk_rows(hidden: torch.Tensor, weight: torch.Tensor) -> int:
    """Rows per chunk: ``CHUNK_ROWS``, or in fp32 (no autocast) as many multiples of it
    as keep a chunk's logits within ``CHUNK_LOGITS``: a trimmed head's few thousand
    classes make products too small for MKL's fp32 GEMM at 256 rows."""
    if torch.is_autocast_enabled(hidden.device.type) or weight.dtype != torch.float32:
        return CHUNK_ROWS
    return CHUNK_ROWS * max(1, CHUNK_LOGITS // (CHUNK_ROWS * weight.shape[0]))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, chunk_rows: int | None = None
                         ) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, targets, ignore_index=...)`` for ``hidden``
    [N, h], ``weight`` [V, h], ``targets`` [N], ``chunk_rows`` rows at a time (default:
    ``fp32_chunk_rows``); the gradients are worked out only when autograd will want
    them."""
    chunk_rows = chunk_rows or fp32_chunk_rows(hidden, weight)
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
