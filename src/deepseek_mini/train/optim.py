"""AdamW and its learning-rate schedule.

Weight decay pulls weights toward zero to keep matrices from growing; on norm gains
(which should sit near 1) and biases it only fights the model, so they are not decayed.
The fused kernel does the whole update in one pass per parameter group, and it can skip
a step on a device-side "found non-finite" flag without a host sync (the same hook the
GradScaler uses), which is how the trainer skips a step with a non-finite loss.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import TrainConfig


def set_trainable(model: nn.Module, trainable: str) -> None:
    """``train.trainable``: ``mtp`` freezes everything but the MTP modules (the shared
    embedding and head included), so the main model's forward builds no graph and only
    the modules' parameters reach the optimizer; ``all`` trains everything."""
    for name, p in model.named_parameters():
        p.requires_grad_(trainable == "all" or name.startswith("mtp."))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Matrices (``dim >= 2``: linear, expert and embedding weights) decay; the rest not."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=True)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warm-up to ``lr``
    over ``warmup_steps``, then a cosine down to ``min_lr`` at ``schedule_steps``
    (``decay_steps``, else ``max_steps``), then flat."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    end = cfg.schedule_steps
    if step >= end:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, end - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def build_scheduler(optimizer: torch.optim.Optimizer,
                    cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr_at`` as a LambdaLR (a factor of the base ``lr``), so its position is part of
    the checkpoint like the optimizer's."""
    def factor(step: int) -> float:
        return lr_at(step, cfg) / cfg.lr if cfg.lr > 0 else 0.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
