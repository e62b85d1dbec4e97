"""deepseek-mini's DeepSeek-V3 layout in llama.cpp's ``deepseek2`` terms: which configs it
can hold, its metadata keys, and its tensors.

The tensors start from hf_layout.py's DeepseekV3 names and RoPE order (what llama.cpp's
own converter reads: llama.cpp's ``deepseek2`` rotates neighbouring pairs, as DeepSeek's
checkpoints are laid out) and take llama.cpp's names from the gguf package's own name
map. As the converter does, the routed experts become one ``[experts, out, in]`` tensor
per projection, and ``kv_b_proj`` is split into ``attn_k_b`` (transposed: it multiplies
the query's no-rope part) and ``attn_v_b`` (it multiplies the attended latent): llama.cpp
runs MLA absorbed, over a cache of the latent and the rope key, as our decoding does.

What llama.cpp's loader would read differently is refused (``gguf_blocker``), one option
at a time; the README lists how every model option maps.
"""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np
import torch

from ..config import ModelConfig
from .hf_layout import to_hf

ARCH = gguf.MODEL_ARCH.DEEPSEEK2
# llama.cpp takes a deepseek2 of these depths for DeepSeek-V2-Lite and then never reads
# attention.q_lora_rank (its loader, load_arch_hparams).
LITE_LAYER_COUNTS = (26, 27)
QTYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
          "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


def gguf_blocker(cfg: ModelConfig) -> str | None:
    """Why llama.cpp's ``deepseek2`` cannot run this model as we do (None: it can)."""
    if cfg.attention != "latent_rope":
        return (f"model.attention is {cfg.attention!r} (RoPE applied to the rebuilt key), "
                "which llama.cpp has no architecture for; the layout that exports is "
                "model.attention: latent_rope")
    if cfg.expert_activation != "swiglu":
        return (f"model.expert_activation is {cfg.expert_activation!r}; llama.cpp's "
                "deepseek2 runs SwiGLU experts and dense layers (model.expert_activation: "
                "swiglu)")
    if cfg.num_shared_experts < 1:
        return ("model.num_shared_experts is 0; llama.cpp's deepseek2 always runs a shared "
                "expert")
    if cfg.q_lora_rank and cfg.num_layers in LITE_LAYER_COUNTS:
        return (f"llama.cpp reads a {cfg.num_layers}-layer deepseek2 as DeepSeek-V2-Lite and "
                "ignores its model.q_lora_rank: use another model.num_layers or "
                "model.q_lora_rank: 0")
    return None


def gguf_metadata(cfg: ModelConfig) -> dict[str, Any]:
    """The ``deepseek2.*`` keys, by the GGUFWriter method that writes each."""
    sigmoid = cfg.router == "sigmoid"
    return {
        "add_block_count": cfg.num_layers, "add_context_length": cfg.max_position,
        "add_embedding_length": cfg.hidden_size, "add_feed_forward_length": cfg.dense_width,
        "add_head_count": cfg.num_heads,
        # absorbed MLA is multi-query attention over the latent: one "head" of width
        # latent + rope for keys, latent for values
        "add_head_count_kv": 1,
        "add_key_length": cfg.kv_latent_dim + cfg.qk_rope_head_dim,
        "add_value_length": cfg.kv_latent_dim,
        "add_key_length_mla": cfg.qk_nope_head_dim + cfg.qk_rope_head_dim,
        "add_value_length_mla": cfg.v_head_dim,
        "add_q_lora_rank": cfg.q_lora_rank, "add_kv_lora_rank": cfg.kv_latent_dim,
        "add_rope_dimension_count": cfg.qk_rope_head_dim, "add_rope_freq_base": cfg.rope_theta,
        "add_layer_norm_rms_eps": cfg.norm_eps, "add_vocab_size": cfg.vocab_size,
        "add_leading_dense_block_count": cfg.first_k_dense,
        "add_expert_count": cfg.num_experts, "add_expert_used_count": cfg.top_k,
        "add_expert_shared_count": cfg.num_shared_experts,
        "add_expert_feed_forward_length": cfg.expert_hidden,
        "add_expert_group_count": cfg.n_group, "add_expert_group_used_count": cfg.topk_group,
        "add_expert_weights_norm": True,  # both routers renormalise the chosen weights
        "add_expert_weights_scale": cfg.routed_scaling_factor if sigmoid else 1.0,
        "add_expert_gating_func": (gguf.ExpertGatingFuncType.SIGMOID if sigmoid
                                   else gguf.ExpertGatingFuncType.SOFTMAX),
    }


def gguf_tensors(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """llama.cpp's tensors (fp32 numpy, numpy's row-major shapes) from our state dict."""
    names = gguf.get_tensor_name_map(ARCH, cfg.num_layers)
    out: dict[str, np.ndarray] = {}
    for name, tensor in _merged(cfg, to_hf(cfg, state)).items():
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:  # an internal bug: hf_layout grew a tensor the map lacks
            raise KeyError(f"no llama.cpp name for {name}")
        out[gguf_name] = tensor.numpy()
    return out


def _merged(cfg: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DeepseekV3 tensors with each layer's experts stacked and ``kv_b_proj`` split."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in hf.items():
        if ".mlp.experts." in name:
            continue
        if name.endswith("kv_b_proj.weight"):
            kv = tensor.view(cfg.num_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, -1)
            k_b, v_b = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=1)
            out[name.replace("kv_b_proj", "k_b_proj")] = k_b.transpose(1, 2).contiguous()
            out[name.replace("kv_b_proj", "v_b_proj")] = v_b.contiguous()
            continue
        # the gguf map knows the bias as the converter renames it
        out[name.replace("e_score_correction_bias", "e_score_correction.bias")] = tensor
    for i in range(cfg.first_k_dense, cfg.num_layers):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            prefix = f"model.layers.{i}.mlp.experts."
            out[f"{prefix}{proj}.weight"] = torch.stack(  # popped: freed as stacked
                [hf.pop(f"{prefix}{e}.{proj}.weight") for e in range(cfg.num_experts)])
    return out


# llama.cpp multiplies these per head, as 3-D weights, by a permuted (non-contiguous) view
# of the query or of the attention output. On Intel Xeons with AMX its CPU backend puts
# every f16 or q8_0 weight whose shapes fit its tiles into its AMX buffer, probing with a
# contiguous input at load; the AMX kernels take only contiguous inputs, and a weight in
# that buffer has no other backend, so decoding aborts ("GGML_ASSERT(*cur_backend_id !=
# -1)"; of a 3-D q8_0 weight it would also pack the first head only). f32 never goes there.
PER_HEAD = ("attn_k_b.weight", "attn_v_b.weight")
AMX_TYPES = ("f16", "q8_0")  # the --dtype values whose tensors llama.cpp's AMX buffer takes
Q8_BLOCK = 32


def storage_type(name: str, array: np.ndarray, dtype: str) -> gguf.GGMLQuantizationType:
    """How one tensor is stored at ``--dtype``: vectors (norms, the router's bias) and the
    router stay f32, as llama.cpp's converter keeps them and our router computes; the
    per-head attention weights stay f32 in the types llama.cpp's AMX buffer would take
    (``PER_HEAD``). q8_0 blocks are 32 values of a row, so a row of another length falls
    back to f16, again as the converter does; so does a row of exactly one block, which
    llama.cpp's AMX int8 kernel gets wrong in batches of 32 rows (the block's products are
    added to an output it never cleared: garbage or NaN logits in a prompt of 32 tokens or
    more), while f16 runs there through a float kernel."""
    if array.ndim == 1 or name.endswith("ffn_gate_inp.weight"):
        return gguf.GGMLQuantizationType.F32
    if dtype in AMX_TYPES and name.endswith(PER_HEAD):
        return gguf.GGMLQuantizationType.F32
    if dtype == "q8_0" and (array.shape[-1] % Q8_BLOCK or array.shape[-1] == Q8_BLOCK):
        return gguf.GGMLQuantizationType.F16
    return QTYPES[dtype]
