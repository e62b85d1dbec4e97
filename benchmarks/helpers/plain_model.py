"""The same model written plainly: the baseline the fast paths are measured and tested against.

This is deepseek-mini the way it is usually first written: attention by an explicit
softmax over ``QKᵀ`` with the KV heads repeated for every query head, the MoE as Python
loops over top-k slots and experts (a boolean mask and an index per pair), full-vocabulary
cross-entropy on the whole logits tensor, and generation that re-runs the whole sequence
each step (no cache). Parameter names and shapes are the package's, so
``PlainDeepSeekMini(cfg).load_state_dict(model.state_dict())`` gives the same function.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from deepseek_mini.config import ModelConfig
from deepseek_mini.model.rope import rope_tables


class PlainRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class PlainAttention(nn.Module):
    """MLA: latent → K, V heads → repeated to every query head → softmax(QKᵀ/√d + mask) V."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (cfg.num_heads, cfg.num_kv_heads,
                                                            cfg.head_dim)
        kv_width = cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.kv_down = nn.Linear(cfg.hidden_size, cfg.kv_latent_dim, bias=False)
        self.k_up = nn.Linear(cfg.kv_latent_dim, kv_width, bias=False)
        self.v_up = nn.Linear(cfg.kv_latent_dim, kv_width, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, steps, _ = x.shape
        q = self.q_proj(x).view(batch, steps, self.num_heads, self.head_dim).transpose(1, 2)
        latent = self.kv_down(x)
        k = self.k_up(latent).view(batch, steps, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_up(latent).view(batch, steps, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        repeat = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        future = torch.ones(steps, steps, dtype=torch.bool, device=x.device).triu(1)
        attn = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        return self.o_proj((attn @ v).transpose(1, 2).reshape(batch, steps, -1))


class PlainExperts(nn.Module):
    """Expert weights stacked as in the package (``[experts, in, out]``), used one by one."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        e, h, f = cfg.num_experts, cfg.hidden_size, cfg.expert_hidden
        self.w_up = nn.Parameter(torch.empty(e, h, f))
        self.w_gate = (nn.Parameter(torch.empty(e, h, f))
                       if cfg.expert_activation == "swiglu" else None)
        self.w_down = nn.Parameter(torch.empty(e, f, h))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        up = x @ self.w_up[e]
        inner = F.gelu(up) if self.w_gate is None else F.silu(x @ self.w_gate[e]) * up
        return inner @ self.w_down[e]


class PlainShared(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, f = cfg.hidden_size, cfg.num_shared_experts * cfg.expert_hidden
        self.up = nn.Linear(h, f, bias=False)
        self.gate = nn.Linear(h, f, bias=False) if cfg.expert_activation == "swiglu" else None
        self.down = nn.Linear(f, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.up(x)
        return self.down(F.gelu(up) if self.gate is None else F.silu(self.gate(x)) * up)


class PlainMoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = PlainExperts(cfg)
        self.shared = PlainShared(cfg) if cfg.num_shared_experts else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The output and this layer's weighted balance + z losses."""
        cfg = self.cfg
        tokens = x.reshape(-1, x.shape[-1])
        logits = self.router(tokens)
        probs = logits.softmax(dim=-1)
        weights, chosen = probs.topk(cfg.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(tokens)
        for slot in range(cfg.top_k):
            for e in range(cfg.num_experts):
                rows = (chosen[:, slot] == e).nonzero().squeeze(-1)
                if rows.numel():
                    out[rows] += weights[rows, slot, None] * self.experts.expert(e, tokens[rows])
        if self.shared is not None:
            out = out + self.shared(tokens)
        counts = torch.bincount(chosen.reshape(-1), minlength=cfg.num_experts).float()
        balance = cfg.num_experts * (counts / counts.sum() * probs.mean(dim=0)).sum()
        z = torch.logsumexp(logits, dim=-1).square().mean()
        return out.reshape(x.shape), balance * cfg.aux_loss_coef + z * cfg.z_loss_coef


class PlainLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = PlainRMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = PlainAttention(cfg)
        self.moe_norm = PlainRMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.moe = PlainMoE(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        moe_out, aux = self.moe(self.moe_norm(x))
        return x + moe_out, aux


class PlainDeepSeekMini(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(PlainLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = PlainRMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_position, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        with torch.no_grad():
            for p in self.parameters():
                if p.dim() > 1:
                    p.normal_(std=0.02)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, T, V] and, with targets, ``ce + aux`` as the package computes it."""
        steps = input_ids.shape[1]
        cos, sin = self.rope_cos[:steps], self.rope_sin[:steps]
        x = self.embed(input_ids)
        aux = x.new_zeros(())
        for layer in self.layers:
            x, layer_aux = layer(x, cos, sin)
            aux = aux + layer_aux
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits, None
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                             ignore_index=-100)
        return logits, ce + aux

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding, recomputing the whole sequence for every new token."""
        ids = prompt_ids
        for _ in range(max_new_tokens):
            logits, _ = self(ids)
            ids = torch.cat([ids, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
        return ids
