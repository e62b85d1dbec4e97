"""deepseek-mini's DeepSeek-V3 layout in transformers' ``DeepseekV3`` terms, both ways:
which configs it can express, its ``config.json``, and the weight names and shapes.

The weights are written as DeepSeek-V3's own checkpoints hold them (per-expert
``experts.{e}.gate_proj`` etc., RoPE dimensions interleaved), which is what transformers,
vLLM, SGLang and llama.cpp's converter read. RoPE here rotates halves (pair ``i`` with
``i + r/2``); DeepSeek pairs neighbours, so the rope rows of the query and of the rope key
are permuted on the way out and back: a permutation of rows, so the round trip is exact.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import UserError


def native_blocker(cfg: ModelConfig) -> str | None:
    """Why transformers' DeepseekV3 cannot hold this model (None: it can)."""
    needs = {"attention": "latent_rope", "router": "sigmoid", "expert_activation": "swiglu"}
    for key, value in needs.items():
        if getattr(cfg, key) != value:
            return f"model.{key} is {getattr(cfg, key)!r}, DeepseekV3 has {value!r}"
    if cfg.num_shared_experts < 1:
        return "DeepseekV3 always has a shared expert (model.num_shared_experts is 0)"
    if cfg.num_experts < 2:
        return "DeepseekV3's router needs at least 2 experts"
    return None


def hf_config(cfg: ModelConfig, bos_id: int | None, eos_id: int | None) -> dict[str, Any]:
    """``config.json`` of a native export (``native_blocker(cfg)`` is None)."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.dense_width, "moe_intermediate_size": cfg.expert_hidden,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads, "n_shared_experts": cfg.num_shared_experts,
        "n_routed_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k,
        "routed_scaling_factor": cfg.routed_scaling_factor, "norm_topk_prob": True,
        "n_group": cfg.n_group, "topk_group": cfg.topk_group,
        "first_k_dense_replace": cfg.first_k_dense, "kv_lora_rank": cfg.kv_latent_dim,
        "q_lora_rank": cfg.q_lora_rank or None, "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "qk_nope_head_dim": cfg.qk_nope_head_dim, "v_head_dim": cfg.v_head_dim,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_position,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_interleave": True, "attention_bias": False,
        # transformers drops attention probabilities at this rate when fine-tuning; an
        # import keeps its own config's model.dropout (a training-only key)
        "attention_dropout": cfg.dropout,
        "num_nextn_predict_layers": 0, "bos_token_id": bos_id, "eos_token_id": eos_id,
        "torch_dtype": "float32", "use_cache": True,
    }


# DeepseekV3 config.json key -> ModelConfig key, copied as they are.
_SAME = {"vocab_size": "vocab_size", "hidden_size": "hidden_size",
         "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
         "kv_lora_rank": "kv_latent_dim", "max_position_embeddings": "max_position",
         "n_routed_experts": "num_experts", "n_shared_experts": "num_shared_experts",
         "num_experts_per_tok": "top_k", "moe_intermediate_size": "expert_hidden",
         "rms_norm_eps": "norm_eps", "tie_word_embeddings": "tie_embeddings",
         "qk_nope_head_dim": "qk_nope_head_dim", "qk_rope_head_dim": "qk_rope_head_dim",
         "v_head_dim": "v_head_dim", "routed_scaling_factor": "routed_scaling_factor",
         "n_group": "n_group", "topk_group": "topk_group",
         "first_k_dense_replace": "first_k_dense"}


def model_config_from_hf(hf: dict[str, Any], base: ModelConfig, source: str) -> ModelConfig:
    """The ModelConfig of a DeepseekV3 ``config.json``: its architecture, with ``base``'s
    training-only keys (loss weights, bias update rate). Anything the model here cannot
    reproduce exactly is an error naming the key."""
    if hf.get("model_type") != "deepseek_v3":
        raise UserError(f"{source}: model_type is {hf.get('model_type')!r}, not 'deepseek_v3'")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    checks = {"hidden_act": (hf.get("hidden_act", "silu"), "silu"),
              "norm_topk_prob": (hf.get("norm_topk_prob", True), True),
              "attention_bias": (hf.get("attention_bias", False), False),
              "rope_parameters.rope_type": (rope.get("rope_type", rope.get("type", "default")),
                                            "default")}
    for key, (got, want) in checks.items():
        if got != want:
            raise UserError(f"{source}: {key} is {got!r}; only {want!r} is supported")
    values = {ours: hf[theirs] for theirs, ours in _SAME.items() if theirs in hf}
    values["q_lora_rank"] = hf.get("q_lora_rank") or 0
    values["rope_theta"] = float(rope.get("rope_theta", hf.get("rope_theta", base.rope_theta)))
    if values.get("first_k_dense", 0) and "intermediate_size" in hf:
        values["dense_hidden"] = hf["intermediate_size"]
    values.update(attention="latent_rope", router="sigmoid", expert_activation="swiglu")
    try:
        cfg = dataclasses.replace(base, **values)
        cfg.validate()
    except (TypeError, UserError) as exc:
        raise UserError(f"{source}: config.json does not fit model: {exc}") from None
    return cfg


def _rope_order(width: int) -> torch.Tensor:
    """Row order taking halves-layout rope dims to DeepSeek's interleaved pairs."""
    half = torch.arange(width // 2)
    return torch.stack([half, half + width // 2], dim=1).flatten()


def _permute_rope_rows(weight: torch.Tensor, groups: int, rope: int,
                       order: torch.Tensor) -> torch.Tensor:
    """Reorder the last ``rope`` rows of each of ``groups`` row blocks by ``order``."""
    blocks = weight.view(groups, -1, weight.shape[-1])
    rest = blocks.shape[1] - rope
    return torch.cat([blocks[:, :rest], blocks[:, rest:][:, order]], dim=1).reshape(
        weight.shape)


def _attention_names(cfg: ModelConfig) -> dict[str, str]:
    names = {"kv_down": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm",
             "kv_up": "kv_b_proj", "o_proj": "o_proj"}
    if cfg.q_lora_rank:
        names.update(q_down="q_a_proj", q_norm="q_a_layernorm", q_up="q_b_proj")
    else:
        names["q_proj"] = "q_proj"
    return names


_FFN = {"up": "up_proj", "gate": "gate_proj", "down": "down_proj"}


def to_hf(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict as DeepseekV3 tensors (fresh, contiguous: safetensors-ready)."""
    order = _rope_order(cfg.qk_rope_head_dim)
    out = {"model.embed_tokens.weight": state["embed.weight"],
           "model.norm.weight": state["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(cfg.num_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        out[theirs + "input_layernorm.weight"] = state[ours + "attn_norm.weight"]
        out[theirs + "post_attention_layernorm.weight"] = state[ours + "moe_norm.weight"]
        for a, b in _attention_names(cfg).items():
            w = state[f"{ours}attn.{a}.weight"]
            if a in ("q_proj", "q_up"):
                w = _permute_rope_rows(w, cfg.num_heads, cfg.qk_rope_head_dim, order)
            elif a == "kv_down":
                w = _permute_rope_rows(w, 1, cfg.qk_rope_head_dim, order)
            out[f"{theirs}self_attn.{b}.weight"] = w
        if i < cfg.first_k_dense:
            for a, b in _FFN.items():
                out[f"{theirs}mlp.{b}.weight"] = state[f"{ours}mlp.{a}.weight"]
            continue
        out[theirs + "mlp.gate.weight"] = state[ours + "moe.router.weight"]
        if cfg.router == "sigmoid":  # a softmax router (GGUF export) has no bias
            out[theirs + "mlp.gate.e_score_correction_bias"] = state[
                ours + "moe.router.expert_bias"]
        for a, b in _FFN.items():
            out[f"{theirs}mlp.shared_experts.{b}.weight"] = state[f"{ours}moe.shared.{a}.weight"]
            stacked = state[f"{ours}moe.experts.w_{a}"].transpose(1, 2)
            for e in range(cfg.num_experts):
                out[f"{theirs}mlp.experts.{e}.{b}.weight"] = stacked[e]
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def from_hf(cfg: ModelConfig, tensors: dict[str, torch.Tensor], interleaved: bool,
            expected: dict[str, torch.Size], source: str) -> dict[str, torch.Tensor]:
    """Our state dict from DeepseekV3 tensors (the inverse of ``to_hf``). ``expected``
    holds our keys' shapes; a missing key or a wrong shape names the first one."""
    order = _rope_order(cfg.qk_rope_head_dim)
    undo = order.argsort() if interleaved else torch.arange(cfg.qk_rope_head_dim)

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise UserError(f"{source}: no tensor {name}")
        return tensors[name]

    state = {"embed.weight": take("model.embed_tokens.weight"),
             "norm.weight": take("model.norm.weight")}
    state["lm_head.weight"] = (state["embed.weight"] if cfg.tie_embeddings
                               else take("lm_head.weight"))
    for i in range(cfg.num_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        state[ours + "attn_norm.weight"] = take(theirs + "input_layernorm.weight")
        state[ours + "moe_norm.weight"] = take(theirs + "post_attention_layernorm.weight")
        for a, b in _attention_names(cfg).items():
            w = take(f"{theirs}self_attn.{b}.weight")
            if a in ("q_proj", "q_up") and _fits(w, expected[f"{ours}attn.{a}.weight"]):
                w = _permute_rope_rows(w, cfg.num_heads, cfg.qk_rope_head_dim, undo)
            elif a == "kv_down" and _fits(w, expected[f"{ours}attn.{a}.weight"]):
                w = _permute_rope_rows(w, 1, cfg.qk_rope_head_dim, undo)
            state[f"{ours}attn.{a}.weight"] = w
        if i < cfg.first_k_dense:
            for a, b in _FFN.items():
                state[f"{ours}mlp.{a}.weight"] = take(f"{theirs}mlp.{b}.weight")
            continue
        state[ours + "moe.router.weight"] = take(theirs + "mlp.gate.weight")
        state[ours + "moe.router.expert_bias"] = take(theirs + "mlp.gate.e_score_correction_bias")
        for a, b in _FFN.items():
            state[f"{ours}moe.shared.{a}.weight"] = take(f"{theirs}mlp.shared_experts.{b}.weight")
        state.update(_experts_from_hf(cfg, tensors, ours, theirs, take))
    for key, shape in expected.items():
        got = state.get(key)
        if got is None or got.shape != shape:
            raise UserError(f"{source}: {key} should be {tuple(shape)}, the folder gives "
                            f"{None if got is None else tuple(got.shape)}")
    return {k: v.clone() for k, v in state.items()}


def _fits(w: torch.Tensor, shape: torch.Size) -> bool:
    return w.shape == shape  # a wrong shape is reported by the final check, not a view error


def _experts_from_hf(cfg: ModelConfig, tensors: dict[str, torch.Tensor], ours: str,
                     theirs: str, take) -> dict[str, torch.Tensor]:
    """Per-expert tensors (DeepSeek's checkpoints) or transformers 5's fused ones."""
    fused = f"{theirs}mlp.experts.gate_up_proj"
    if fused in tensors:
        gate, up = tensors[fused].chunk(2, dim=1)
        down = take(f"{theirs}mlp.experts.down_proj")
        return {f"{ours}moe.experts.w_gate": gate.transpose(1, 2),
                f"{ours}moe.experts.w_up": up.transpose(1, 2),
                f"{ours}moe.experts.w_down": down.transpose(1, 2)}
    return {f"{ours}moe.experts.w_{a}": torch.stack(
        [take(f"{theirs}mlp.experts.{e}.{b}.weight") for e in range(cfg.num_experts)]
    ).transpose(1, 2) for a, b in _FFN.items()}
