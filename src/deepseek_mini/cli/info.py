"""``deepseek-mini info``: sizes of a config, without building the model (no torch)."""

from __future__ import annotations

import argparse
import json

from ..config import Config, ModelConfig
from ..model.sizes import report


def attention(m: ModelConfig) -> str:
    """The attention's heads and cache as the layout builds them: the seed's heads are
    hidden_size / num_heads wide around a shared K/V latent; latent_rope's query and key
    heads are nope + rope wide, its values v_head_dim, and it caches the latent and the
    one rope key (num_kv_heads is unused)."""
    if m.attention == "latent_rope":
        query = f", query rank {m.q_lora_rank}" if m.q_lora_rank else ""
        return (f"{m.num_heads} heads x ({m.qk_nope_head_dim} + {m.qk_rope_head_dim} rope) "
                f"q/k, {m.v_head_dim} v{query}, latent {m.kv_latent_dim} + rope key "
                f"{m.qk_rope_head_dim}")
    return (f"{m.num_heads} heads x {m.head_dim}, {m.num_kv_heads} kv heads, latent "
            f"{m.kv_latent_dim}")


def run(args: argparse.Namespace) -> None:
    cfg = Config.from_yaml(args.config, args.set)
    sizes = report(cfg)
    if args.json:
        print(json.dumps(sizes))
        return
    m = cfg.model
    print(f"model: {m.num_layers} layers, hidden {m.hidden_size}, {attention(m)}, "
          + (f"dense MLP {m.expert_activation} {m.dense_width}"
             if m.first_k_dense >= m.num_layers else
             f"{m.num_experts} experts (top-{m.top_k}) + {m.num_shared_experts} shared, "
             f"{m.expert_activation} {m.expert_hidden}"))
    print(f"total parameters       {sizes['total_params']:>15,}")
    print(f"active per token       {sizes['active_params']:>15,}")
    print(f"train FLOPs per token  {sizes['flops_per_token']:>15,}  (seq len {cfg.data.seq_len})")
    print(f"KV cache per token     {sizes['kv_cache_bytes_per_token']:>15,} bytes (16-bit latents; "
          f"{sizes['kv_cache_bytes_per_token_without_mla']:,} as plain K/V)")
    if m.head_vocab:
        print(f"LM head rows scored    {sizes['head_rows']:>15,}  (of {m.vocab_size:,} ids: "
              f"model.head_vocab {m.head_vocab:,} kept, the rest one shared class)")
    if m.mtp_depth:
        print(f"MTP modules            {sizes['mtp_params']:>15,}  ({m.mtp_depth} x {m.mtp_ffn}; "
              "not in the totals above)")
