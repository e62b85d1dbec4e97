"""Mixture-of-Experts feed-forward: top-k token-wise routing over stacked experts.

Every routed expert's projection lives in one ``[num_experts, ...]`` parameter. Tokens are
dispatched by sorting their (token, slot) pairs by expert, so each expert runs one matrix
product over all of its tokens (``torch._grouped_mm`` where the device has it); no token
is dropped and nothing loops over tokens or slots. Shared experts see every token: S
shared experts of width h are one MLP of width S·h.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from torch import nn
from torch.nn import functional as F

from ..config import ModelConfig
from .router import build_router

GATHER_MAX_SLOTS = 64  # (token, slot) pairs up to which a compiled step gathers weights


@dataclass
class RouterStats:
    """What one MoE layer reports besides its output; tensors, so nothing syncs."""

    balance_loss: torch.Tensor
    z_loss: torch.Tensor
    expert_counts: torch.Tensor
    router_entropy: torch.Tensor


def activate(h: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """GELU for plain experts; SiLU(gate) * up for SwiGLU experts."""
    return F.gelu(h) if gate is None else F.silu(gate) * h


class FeedForward(nn.Module):
    """A dense MLP, used for the always-on shared experts."""

    def __init__(self, hidden: int, inner: int, activation: str) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, inner, bias=False)
        self.gate = nn.Linear(hidden, inner, bias=False) if activation == "swiglu" else None
        self.down = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate(x) if self.gate is not None else None
        return self.down(activate(self.up(x), gate))


@cache
def _grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs here (CPU: yes in recent PyTorch; CUDA: bf16 on
    Hopper and newer). Probed once per device type and dtype."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        a = torch.ones(16, 16, device=device_type, dtype=dtype)
        b = torch.ones(2, 16, 16, device=device_type, dtype=dtype)
        torch._grouped_mm(a, b, offs=torch.tensor([8, 16], device=device_type,
                                                   dtype=torch.int32))
        return True
    except (RuntimeError, NotImplementedError):
        return False


def _aligned(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """``_grouped_mm`` needs 16-byte row strides: widths that are multiples of 4 in fp32,
    8 in 16-bit (so an ``expert_hidden`` of 90 takes the loop)."""
    return all(size * x.element_size() % 16 == 0 for size in (x.shape[-1], weight.shape[-1]))


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` sorted by expert, ``counts[e]`` rows for expert e, times ``weight[e]``.

    Kept out of ``torch.compile`` graphs (``exclude_from_compile``): ``_grouped_mm``'s
    fake-tensor rule accepts only bf16 (fp32 training on the CPU failed to compile), and
    the fallback reads the counts.
    """
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    # No rows at all (an expert-parallel rank that receives none) takes the loop too:
    # ``_grouped_mm``'s backward fails on an empty input.
    if x.shape[0] and _grouped_mm_works(x.device.type, x.dtype) and _aligned(x, weight):
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        return torch._grouped_mm(x, weight, offs=offsets)
    # Fallback: one product per expert; reading the counts is the one host sync it needs.
    chunks = x.split(counts.tolist())
    return torch.cat([chunk @ weight[e] for e, chunk in enumerate(chunks)])


def exclude_from_compile() -> None:
    """Make torch.compile leave ``grouped_matmul`` to eager mode. Done when a model is
    compiled, not by decorating it: ``torch.compiler.disable`` imports torch._dynamo, which
    would add seconds to every command."""
    global grouped_matmul
    if not getattr(grouped_matmul, "_excluded_from_compile", False):
        grouped_matmul = torch.compiler.disable(grouped_matmul)
        grouped_matmul._excluded_from_compile = True


class RoutedExperts(nn.Module):
    """``num_experts`` MLPs whose weights are stacked into single tensors."""

    def __init__(self, num_experts: int, hidden: int, inner: int, activation: str) -> None:
        super().__init__()
        self.w_up = nn.Parameter(torch.empty(num_experts, hidden, inner))
        self.w_gate = (nn.Parameter(torch.empty(num_experts, hidden, inner))
                       if activation == "swiglu" else None)
        self.w_down = nn.Parameter(torch.empty(num_experts, inner, hidden))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        gate = grouped_matmul(x, self.w_gate, counts) if self.w_gate is not None else None
        return grouped_matmul(activate(grouped_matmul(x, self.w_up, counts), gate),
                              self.w_down, counts)

    def served_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Tokens per expert over every token these experts served in the last forward,
        which the balance loss weighs: ``counts`` itself here. An expert-parallel
        replacement (train/expert_parallel.py) serves its whole group's tokens and
        answers the group's counts."""
        return counts

    def one_token(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """One token ``x`` [1, in] through each of its chosen ``experts`` [k]: [k, out], one
        product per projection and expert on that expert's weight, without the sort,
        counts, scatter and grouped products of the general path (a batch-1 decoding
        step's MoE, which ``MoE`` sends here on a CPU only: reading the k ids is a host
        sync, cheap there and a stall on an accelerator)."""
        outs = []
        for e in experts.tolist():
            gate = x @ self.w_gate[e] if self.w_gate is not None else None
            outs.append(activate(x @ self.w_up[e], gate) @ self.w_down[e])
        return torch.cat(outs)

    def gathered(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Row ``i`` of ``x`` through expert ``experts[i]``, by batched products over the
        gathered weights (reads each row's expert once: right for a handful of rows)."""
        def product(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            return torch.bmm(rows[:, None], weight[experts])[:, 0]

        gate = product(x, self.w_gate) if self.w_gate is not None else None
        return product(activate(product(x, self.w_up), gate), self.w_down)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.router = build_router(cfg)
        self.experts = RoutedExperts(cfg.num_experts, cfg.hidden_size, cfg.expert_hidden,
                                     cfg.expert_activation)
        self.shared = (FeedForward(cfg.hidden_size, cfg.num_shared_experts * cfg.expert_hidden,
                                   cfg.expert_activation)
                       if cfg.num_shared_experts else None)

    def forward(self, x: torch.Tensor,
                with_stats: bool = True) -> tuple[torch.Tensor, RouterStats | None]:
        """The layer's output and, if ``with_stats``, its router statistics and losses
        (generation skips them: a dozen small ops per layer per decoded token)."""
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        routing = self.router(tokens)

        by_token, counts = self._expert_outputs(tokens, routing.chosen)
        # A weighted sum over the k slots: a reduction, where index_add_ would enter a
        # parallel region even for one token.
        out = (by_token * routing.weights.unsqueeze(-1).to(by_token.dtype)).sum(dim=1)
        if self.shared is not None:
            out = out + self.shared(tokens)
        stats = None
        if with_stats:
            if counts is None:  # the one-token path counts nothing
                counts = torch.bincount(routing.chosen.reshape(-1), minlength=self.num_experts)
            balance, z = self.router.losses(routing, self.experts.served_counts(counts),
                                            shape)
            probs = routing.scores / routing.scores.sum(dim=-1, keepdim=True)
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1).mean()
            stats = RouterStats(balance, z, counts.detach(), entropy.detach())
        return out.reshape(shape).to(x.dtype), stats

    def _expert_outputs(self, tokens: torch.Tensor,
                        chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each (token, slot)'s expert output [N, k, hidden] and the tokens per expert.

        Sorted by expert, each expert runs one product over its tokens. Under
        torch.compile a few slots (a decode step) gather their experts' weights instead:
        no data-dependent shapes, so the step stays one graph. On a CPU, experts with a
        ``one_token`` path (float and quantized ones) take a lone eager token (batch-1
        decoding; training never has one) through it, unsorted and uncounted (counts
        None)."""
        flat_expert = chosen.reshape(-1)
        one_token = getattr(self.experts, "one_token", None)
        if (one_token is not None and tokens.shape[0] == 1 and tokens.device.type == "cpu"
                and not torch.compiler.is_compiling()):
            return one_token(tokens, flat_expert)[None], None
        if torch.compiler.is_compiling() and flat_expert.numel() <= GATHER_MAX_SLOTS:
            slots = tokens.repeat_interleave(self.top_k, dim=0)
            counts = F.one_hot(flat_expert, self.num_experts).sum(0)
            return self.experts.gathered(slots, flat_expert).view(*chosen.shape, -1), counts
        order = flat_expert.argsort(stable=True)
        inverse = torch.empty_like(order).scatter_(
            0, order, torch.arange(order.numel(), device=order.device))
        counts = torch.bincount(flat_expert, minlength=self.num_experts)
        expert_out = self.experts(tokens[order // self.top_k], counts)
        # back to (token, slot) order: a gather
        return expert_out.index_select(0, inverse).view(*chosen.shape, -1), counts
