"""Warm start from SmolLM2: the loaders agree on a synthetic SmolLM2-shaped model written
here (a Hugging Face folder and a GGUF file), the preset's mapping computes the model's
function exactly, the reference-style mapping reports what it approximates, and what
cannot map fails with one clear line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from deepseek_mini import Config
from deepseek_mini.cli.main import main
from deepseek_mini.errors import UserError
from deepseek_mini.interop.smollm2 import (
    LlamaGeometry,
    SmolLM2Weights,
    gguf_to_hf_name,
    load_smollm2,
    read_gguf,
    read_hf_folder,
    unpermute_gguf_rows,
)
from deepseek_mini.interop.warm_start import format_table, rope_pair_placement, warm_start
from deepseek_mini.model.transformer import DeepSeekMini

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# SmolLM2's shape, shrunk: 4 query heads x 16, 2 K/V heads, SwiGLU 96, RoPE base 1e5.
GEOMETRY = LlamaGeometry(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, intermediate_size=96, rope_theta=100000.0,
                         norm_eps=1e-5, tie_embeddings=True)
# configs/smollm2-moe.yaml resized to GEOMETRY (latent = 64 / 1 = 2 x 2 x 16).
PRESET = ["model.vocab_size=128", "model.hidden_size=64", "model.num_layers=2",
          "model.num_heads=4", "model.num_kv_heads=2", "model.kv_latent_dim=64",
          "model.expert_hidden=96", "model.max_position=64"]
# What the reference model does to SmolLM2, at this size: another head count and size, one
# K/V head for query heads that used several, a latent narrower than K and V stacked, GELU
# experts, RoPE base 1e4.
REFERENCE = ["model.vocab_size=128", "model.hidden_size=64", "model.num_layers=2",
             "model.num_heads=8", "model.num_kv_heads=1", "model.kv_latent_dim=8",
             "model.expert_hidden=96", "model.max_position=64", "model.num_experts=4",
             "model.expert_activation=gelu", "model.rope_theta=10000"]


def synthetic_state(geo: LlamaGeometry = GEOMETRY, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in geo.expected_shapes().items():
        if len(shape) == 1:
            state[name] = 1.0 + 0.2 * torch.randn(shape, generator=gen)
        else:
            state[name] = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
    return state


def write_hf_folder(folder, state, geo: LlamaGeometry = GEOMETRY):
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
              "vocab_size": geo.vocab_size, "hidden_size": geo.hidden_size,
              "num_hidden_layers": geo.num_layers, "num_attention_heads": geo.num_heads,
              "num_key_value_heads": geo.num_kv_heads,
              "intermediate_size": geo.intermediate_size, "rope_theta": geo.rope_theta,
              "rms_norm_eps": geo.norm_eps, "tie_word_embeddings": geo.tie_embeddings,
              "head_dim": geo.head_dim}
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    return folder


def permute_like_llama_cpp(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute, written independently of the loader."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_gguf(path, state, geo: LlamaGeometry = GEOMETRY, quantized: bool = False):
    import gguf

    hf_to_gguf = {"model.embed_tokens.weight": "token_embd.weight",
                  "model.norm.weight": "output_norm.weight"}
    layer_names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                   "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                   "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                   "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down"}
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(geo.num_layers)
    writer.add_context_length(2048)
    writer.add_embedding_length(geo.hidden_size)
    writer.add_feed_forward_length(geo.intermediate_size)
    writer.add_head_count(geo.num_heads)
    writer.add_head_count_kv(geo.num_kv_heads)
    writer.add_rope_freq_base(geo.rope_theta)
    writer.add_layer_norm_rms_eps(geo.norm_eps)
    writer.add_rope_dimension_count(geo.head_dim)
    for name, tensor in state.items():
        if name.startswith("model.layers."):
            _, _, index, *rest = name.split(".")
            gguf_name = f"blk.{index}.{layer_names['.'.join(rest[:-1])]}.weight"
        else:
            gguf_name = hf_to_gguf[name]
        if "q_proj" in name:
            tensor = permute_like_llama_cpp(tensor, geo.num_heads)
        elif "k_proj" in name:
            tensor = permute_like_llama_cpp(tensor, geo.num_kv_heads)
        array = tensor.numpy().astype(np.float32)
        if quantized and array.ndim == 2:
            kind = (gguf.GGMLQuantizationType.Q8_0 if "token_embd" in gguf_name
                    else gguf.GGMLQuantizationType.Q4_1)
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_reference(state: dict[str, torch.Tensor], geo: LlamaGeometry,
                    ids: torch.Tensor) -> torch.Tensor:
    """A plain Llama forward (RMSNorm, rotate-half RoPE, GQA, SwiGLU), from HF names."""

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + geo.norm_eps) * weight

    def rope(x):  # x [B, H, T, D]
        d, steps = x.shape[-1], x.shape[-2]
        inv = 1.0 / geo.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        angles = torch.outer(torch.arange(steps, dtype=torch.float64), inv)
        cos = torch.cat([angles.cos(), angles.cos()], -1).float()
        sin = torch.cat([angles.sin(), angles.sin()], -1).float()
        half = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
        return x * cos + half * sin

    batch, steps = ids.shape
    d, heads, kv_heads = geo.head_dim, geo.num_heads, geo.num_kv_heads
    x = state["model.embed_tokens.weight"][ids]
    causal = torch.ones(steps, steps, dtype=torch.bool).tril()
    for i in range(geo.num_layers):
        p = f"model.layers.{i}."
        h = rms(x, state[p + "input_layernorm.weight"])
        q = (h @ state[p + "self_attn.q_proj.weight"].T).view(batch, steps, heads, d)
        k = (h @ state[p + "self_attn.k_proj.weight"].T).view(batch, steps, kv_heads, d)
        v = (h @ state[p + "self_attn.v_proj.weight"].T).view(batch, steps, kv_heads, d)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = rope(q), rope(k)
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        attn = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        x = x + attn.transpose(1, 2).reshape(batch, steps, -1) @ state[
            p + "self_attn.o_proj.weight"].T
        h = rms(x, state[p + "post_attention_layernorm.weight"])
        gate, up = (h @ state[p + f"mlp.{n}_proj.weight"].T for n in ("gate", "up"))
        x = x + (F.silu(gate) * up) @ state[p + "mlp.down_proj.weight"].T
    return rms(x, state["model.norm.weight"]) @ state["model.embed_tokens.weight"].T


@pytest.fixture
def weights() -> SmolLM2Weights:
    return SmolLM2Weights(GEOMETRY, synthetic_state(), "synthetic")


@pytest.fixture
def ids() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, GEOMETRY.vocab_size, (2, 24), generator=gen)


def preset(*extra: str):
    return Config.from_yaml(CONFIGS / "smollm2-moe.yaml", [*PRESET, *extra]).model


def test_hf_folder_loads_as_written(tmp_path):
    state = synthetic_state()
    loaded = read_hf_folder(write_hf_folder(tmp_path / "smol", state))
    assert loaded.geometry == GEOMETRY
    assert loaded.state.keys() == state.keys()
    assert all(torch.equal(loaded.state[k], state[k]) for k in state)


def test_gguf_names_map_to_hugging_face_names():
    assert gguf_to_hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert gguf_to_hf_name("output_norm.weight") == "model.norm.weight"
    assert gguf_to_hf_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert gguf_to_hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert gguf_to_hf_name("blk.12.ffn_norm.weight") == (
        "model.layers.12.post_attention_layernorm.weight")
    assert gguf_to_hf_name("blk.0.attn_q.bias") is None
    assert gguf_to_hf_name("rope_freqs.weight") is None


def test_unpermute_inverts_llama_cpp_permutation():
    weight = torch.randn(6 * 8, 5)
    assert torch.equal(unpermute_gguf_rows(permute_like_llama_cpp(weight, 6), 6), weight)
    assert not torch.equal(permute_like_llama_cpp(weight, 6), weight)


def test_gguf_file_gives_the_hugging_face_layout(tmp_path):
    state = synthetic_state()
    loaded = read_gguf(write_gguf(tmp_path / "smol.gguf", state))
    assert loaded.geometry == GEOMETRY
    assert loaded.state.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.allclose(loaded.state[name], tensor, atol=1e-6), name


def test_quantized_gguf_dequantises_close_to_the_original(tmp_path):
    state = synthetic_state()
    loaded = read_gguf(write_gguf(tmp_path / "smol-q.gguf", state, quantized=True))
    embed = "model.embed_tokens.weight"
    assert (loaded.state[embed] - state[embed]).abs().max() < 0.02  # Q8_0
    q = "model.layers.1.self_attn.q_proj.weight"
    relative = (loaded.state[q] - state[q]).norm() / state[q].norm()
    assert 0 < relative < 0.2  # Q4_1: lossy, but the rows are where they belong


def test_preset_mapping_computes_smollm2s_function(weights, ids):
    result = warm_start(preset("model.num_experts=4", "model.top_k=2"), weights, seed=0)
    assert result.function_preserving, result.approximations
    result.model.eval()
    with torch.no_grad():
        ours = result.model(ids).logits
        reference = llama_reference(weights.state, GEOMETRY, ids)
    assert torch.allclose(ours, reference, atol=1e-4), (ours - reference).abs().max()


def test_preset_mapping_is_exact_for_any_routing(weights, ids):
    """Top-1 of 3 experts, 2 shared experts, and a router pushed hard: still exact."""
    result = warm_start(preset("model.num_experts=3", "model.top_k=1",
                               "model.num_shared_experts=2"), weights, seed=0)
    with torch.no_grad():
        for layer in result.model.layers:
            layer.moe.router.weight.normal_(std=3.0)
        ours = result.model.eval()(ids).logits
    assert torch.allclose(ours, llama_reference(weights.state, GEOMETRY, ids), atol=1e-4)


def test_latent_from_svd_is_exact_when_k_and_v_fit(ids):
    """A latent narrower than K and V stacked, but K/V of low enough rank: the SVD path
    loses nothing, and the result is function-preserving."""
    state = synthetic_state()
    gen = torch.Generator().manual_seed(2)
    for i in range(GEOMETRY.num_layers):
        for proj in ("k_proj", "v_proj"):  # rank 8 each: 16 in all, the latent's width
            name = f"model.layers.{i}.self_attn.{proj}.weight"
            rows, hidden = state[name].shape
            state[name] = (torch.randn(rows, 8, generator=gen)
                           @ torch.randn(8, hidden, generator=gen)) / 8
    weights = SmolLM2Weights(GEOMETRY, state, "low-rank")
    result = warm_start(preset("model.kv_latent_dim=16"), weights)  # latent 16 < 64 rows
    assert result.function_preserving, result.approximations
    rows = {r.target: r for r in result.rows}
    assert "truncated SVD" in rows["layers.0.attn.kv_down.weight"].how
    with torch.no_grad():
        ours = result.model.eval()(ids).logits
    assert torch.allclose(ours, llama_reference(state, GEOMETRY, ids), atol=1e-4)


def test_a_lossy_latent_is_reported_and_the_experts_get_noise(weights):
    result = warm_start(preset("model.kv_latent_dim=16"), weights)  # latent 16 < 64 rows
    assert not result.function_preserving
    assert len(result.approximations) == 1 and "SVD keeps" in result.approximations[0]
    routed = result.model.layers[0].moe.experts.w_gate
    assert not torch.equal(routed[0], routed[1])


def test_reference_mapping_accounts_for_every_tensor(weights, ids):
    cfg = Config.from_yaml(CONFIGS / "base.yaml", REFERENCE).model
    result = warm_start(cfg, weights, seed=0)
    model = result.model
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    assert {r.target for r in result.rows} == names
    rows = {r.target: r for r in result.rows}
    assert rows["embed.weight"].status == "copied"
    assert torch.equal(model.embed.weight, weights.state["model.embed_tokens.weight"])
    assert torch.equal(model.layers[1].moe_norm.weight,
                       weights.state["model.layers.1.post_attention_layernorm.weight"])
    assert rows["layers.0.attn.kv_down.weight"].status == "derived"
    assert rows["layers.0.moe.router.weight"].status == "random"
    assert not result.function_preserving
    approximations = " ".join(result.approximations)
    for topic in ("query heads", "RoPE", "mean pooling", "gelu", "SVD"):
        assert topic in approximations
    routed = model.layers[0].moe.experts.w_up
    assert not torch.equal(routed[0], routed[1])  # noise lets the experts diverge
    table = format_table(result)
    assert "layers.*.attn.kv_down.weight" in table and "function-preserving: no" in table
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_rope_pairs_placed_by_frequency():
    assert torch.equal(rope_pair_placement(16, 16, 1e5, 1e5), torch.eye(16))
    placement = rope_pair_placement(64, 72, 1e5, 1e5)  # target pair i ~ 1.125 x source pair j
    assert placement.shape == (72, 64)
    assert torch.equal(placement.sum(dim=0), torch.ones(64))  # every source dim placed once
    assert placement.sum(dim=1).max() == 1  # never two on one target dim
    targets = placement[:36, :32].argmax(dim=0)
    assert ((targets - torch.arange(32) * 1.125).abs() <= 0.5).all()  # the nearest pair
    assert torch.equal(placement[36:, 32:], placement[:36, :32])  # both halves of a pair
    fewer = rope_pair_placement(72, 64, 1e4, 1e4)  # narrower target: 32 of 36 pairs kept
    assert fewer.sum() == 64 and fewer.sum(dim=1).max() == 1


def test_shapes_that_cannot_map_name_the_key(weights):
    for key, value in (("hidden_size", 32), ("num_layers", 3), ("vocab_size", 100),
                       ("expert_hidden", 64)):
        cfg = preset(f"model.{key}={value}")
        with pytest.raises(UserError, match=f"model.{key}"):
            warm_start(cfg, weights)


def test_no_source_available_is_a_user_error(monkeypatch, tmp_path):
    import deepseek_mini.interop.smollm2 as smollm2

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(smollm2, "_hub_folder", lambda repo_id: None)
    monkeypatch.setattr(smollm2, "smollm2_gguf_path", lambda: None)
    with pytest.raises(UserError, match="SmolLM2-135M weights not found"):
        load_smollm2()
    with pytest.raises(UserError, match="no such folder or file"):
        load_smollm2(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="not in the local cache"):
        load_smollm2("someone/not-cached")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_smollm2(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(UserError, match=".gguf"):
        load_smollm2(str(tmp_path / "weights.bin"))
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(UserError, match="bad.gguf"):
        load_smollm2(str(tmp_path / "bad.gguf"))


def test_folder_with_wrong_shapes_is_a_user_error(tmp_path):
    state = synthetic_state()
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(95, 64)
    folder = write_hf_folder(tmp_path / "smol", state)
    with pytest.raises(UserError, match="model.layers.1.mlp.up_proj.weight"):
        read_hf_folder(folder)


def test_cli_writes_a_loadable_checkpoint(tmp_path, ids, capsys):
    state = synthetic_state()
    folder = write_hf_folder(tmp_path / "smol", state)
    out = tmp_path / "warm.pt"
    sets = [arg for item in PRESET for arg in ("--set", item)]
    code = main(["warm-start", "--config", str(CONFIGS / "smollm2-moe.yaml"), *sets,
                 "--out", str(out), "--source", str(folder)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "function-preserving: yes" in printed and str(out) in printed
    model = DeepSeekMini.from_checkpoint(out).eval()
    with torch.no_grad():
        ours = model(ids).logits
    assert torch.allclose(ours, llama_reference(state, GEOMETRY, ids), atol=1e-4)


def test_cli_reports_a_missing_source(tmp_path, capsys):
    code = main(["warm-start", "--config", str(CONFIGS / "smollm2-moe.yaml"), "--out",
                 str(tmp_path / "w.pt"), "--source", str(tmp_path / "nowhere")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "nowhere" in err and "Traceback" not in err
    assert not (tmp_path / "w.pt").exists()
