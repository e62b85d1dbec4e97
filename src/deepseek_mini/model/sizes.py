"""Model sizes from the config alone: parameters, active parameters, FLOPs, cache bytes.

Formulas (L layers, h hidden, V vocab, H heads, d head_dim, Hkv kv heads, c latent,
E routed experts, k top-k, S shared experts, f expert hidden, m = 3 for swiglu else 2):

- attention per layer: ``h·H·d (q) + h·c (latent) + 2·c·Hkv·d (k, v up) + H·d·h (out)``
- one expert: ``m·h·f``; MoE per layer: ``h·E (router) + (E + S)·m·h·f``
- norms: ``2·h`` per layer and ``h`` at the output
- total: ``V·h`` embedding (+ ``V·h`` head when untied) + layers + final norm
- active per token: total less the ``(E - k)`` experts each layer does not run
- training FLOPs per token: ``6·N_mm + 12·L·H·d·T`` where ``N_mm`` is the matmul
  parameters a token uses (active attention, router, k routed + S shared experts, and the
  ``V·h`` LM head; the embedding is a lookup) and ``T`` the sequence length — forward 2
  and backward 4 FLOPs per weight per token, plus QKᵀ and AV over ``T`` keys, not halved
  for causality (the PaLM convention).
- KV cache: ``c`` values per token per layer, 2 bytes each in 16-bit.
- MTP (``mtp_depth`` D), counted apart from the totals above: per module two norms
  ``2·h``, the projection ``2·h·h`` and one decoder layer (its MoE, or one expert-sized
  MLP for ``mtp_ffn: dense``); the embedding and head are shared. A draft costs the
  module's active matmul weights plus the ``V·h`` head.

With ``attention: latent_rope`` (n nope, r rope, v value dims, q rank q_r): attention is
``h·H·(n+r)`` (or ``h·q_r + q_r + q_r·H·(n+r)``) + ``h·(c+r) + c`` + ``c·H·(n+v)`` +
``H·v·h``, QKᵀ and AV cost ``6·L·H·(n+r+v)·T``, and the cache holds ``c + r`` values. The
first ``first_k_dense`` layers hold one dense MLP of ``dense_width`` instead of the MoE.

A trimmed head (``head_vocab`` N > 0, head.py) scores ``R = N + 1`` rows (N when N = V, no
"other" class) instead of V: its matmul weights are ``R·h`` wherever ``V·h`` stands above,
and it adds the "other" vector's ``h`` parameters (its rows are the embedding's, or the
untied head's, which keeps all V rows).
"""

from __future__ import annotations

from ..config import Config, ModelConfig


def attention_params(cfg: ModelConfig) -> int:
    h, d, c = cfg.hidden_size, cfg.head_dim, cfg.kv_latent_dim
    if cfg.attention == "latent_rope":
        heads, qk, r = cfg.num_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.q_lora_rank
        q = h * r + r + r * heads * qk if r else h * heads * qk
        kv = h * (c + cfg.qk_rope_head_dim) + c + c * heads * (cfg.qk_nope_head_dim
                                                              + cfg.v_head_dim)
        return q + kv + heads * cfg.v_head_dim * h
    return h * cfg.num_heads * d + h * c + 2 * c * cfg.num_kv_heads * d + cfg.num_heads * d * h


def dense_params(cfg: ModelConfig) -> int:
    """One leading dense layer's MLP."""
    mats = 3 if cfg.expert_activation == "swiglu" else 2
    return mats * cfg.hidden_size * cfg.dense_width


def expert_params(cfg: ModelConfig) -> int:
    mats = 3 if cfg.expert_activation == "swiglu" else 2
    return mats * cfg.hidden_size * cfg.expert_hidden


def moe_params(cfg: ModelConfig) -> int:
    experts = cfg.num_experts + cfg.num_shared_experts
    return cfg.hidden_size * cfg.num_experts + experts * expert_params(cfg)


def head_rows(cfg: ModelConfig) -> int:
    """The rows the LM head scores per token: V, or a trimmed head's kept ids + "other"."""
    if not cfg.head_vocab:
        return cfg.vocab_size
    return cfg.head_vocab + (cfg.head_vocab < cfg.vocab_size)


def total_params(cfg: ModelConfig) -> int:
    h = cfg.hidden_size
    moe_layers = cfg.num_layers - cfg.first_k_dense
    layers = (cfg.num_layers * (attention_params(cfg) + 2 * h) + moe_layers * moe_params(cfg)
              + cfg.first_k_dense * dense_params(cfg))
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * h
    other = h if 0 < cfg.head_vocab < cfg.vocab_size else 0
    return cfg.vocab_size * h + head + other + layers + h


def mtp_layer_params(cfg: ModelConfig, active: bool = False) -> int:
    """One MTP module's weights (``active``: those one token uses)."""
    h = cfg.hidden_size
    if cfg.mtp_ffn == "dense":
        ffn = expert_params(cfg)
    else:
        idle = (cfg.num_experts - cfg.top_k) * expert_params(cfg) if active else 0
        ffn = moe_params(cfg) - idle
    return 2 * h + 2 * h * h + attention_params(cfg) + ffn + 2 * h


def mtp_params(cfg: ModelConfig) -> int:
    return cfg.mtp_depth * mtp_layer_params(cfg)


def draft_cost(cfg: ModelConfig) -> float:
    """One MTP draft's matmul weights over one main decoding step's: the share of a step
    each guess costs on a device bound by reading weights."""
    return ((mtp_layer_params(cfg, active=True) + head_rows(cfg) * cfg.hidden_size)
            / matmul_params_per_token(cfg))


def active_params(cfg: ModelConfig) -> int:
    moe_layers = cfg.num_layers - cfg.first_k_dense
    idle = moe_layers * (cfg.num_experts - cfg.top_k) * expert_params(cfg)
    return total_params(cfg) - idle


def matmul_params_per_token(cfg: ModelConfig) -> int:
    experts = cfg.top_k + cfg.num_shared_experts
    moe = cfg.hidden_size * cfg.num_experts + experts * expert_params(cfg)
    moe_layers = cfg.num_layers - cfg.first_k_dense
    return (cfg.num_layers * attention_params(cfg) + moe_layers * moe
            + cfg.first_k_dense * dense_params(cfg) + head_rows(cfg) * cfg.hidden_size)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    if cfg.attention == "latent_rope":
        per_key = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim
        attention = 6 * cfg.num_layers * cfg.num_heads * per_key * seq_len
    else:
        attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    return 6 * matmul_params_per_token(cfg) + attention


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = 2) -> int:
    rope = cfg.qk_rope_head_dim if cfg.attention == "latent_rope" else 0
    return cfg.num_layers * (cfg.kv_latent_dim + rope) * bytes_per_value


def plain_kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = 2) -> int:
    """What a K/V cache of the same heads would hold, for comparison."""
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * bytes_per_value


# Memory lower bounds, in bytes by what they hold (memory.check_fits compares the sum
# with the machine): less than any run needs, so only configs that cannot fit are refused.

# Python's own objects for one decoder layer's modules and parameters, a lower bound:
# measured 33 KB a layer for the thinnest layer (two experts, none shared, hidden 8), so a
# config of ten million thin layers, tiny in weights, is refused rather than spending
# hundreds of gigabytes building modules.
MODULE_BYTES_PER_LAYER = 24 << 10


def model_memory(cfg: ModelConfig, bytes_per_value: int = 4) -> dict[str, int]:
    """What building the model holds: its weights (MTP included), the RoPE tables
    (cos and sin, fp32, ``max_position`` rows) and the layers' Python modules."""
    weights = (total_params(cfg) + mtp_params(cfg)) * bytes_per_value
    return {"the weights (model.vocab_size, hidden_size, num_layers, expert sizes)": weights,
            "the RoPE tables (model.max_position)": 2 * 4 * cfg.max_position * cfg.rope_dim,
            "the layers' modules (model.num_layers)":
                MODULE_BYTES_PER_LAYER * (cfg.num_layers + cfg.mtp_depth)}


def training_memory(cfg: Config, shards: int = 1) -> dict[str, int]:
    """``model_memory`` plus gradients and AdamW's two moments (fp32) of the trained
    weights, split over ``shards`` FSDP ranks; the global batch's token windows (int64);
    and what autograd keeps per token and layer, counted at 2 bytes a value (16-bit
    autocast) and only the widest tensors: the layer's input, attention output and norm
    inputs, the latent, each routed slot's input and every run expert's hidden units (a
    dense layer's MLP units instead); measured, about half of what bf16 keeps. With
    ``model.dropout``, attention takes SDPA's plain path, which keeps each head's
    probabilities over the window, their mask and the dropped ones."""
    m, t = cfg.model, cfg.train
    trained = mtp_params(m) if t.trainable == "mtp" else total_params(m) + mtp_params(m)
    common = 4 * m.hidden_size + m.kv_latent_dim
    if m.dropout:
        common += 3 * m.num_heads * cfg.data.seq_len
    moe = m.top_k * m.hidden_size + (m.top_k + m.num_shared_experts) * m.expert_hidden
    mtp = m.expert_hidden if m.mtp_ffn == "dense" else moe
    per_token = (m.num_layers + m.mtp_depth) * common + m.first_k_dense * m.dense_width \
        + (m.num_layers - m.first_k_dense) * moe + m.mtp_depth * mtp
    tokens = t.micro_batch_size * cfg.data.seq_len
    weights = model_memory(m)
    return {**{part: size // shards for part, size in weights.items()},
            "the gradients and AdamW state": 12 * trained // shards,
            "the batch (train.batch_size x data.seq_len)":
                8 * t.batch_size * (cfg.data.seq_len + 1) // shards,
            "the activations (train.micro_batch_size x data.seq_len)": 2 * per_token * tokens}


def report(cfg: Config) -> dict[str, int]:
    m = cfg.model
    return {
        "total_params": total_params(m),
        "active_params": active_params(m),
        "flops_per_token": flops_per_token(m, cfg.data.seq_len),
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(m),
        "kv_cache_bytes_per_token_without_mla": plain_kv_cache_bytes_per_token(m),
        "mtp_params": mtp_params(m),
        "head_rows": head_rows(m),
    }
