"""One optimizer step: micro batches with gradient accumulation, clipping, the update.

Nothing here waits on the device: the losses, the gradient norm and whether the step was
finite come back as device tensors, read only at log intervals.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..model.router import sigmoid_routers, update_router_biases
from .distributed import Parallel
from .precision import Precision


def accumulate_gradients(model: nn.Module, batch: torch.Tensor, micro_batch_size: int,
                         precision: Precision, parallel: Parallel | None = None,
                         mtp_loss_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over ``batch`` [rows, seq_len + 1] in micro batches, leaving
    the mean gradient in ``.grad``. Returns the mean (loss, ce, aux, balance, z, mtp_ce)
    and the expert loads summed over the micro batches [moe layers, experts]; with MTP
    modules the loss is ``ce + aux + mtp_loss_weight * mtp_ce`` (else mtp_ce 0).

    The load-balance term is a statistic of whichever batch the router sees, so it is
    computed per micro batch; everything else matches one pass over the whole batch.
    Under ``parallel``, ``batch`` is this rank's share and the gradients are averaged
    over ranks after the last micro batch.
    """
    parallel = parallel or Parallel()
    micro = batch.to(precision.device, non_blocking=True).split(micro_batch_size)
    losses = torch.zeros(6, device=precision.device)
    loads = 0
    for i, chunk in enumerate(micro):
        with parallel.gradient_sync(model, last=i == len(micro) - 1):
            with precision.autocast():
                out = model(chunk[:, :-1], targets=chunk[:, 1:])
            loss, mtp_ce = out.loss, out.mtp_ce
            if mtp_ce is None:
                mtp_ce = torch.zeros_like(out.ce)
            else:
                loss = loss + mtp_loss_weight * mtp_ce
            precision.scaler.scale(loss / len(micro)).backward()
        losses += torch.stack([loss, out.ce, out.aux, out.balance_loss, out.z_loss,
                               mtp_ce]).detach().float()
        loads = loads + (out.expert_counts if out.mtp_expert_counts is None
                         else torch.cat([out.expert_counts, out.mtp_expert_counts]))
    return losses / len(micro), loads


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor,
               micro_batch_size: int, grad_clip: float, precision: Precision,
               parallel: Parallel | None = None, mtp_loss_weight: float = 0.0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step. Returns the step's (loss, ce, aux, balance, z, grad norm,
    mtp_ce) (mtp_ce last, so a log window saved before it existed still lines up) and
    whether it was finite, both on the device, without waiting for it: a non-finite step
    is skipped by the optimizer itself (the fused AdamW kernel, or muon.py's selects) and
    leaves weights and optimizer state as they were. Under ``parallel`` the losses are the
    mean over ranks, so every rank logs and skips alike.

    After the step, DeepSeek-V3's sigmoid routers move their expert biases by the step's
    expert loads, summed over ranks so that every rank's biases stay equal (router.py)."""
    parallel = parallel or Parallel()
    losses, loads = accumulate_gradients(model, batch, micro_batch_size, precision, parallel,
                                         mtp_loss_weight)
    losses = parallel.mean(losses)
    scaler = precision.scaler
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = parallel.clip_grad_norm(params, grad_clip if grad_clip > 0 else math.inf)
    finite = torch.isfinite(losses[0])
    if scaler.is_enabled():
        scaler.step(optimizer)  # skips on its own when the scaled gradients overflowed
    else:
        finite = finite & torch.isfinite(grad_norm)
        optimizer.found_inf = (~finite).float()  # read by the optimizer's step
        optimizer.step()
        del optimizer.found_inf
    routers = sigmoid_routers(model)
    if routers:  # (fp16: a step the scaler skips for overflowed gradients still moves them)
        update_router_biases(routers, parallel.sum(loads), finite)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return torch.cat([losses[:5], grad_norm.reshape(1).float(), losses[5:]]), finite
