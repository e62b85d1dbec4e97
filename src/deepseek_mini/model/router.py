"""The routers that pick each token's experts: the seed's softmax router with a balance
loss, and DeepSeek-V3's sigmoid router balanced by a per-expert bias instead.

Both hold one ``weight`` [experts, hidden] (so ``moe.router.weight`` is the same key for
both) and return a ``Routing``: the chosen experts and their combine weights per token.
The sigmoid router's ``expert_bias`` is a buffer: it moves the choice only (never the
combine weights), gets no gradient, is never seen by the optimizer, and is changed only
by ``update_router_biases`` after each optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..config import ModelConfig


def _linear_weight(cfg: ModelConfig) -> nn.Parameter:
    """[experts, hidden], initialised as ``nn.Linear`` does (the seed's router was one), so
    a module built on its own draws the same numbers."""
    return nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False).weight


@dataclass
class Routing:
    """``chosen`` [N, k] expert ids and ``weights`` [N, k] (fp32) per token; ``scores``
    [N, E] are the router's per-expert probabilities or affinities, ``logits`` [N, E]."""

    chosen: torch.Tensor
    weights: torch.Tensor
    scores: torch.Tensor
    logits: torch.Tensor


class SoftmaxRouter(nn.Module):
    """The seed's: softmax over the experts, top-k, the k weights renormalised to sum to 1.
    Balanced by the Switch-style loss ``E · Σ f_i P_i`` plus a z-loss on the logits."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.aux_loss_coef = cfg.aux_loss_coef
        self.z_loss_coef = cfg.z_loss_coef
        self.weight = _linear_weight(cfg)

    def forward(self, tokens: torch.Tensor) -> Routing:
        logits = F.linear(tokens, self.weight).float()
        probs = logits.softmax(dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        return Routing(chosen, weights / weights.sum(dim=-1, keepdim=True), probs, logits)

    def losses(self, routing: Routing, counts: torch.Tensor,
               batch_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """(balance loss, z-loss), both weighted."""
        fraction = counts.float() / counts.sum()
        balance = self.num_experts * (fraction * routing.scores.mean(dim=0)).sum()
        z = torch.logsumexp(routing.logits, dim=-1).square().mean()
        return balance * self.aux_loss_coef, z * self.z_loss_coef


class SigmoidRouter(nn.Module):
    """DeepSeek-V3's: sigmoid affinities; experts chosen by affinity + ``expert_bias``
    (within the ``topk_group`` best of ``n_group`` groups when grouped); combine weights
    are the chosen affinities normalised to sum to 1, times ``routed_scaling_factor``.
    Computed in fp32, as transformers' DeepseekV3 does, so exported logits match."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.n_group = cfg.n_group
        self.topk_group = cfg.topk_group
        self.scale = cfg.routed_scaling_factor
        self.update_rate = cfg.bias_update_rate
        self.seq_aux_loss_coef = cfg.seq_aux_loss_coef
        self.weight = _linear_weight(cfg)
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))

    def forward(self, tokens: torch.Tensor) -> Routing:
        logits = F.linear(tokens.float(), self.weight.float())
        scores = logits.sigmoid()
        choice = scores.detach() + self.expert_bias
        if self.n_group > 1:
            choice = self._within_best_groups(choice)
        chosen = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, chosen)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) * self.scale
        return Routing(chosen, weights, scores, logits)

    def _within_best_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """``choice`` with every expert outside each token's best groups set to -inf; a
        group's score is the sum of its two best experts (DeepSeek-V3)."""
        grouped = choice.view(choice.shape[0], self.n_group, -1)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        best = group_scores.topk(self.topk_group, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        return grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)

    def losses(self, routing: Routing, counts: torch.Tensor,
               batch_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence-wise balance loss, 0): DeepSeek-V3's ``α Σ_i f_i P_i`` per sequence,
        f_i = E/(k·T) × tokens choosing i, P_i = mean normalised affinity; no z-loss."""
        zero = routing.logits.new_zeros(())
        if not self.seq_aux_loss_coef:
            return zero, zero
        rows, steps = batch_shape[0], routing.scores.shape[0] // batch_shape[0]
        picked = torch.zeros_like(routing.scores).scatter_(1, routing.chosen, 1.0)
        fraction = picked.view(rows, steps, -1).sum(1) * (self.num_experts
                                                          / (self.top_k * steps))
        share = routing.scores / routing.scores.sum(dim=-1, keepdim=True)
        per_seq = (fraction * share.view(rows, steps, -1).mean(1)).sum(-1)
        return per_seq.mean() * self.seq_aux_loss_coef, zero

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, enabled: torch.Tensor) -> None:
        """``bias += rate · sign(mean load − load)``: an overloaded expert becomes less
        likely to be chosen, an idle one more. ``enabled`` (0 or 1, a device tensor) lets a
        skipped step leave the bias alone without a host sync."""
        load = load.float()
        self.expert_bias += self.update_rate * torch.sign(load.mean() - load) * enabled


def build_router(cfg: ModelConfig) -> SoftmaxRouter | SigmoidRouter:
    return SigmoidRouter(cfg) if cfg.router == "sigmoid" else SoftmaxRouter(cfg)


def sigmoid_routers(model: nn.Module) -> list[SigmoidRouter]:
    """``model``'s sigmoid routers in layer order; ``model`` may be wrapped (DDP, FSDP,
    torch.compile)."""
    return [m for m in model.modules() if isinstance(m, SigmoidRouter)]


def update_router_biases(routers: list[SigmoidRouter], counts: torch.Tensor,
                         enabled: torch.Tensor) -> None:
    """Apply one step's expert loads ``counts`` [moe layers, experts] (summed over micro
    batches and ranks, so every rank moves its biases alike) to ``routers``; ``enabled``
    is 0 for a skipped step. A frozen router (``train.trainable: mtp``) keeps its bias:
    the model it routes for is not being trained."""
    for router, load in zip(routers, counts, strict=True):
        if router.weight.requires_grad:
            router.update_bias(load, enabled.to(load.device, torch.float32))
