"""deepseek-mini as a transformers model, for ``trust_remote_code=True``.

``deepseek-mini export`` copies this file into the exported folder as
``modeling_deepseek_mini.py`` for any layout transformers' own DeepseekV3 cannot express
(the seed's MLA, the softmax router, GELU experts, ...). It imports only torch and
transformers: whoever loads the folder need not install deepseek-mini. The weights keep
deepseek-mini's names under ``model.``, and the maths is the package's own (model/), in
plain form: no KV cache (the exported ``generation_config.json`` turns it off), experts
run one after another. It reproduces deepseek-mini's logits; speed is the package's job.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class DeepSeekMiniConfig(PretrainedConfig):
    """transformers' face of deepseek-mini's model config, kept whole in ``deepseek_mini``."""

    model_type = "deepseek_mini"

    def __init__(self, deepseek_mini: dict | None = None, **kwargs) -> None:
        self.deepseek_mini = dict(deepseek_mini or {})
        m = self.deepseek_mini
        self.vocab_size = m.get("vocab_size", 0)
        self.hidden_size = m.get("hidden_size", 0)
        self.num_hidden_layers = m.get("num_layers", 0)
        self.num_attention_heads = m.get("num_heads", 0)
        kwargs.setdefault("tie_word_embeddings", m.get("tie_embeddings", True))
        super().__init__(**kwargs)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rope_tables(dim: int, max_position: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.outer(torch.arange(max_position, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class LatentAttention(nn.Module):
    """The seed's MLA: K and V rebuilt from one latent, RoPE over the whole head."""

    def __init__(self, c: SimpleNamespace) -> None:
        super().__init__()
        self.heads, self.kv_heads = c.num_heads, c.num_kv_heads
        self.head_dim = c.hidden_size // c.num_heads
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * self.head_dim, bias=False)
        self.kv_down = nn.Linear(c.hidden_size, c.kv_latent_dim, bias=False)
        self.k_up = nn.Linear(c.kv_latent_dim, c.num_kv_heads * self.head_dim, bias=False)
        self.v_up = nn.Linear(c.kv_latent_dim, c.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_heads * self.head_dim, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, -1).transpose(1, 2)
        latent = self.kv_down(x)
        k = self.k_up(latent).view(b, t, self.kv_heads, -1).transpose(1, 2)
        v = self.v_up(latent).view(b, t, self.kv_heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin),
                                             v, attn_mask=mask,
                                             enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class LatentRopeAttention(nn.Module):
    """DeepSeek-V2/V3's MLA: normalised latent plus one shared, decoupled rope key."""

    def __init__(self, c: SimpleNamespace) -> None:
        super().__init__()
        self.heads = c.num_heads
        self.nope, self.rope, self.value = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.latent = c.kv_latent_dim
        q_width = c.num_heads * (self.nope + self.rope)
        self.q_lora = bool(c.q_lora_rank)
        if self.q_lora:
            self.q_down = nn.Linear(c.hidden_size, c.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(c.q_lora_rank, 1e-6)
            self.q_up = nn.Linear(c.q_lora_rank, q_width, bias=False)
        else:
            self.q_proj = nn.Linear(c.hidden_size, q_width, bias=False)
        self.kv_down = nn.Linear(c.hidden_size, self.latent + self.rope, bias=False)
        self.kv_norm = RMSNorm(self.latent, 1e-6)
        self.kv_up = nn.Linear(self.latent, c.num_heads * (self.nope + self.value), bias=False)
        self.o_proj = nn.Linear(c.num_heads * self.value, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_up(self.q_norm(self.q_down(x))) if self.q_lora else self.q_proj(x)
        q_nope, q_rope = q.view(b, t, self.heads, -1).transpose(1, 2).split(
            [self.nope, self.rope], dim=-1)
        latent, k_rope = self.kv_down(x).split([self.latent, self.rope], dim=-1)
        kv = self.kv_up(self.kv_norm(latent)).view(b, t, self.heads, -1).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.value], dim=-1)
        k_rope = apply_rope(k_rope[:, None], cos, sin).expand(-1, self.heads, -1, -1)
        q = torch.cat([q_nope, apply_rope(q_rope, cos, sin)], dim=-1)
        k = torch.cat([k_nope, k_rope], dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             scale=(self.nope + self.rope) ** -0.5)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, hidden: int, inner: int, activation: str) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, inner, bias=False)
        self.gate = nn.Linear(hidden, inner, bias=False) if activation == "swiglu" else None
        self.down = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        h = F.gelu(h) if self.gate is None else F.silu(self.gate(x)) * h
        return self.down(h)


class Router(nn.Module):
    """softmax: top-k of the softmax, renormalised. sigmoid: top-k of affinity + bias
    (within the best groups), the chosen affinities normalised and scaled."""

    def __init__(self, c: SimpleNamespace) -> None:
        super().__init__()
        self.c = c
        self.weight = nn.Parameter(torch.zeros(c.num_experts, c.hidden_size))
        if c.router == "sigmoid":
            self.register_buffer("expert_bias", torch.zeros(c.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.c
        if c.router == "softmax":
            probs = F.linear(x, self.weight).float().softmax(-1)
            weights, chosen = probs.topk(c.top_k, dim=-1)
            return weights / weights.sum(-1, keepdim=True), chosen
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.expert_bias
        if c.n_group > 1:
            grouped = choice.view(choice.shape[0], c.n_group, -1)
            best = grouped.topk(2, dim=-1).values.sum(-1).topk(c.topk_group, dim=-1).indices
            keep = torch.zeros(grouped.shape[:2], dtype=torch.bool).scatter_(1, best, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)
        chosen = choice.topk(c.top_k, dim=-1).indices
        weights = scores.gather(1, chosen)
        return weights / (weights.sum(-1, keepdim=True) + 1e-20) * c.routed_scaling_factor, chosen


class Experts(nn.Module):
    def __init__(self, c: SimpleNamespace) -> None:
        super().__init__()
        shape = (c.num_experts, c.hidden_size, c.expert_hidden)
        self.w_up = nn.Parameter(torch.zeros(shape))
        self.w_gate = nn.Parameter(torch.zeros(shape)) if c.expert_activation == "swiglu" else None
        self.w_down = nn.Parameter(torch.zeros(c.num_experts, c.expert_hidden, c.hidden_size))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor
                ) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in range(self.w_up.shape[0]):
            token, slot = torch.where(chosen == e)
            h = x[token] @ self.w_up[e]
            h = F.gelu(h) if self.w_gate is None else F.silu(x[token] @ self.w_gate[e]) * h
            y = (h @ self.w_down[e]) * weights[token, slot, None].to(x.dtype)
            out.index_add_(0, token, y)
        return out


class MoE(nn.Module):
    def __init__(self, c: SimpleNamespace) -> None:
        super().__init__()
        self.router = Router(c)
        self.experts = Experts(c)
        self.shared = (FeedForward(c.hidden_size, c.num_shared_experts * c.expert_hidden,
                                   c.expert_activation) if c.num_shared_experts else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        out = self.experts(tokens, *self.router(tokens))
        if self.shared is not None:
            out = out + self.shared(tokens)
        return out.view_as(x)


class DecoderLayer(nn.Module):
    def __init__(self, c: SimpleNamespace, index: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(c.hidden_size, c.norm_eps)
        self.attn = (LatentRopeAttention(c) if c.attention == "latent_rope"
                     else LatentAttention(c))
        self.moe_norm = RMSNorm(c.hidden_size, c.norm_eps)
        if index < c.first_k_dense:
            dense = c.dense_hidden or (c.top_k + c.num_shared_experts) * c.expert_hidden
            self.mlp = FeedForward(c.hidden_size, dense, c.expert_activation)
        else:
            self.moe = MoE(c)

    def forward(self, x, cos, sin, mask):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        ffn = self.mlp if hasattr(self, "mlp") else self.moe
        return x + ffn(self.moe_norm(x))


class DeepSeekMiniModel(nn.Module):
    def __init__(self, c: SimpleNamespace) -> None:
        super().__init__()
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c, i) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.norm_eps)
        rope_dim = (c.qk_rope_head_dim if c.attention == "latent_rope"
                    else c.hidden_size // c.num_heads)
        self.rope = (rope_dim, c.max_position, c.rope_theta)
        cos, sin = rope_tables(*self.rope)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def fill_rope_tables(self) -> None:
        """Recompute the tables: from_pretrained builds the model on the meta device and
        leaves buffers that are not in the file uninitialised."""
        cos, sin = rope_tables(*self.rope)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
                ) -> torch.Tensor:
        b, t = input_ids.shape
        valid = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).bool()
        positions = (valid.long().cumsum(-1) - 1).clamp_min(0)
        cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
        slot = torch.arange(t, device=input_ids.device)
        allowed = (slot[None, :] <= slot[:, None]) & valid[:, None, :]
        allowed |= torch.eye(t, dtype=torch.bool, device=input_ids.device)
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, allowed[:, None])
        return self.norm(x)


class DeepSeekMiniForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = DeepSeekMiniConfig
    base_model_prefix = "model"
    _tied_weights_keys = {"lm_head.weight": "model.embed.weight"}

    def __init__(self, config: DeepSeekMiniConfig) -> None:
        super().__init__(config)
        c = SimpleNamespace(**config.deepseek_mini)
        self.model = DeepSeekMiniModel(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def _init_weights(self, module: nn.Module) -> None:
        """Every weight comes from the exported file; only the RoPE tables are computed."""
        if isinstance(module, DeepSeekMiniModel):
            module.fill_rope_tables()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, logits_to_keep: int = 0,
                **kwargs) -> CausalLMOutputWithPast:
        hidden = self.model(input_ids, attention_mask)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                   labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


__all__ = ["DeepSeekMiniConfig", "DeepSeekMiniForCausalLM"]
