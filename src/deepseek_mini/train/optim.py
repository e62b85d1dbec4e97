"""The optimizer (AdamW, or Muon with AdamW) and its learning-rate schedule.

Weight decay pulls weights toward zero to keep matrices from growing; on norm gains
(which should sit near 1) and biases it only fights the model, so they are not decayed.
The fused kernel does the whole update in one pass per parameter group, and it can skip
a step on a device-side "found non-finite" flag without a host sync (the same hook the
GradScaler uses), which is how the trainer skips a step with a non-finite loss.
``train.optimizer: muon`` gives the hidden matrices to Muon instead (muon.py), which
honours the same flag.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import TrainConfig
from .muon import MuonWithAdamW, muon_split
from .precision import bf16_is_native


def set_trainable(model: nn.Module, trainable: str) -> None:
    """``train.trainable``: ``mtp`` freezes everything but the MTP modules (the shared
    embedding and head included), so the main model's forward builds no graph and only
    the modules' parameters reach the optimizer; ``all`` trains everything."""
    for name, p in model.named_parameters():
        p.requires_grad_(trainable == "all" or name.startswith("mtp."))


def _adamw_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """Matrices (``dim >= 2``: linear, expert and embedding weights) decay; the rest not."""
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``train.optimizer`` names, over ``model``'s trainable parameters
    (build it after any sharding, over the parameters the step will update)."""
    betas = tuple(cfg.betas)
    if cfg.optimizer == "adamw":
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(_adamw_groups(params, cfg.weight_decay), lr=cfg.lr,
                                 betas=betas, fused=True)
    matrices, experts, rest = muon_split(model)
    if not cfg.muon_experts:  # AdamW for the experts: no per-expert Newton-Schulz
        rest, experts = rest + experts, []
    return MuonWithAdamW(matrices, experts, _adamw_groups(rest, cfg.weight_decay), lr=cfg.lr,
                         betas=betas, muon_lr=cfg.muon_base_lr, weight_decay=cfg.weight_decay,
                         momentum=cfg.muon_momentum, adjust_lr_fn=cfg.muon_adjust_lr,
                         ns_steps=cfg.muon_ns_steps,
                         ns_precision=muon_ns_precision(cfg, matrices[0].device if matrices
                                                        else torch.device("cpu")))


def muon_ns_precision(cfg: TrainConfig, device: torch.device) -> str:
    """``train.muon_ns_precision`` resolved: ``auto`` is torch's bf16 where ``device``
    computes bf16 natively, else fp32 (emulated bf16 made Newton-Schulz 20-40x slower
    than fp32 on an AVX2 CPU)."""
    if cfg.muon_ns_precision != "auto":
        return cfg.muon_ns_precision
    return "bf16" if bf16_is_native(device) else "fp32"


def lr_keys(cfg: TrainConfig) -> str:
    """The learning-rate keys a diverged run should lower, with their values: Muon's own
    ``train.muon_lr`` where it is set (it drives the hidden matrices, where a run
    diverges), else ``train.lr``, which both optimizers then share."""
    if cfg.optimizer == "muon" and cfg.muon_lr is not None:
        return f"train.muon_lr {cfg.muon_lr:g} (Muon's; AdamW's train.lr is {cfg.lr:g})"
    return f"train.lr {cfg.lr:g}"


def base_lrs(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> list[float]:
    """Each parameter group's learning rate before the schedule's factor."""
    if isinstance(optimizer, MuonWithAdamW):
        return optimizer.base_lrs(cfg.lr, cfg.muon_base_lr)
    return [cfg.lr] * len(optimizer.param_groups)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warm-up to ``lr``
    over ``warmup_steps``, then down to ``min_lr`` at ``schedule_steps`` (``decay_steps``,
    else ``max_steps``), then flat. The way down is a cosine, or with ``schedule: wsd``
    ``lr`` held until the last ``decay_fraction`` of the steps, then ``1 - sqrt``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    end = cfg.schedule_steps
    if step >= end:
        return cfg.min_lr
    if cfg.schedule == "wsd":
        return _wsd_decay(step, cfg)
    progress = (step - cfg.warmup_steps) / max(1, end - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def decay_start(cfg: TrainConfig) -> int:
    """WSD's first decaying step: ``decay_fraction`` of ``schedule_steps`` before its
    end, never inside the warm-up."""
    end = cfg.schedule_steps
    return max(cfg.warmup_steps, end - max(1, round(cfg.decay_fraction * end)))


def _wsd_decay(step: int, cfg: TrainConfig) -> float:
    """Stable at ``lr``, then ``1 - sqrt(progress)`` to ``min_lr``: in Hägele et al.
    (2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations")
    it beat a linear cool-down, and a 20% cool-down matched the cosine."""
    start, end = decay_start(cfg), cfg.schedule_steps
    if step < start:
        return cfg.lr
    progress = (step - start) / max(1, end - start)
    return cfg.min_lr + (1.0 - math.sqrt(progress)) * (cfg.lr - cfg.min_lr)


def build_scheduler(optimizer: torch.optim.Optimizer,
                    cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr_at`` as a LambdaLR (a factor of each group's base lr: Muon's follows the
    same curve), so its position is part of the checkpoint like the optimizer's."""
    def factor(step: int) -> float:
        return lr_at(step, cfg) / cfg.lr if cfg.lr > 0 else 0.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
