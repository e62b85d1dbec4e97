"""The input embedding and the output head as one weight, with one gradient buffer.

With tied embeddings the weight ``[vocab, hidden]`` gets two gradients: the head's, dense
(every row scored), and the lookup's, which touches only the looked-up rows. Autograd
builds the lookup's as a second dense ``[vocab, hidden]`` tensor (zero-filled, rows summed
in) and then adds the two: three passes over a tensor of 28M floats at the base sizes
(113 MB), 1-3% of a CPU training step. Here the lookup also hands out the weight
the head reads (an alias, no copy), so both gradients reach this one node: the lookup's
rows are added into the head's gradient with ``index_add_``, in its own memory. The
result is the same sum in another order (fp32 rounding; tests/test_fast_paths.py). The
model uses it on a CPU, where ``index_add_`` adds repeated ids in a fixed order.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


class _TiedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, ids: torch.Tensor):
        ctx.save_for_backward(ids)
        ctx.set_materialize_grads(False)  # an unused head hands in None, not zeros
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        return F.embedding(ids, weight), weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor | None, grad_head: torch.Tensor | None):
        (ids,) = ctx.saved_tensors
        if grad_rows is None:
            return grad_head, None
        if grad_head is None:
            grad = grad_rows.new_zeros(ctx.weight_shape, dtype=ctx.weight_dtype)
        elif _owned(grad_head):
            grad = grad_head
        else:
            grad = grad_head.clone(memory_format=torch.contiguous_format)
        rows = grad_rows.reshape(-1, grad_rows.shape[-1]).to(grad.dtype)
        return grad.index_add_(0, ids.reshape(-1), rows), None


def _owned(grad: torch.Tensor) -> bool:
    """Whether ``grad`` may be written in place: a plain contiguous tensor of its own (the
    head's gradient is made fresh by its backward), outside a double backward."""
    return (not torch.is_grad_enabled() and grad._base is None and grad.is_contiguous()
            and grad.layout == torch.strided)


def tied_lookup(weight: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F.embedding(ids, weight), weight)``: the rows, and the weight for the head to
    read, whose gradient then joins the rows' in one buffer."""
    return _TiedLookup.apply(weight, ids)
