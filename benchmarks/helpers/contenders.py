"""The models the throughput benchmark races, each with its own training step and decoder.

- ``ours``: deepseek-mini as ``train`` and ``generate`` run it — the trainer's step
  function (autocast per ``train.precision``, backward, gradient clipping, the fused AdamW
  of ``optim.build_optimizer``) and ``generation.generate`` with the latent cache.
- ``plain``: ``plain_model.PlainDeepSeekMini`` (the same model, normal(0, 0.02) weights),
  trained the way a first version is (``torch.optim.AdamW`` with its defaults, which on a
  CPU is the per-tensor loop) and decoded without a cache.
- ``hf``: transformers' ``DeepseekV3ForCausalLM`` at the same sizes (see ``hf_config``),
  trained with the fused AdamW that transformers' Trainer picks by default and decoded
  with its ``generate()``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from deepseek_mini import Config, DeepSeekMini
from deepseek_mini.config import ModelConfig
from deepseek_mini.interop.hf_layout import hf_config as exported_hf_config
from deepseek_mini.interop.hf_layout import native_blocker
from deepseek_mini.model.sizes import flops_per_token
from deepseek_mini.model.transformer import compile_model
from deepseek_mini.train.precision import Precision, setup_precision

TrainStep = Callable[[torch.Tensor], object]  # ids [B, T + 1] -> one optimizer step
Decode = Callable[[torch.Tensor, int], torch.Tensor]  # (prompt [B, P], new tokens) -> ids


@dataclass
class Contender:
    name: str
    model: nn.Module
    train_step: TrainStep
    decode: Decode
    train_flops_per_token: int
    notes: str
    precision: Precision | None = None


def build_ours(cfg: Config, name: str = "ours",
               compile_options: dict | None = None) -> Contender:
    """The trainer's own ``train_step`` on the model and optimizer it would build;
    ``compile_options`` go to ``torch.compile`` when ``train.compile`` is on (a backend
    other than inductor, say, where no C++ compiler should run)."""
    from deepseek_mini.inference.generate import generate
    from deepseek_mini.train import step as trainer
    from deepseek_mini.train.optim import build_optimizer

    precision = setup_precision(cfg.train)
    model = DeepSeekMini(cfg.model).to(precision.device)
    train_model = (compile_model(model, **(compile_options or {})) if cfg.train.compile
                   else model)
    optimizer = build_optimizer(model, cfg.train)
    t = cfg.train

    def train_step(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return trainer.train_step(train_model, optimizer, ids, t.micro_batch_size,
                                  t.grad_clip, precision)

    def decode(prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        return generate(model, prompt, max_new_tokens=new_tokens, temperature=0.0)

    optimizer_name = ("fused AdamW" if cfg.train.optimizer == "adamw"
                      else f"Muon (Newton-Schulz {cfg.train.muon_ns_precision}) + fused AdamW")
    notes = (f"{cfg.model.expert_activation} experts, {precision.describe()}, {optimizer_name}"
             + (", torch.compile" if cfg.train.compile else ""))
    return Contender(name, model, train_step, decode,
                     flops_per_token(cfg.model, cfg.data.seq_len), notes, precision)


def build_plain(cfg: Config) -> Contender:
    from .plain_model import PlainDeepSeekMini

    precision = setup_precision(cfg.train)
    model = PlainDeepSeekMini(cfg.model).to(precision.device)
    t = cfg.train
    optimizer = adamw(model, cfg)

    def train_step(ids: torch.Tensor) -> None:
        with precision.autocast():
            _, loss = model(ids[:, :-1], ids[:, 1:])
        _backward_and_step(loss, model, optimizer, precision, t.grad_clip)

    return Contender("plain", model, train_step, model.generate,
                     flops_per_token(cfg.model, cfg.data.seq_len),
                     "per-slot/per-expert loops, explicit softmax, no cache, default AdamW")


def hf_config(m: ModelConfig):
    """DeepseekV3 at our sizes: exactly our model where it is DeepSeek-V3's layout (what
    ``deepseek-mini export`` writes), else the nearest. For the seed's layout what cannot
    match: its MLA rebuilds K/V for every query head (``kv_b_proj``: latent → heads ×
    (nope + v)) where ours shares one KV head, and its RoPE runs on a separate
    ``qk_rope_head_dim`` slice (a third of the head, as in DeepSeek-V3's 64 of 192) carried
    next to the latent instead of over the whole head. Query and value heads keep our
    head_dim, so attention FLOPs per key are the same."""
    from transformers import DeepseekV3Config

    if native_blocker(m) is None:
        exact = exported_hf_config(m, bos_id=None, eos_id=None)
        return DeepseekV3Config(**{**exact, "eos_token_id": None, "pad_token_id": 0})
    head_dim = m.head_dim
    rope_dim = max(2, head_dim // 3 // 2 * 2)
    return DeepseekV3Config(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads, num_key_value_heads=m.num_heads,
        q_lora_rank=None, kv_lora_rank=m.kv_latent_dim, qk_rope_head_dim=rope_dim,
        qk_nope_head_dim=head_dim - rope_dim, v_head_dim=head_dim,
        n_routed_experts=m.num_experts, num_experts_per_tok=m.top_k,
        n_shared_experts=m.num_shared_experts, moe_intermediate_size=m.expert_hidden,
        intermediate_size=m.expert_hidden, first_k_dense_replace=0, n_group=1, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=1.0, hidden_act="silu",
        max_position_embeddings=m.max_position, rms_norm_eps=m.norm_eps,
        tie_word_embeddings=m.tie_embeddings, eos_token_id=None, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta})


def hf_flops_per_token(model: nn.Module, seq_len: int) -> int:
    """Ours' convention (sizes.py) applied to DeepseekV3's own weights: 6 FLOPs per
    matmul weight a token uses (routed experts counted top_k of n) plus attention."""
    c = model.config
    used = 0
    for name, p in model.named_parameters():
        if p.dim() < 2 or "embed_tokens" in name:
            continue
        share = c.num_experts_per_tok / c.n_routed_experts if ".experts." in name else 1.0
        used += p.numel() * share
    if c.tie_word_embeddings:
        used += model.lm_head.weight.numel()
    qk_head = c.qk_nope_head_dim + c.qk_rope_head_dim
    attention = 6 * c.num_hidden_layers * c.num_attention_heads * (qk_head + c.v_head_dim)
    return int(6 * used + attention * seq_len)


def build_hf(cfg: Config) -> Contender:
    from transformers import DeepseekV3ForCausalLM

    if cfg.model.expert_activation != "swiglu":
        raise ValueError("DeepseekV3's experts are SwiGLU: compare with "
                         "model.expert_activation=swiglu")
    precision = setup_precision(cfg.train)
    model = DeepseekV3ForCausalLM(hf_config(cfg.model)).to(precision.device)
    model.generation_config = copy.deepcopy(model.generation_config)
    model.generation_config.eos_token_id = None
    optimizer = adamw(model, cfg, fused=True)
    train_step = hf_train_step(model, optimizer, precision, cfg.train.grad_clip)

    def decode(prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        return model.generate(prompt, attention_mask=torch.ones_like(prompt),
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0)

    impl = model.config._experts_implementation
    notes = (f"transformers DeepseekV3, experts_implementation={impl}, "
             f"attn={model.config._attn_implementation}, fused AdamW, generate()")
    return Contender("hf", model, train_step, decode,
                     hf_flops_per_token(model, cfg.data.seq_len), notes)


def adamw(model: nn.Module, cfg: Config, fused: bool | None = None) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` at the config's rate, betas and weight decay (``fused`` None:
    torch's default, the per-tensor loop on a CPU)."""
    t = cfg.train
    return torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas),
                             weight_decay=t.weight_decay, fused=fused)


def hf_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, precision: Precision,
                  grad_clip: float) -> TrainStep:
    """One optimizer step of transformers' causal LM on ``ids`` (it shifts the labels
    itself), as a training loop around it would run."""
    def train_step(ids: torch.Tensor) -> None:
        inputs = ids[:, :-1]
        with precision.autocast():
            loss = model(input_ids=inputs, labels=inputs, use_cache=False).loss
        _backward_and_step(loss, model, optimizer, precision, grad_clip)

    return train_step


def _backward_and_step(loss: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer,
                       precision: Precision, grad_clip: float) -> None:
    """Backward, clip, step as a training loop without our trainer does it (the scaler is
    a pass-through unless the precision is fp16)."""
    scaler = precision.scaler
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
