"""Export to transformers and import back: transformers' own DeepseekV3 (no custom code)
for DeepSeek-V3's layout, a shipped modeling file for any other; same logits within 1e-4,
same greedy tokens, and a bit-identical round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from tiny_run import SMALL_MODEL, TINY_YAML, VOCAB, small_config, tiny_overrides

from deepseek_mini import Config
from deepseek_mini.checkpoint import weights_checkpoint
from deepseek_mini.cli.main import main
from deepseek_mini.errors import UserError
from deepseek_mini.files import atomic_save
from deepseek_mini.inference.generate import generate
from deepseek_mini.interop.hf_export import export
from deepseek_mini.interop.hf_import import import_deepseek_v3
from deepseek_mini.model.transformer import DeepSeekMini

V3 = {"attention": "latent_rope", "router": "sigmoid", "expert_activation": "swiglu",
      "qk_nope_head_dim": 12, "qk_rope_head_dim": 8, "v_head_dim": 12, "q_lora_rank": 24,
      "kv_latent_dim": 20, "num_experts": 8, "top_k": 3, "n_group": 4, "topk_group": 2,
      "routed_scaling_factor": 2.5, "first_k_dense": 1, "dense_hidden": 40, "num_layers": 3}
SEED = {}
REMOTE = {"attention": "latent_rope", "router": "softmax", "expert_activation": "gelu",
          "tie_embeddings": False, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
          "v_head_dim": 8, "num_shared_experts": 0}


@pytest.fixture(scope="module")
def tokenizer_overrides(tmp_path_factory) -> list[str]:
    return [o for o in tiny_overrides(tmp_path_factory.mktemp("tok"))
            if o.startswith(("data.tokenizer", "data.cache_dir"))]


def checkpoint(tmp_path: Path, overrides: list[str], model: dict, seed: int = 0
               ) -> tuple[Path, DeepSeekMini]:
    """A checkpoint of a model with lively random weights (and router biases)."""
    keys = {**SMALL_MODEL, "vocab_size": VOCAB, **model}
    cfg = Config.from_yaml(TINY_YAML, [*(f"model.{k}={v}" for k, v in keys.items()),
                                       *overrides])
    torch.manual_seed(seed)
    net = DeepSeekMini(cfg.model).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * (0.05 if p.dim() > 1 else 0.1))
        for name, b in net.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(torch.randn_like(b) * 0.05)
    path = tmp_path / "model.pt"
    atomic_save(weights_checkpoint(net.state_dict(), cfg.to_dict()), path)
    return path, net


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :1] = 0
    return ids, mask


def check_same_model(net: DeepSeekMini, hf, greedy: bool) -> None:
    ids, mask = prompts()
    with torch.no_grad():
        ours = net(ids, attention_mask=mask).logits
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(theirs[real], ours[real], atol=1e-4, rtol=0)
    want = generate(net, ids, max_new_tokens=12, attention_mask=mask)
    got = hf.generate(ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12,
                      do_sample=False)
    if greedy:
        assert torch.equal(got, want)
    else:
        assert got.shape == want.shape


def test_v3_layout_exports_as_native_deepseek_v3(tmp_path, tokenizer_overrides):
    path, net = checkpoint(tmp_path, tokenizer_overrides, V3)
    assert main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and "auto_map" not in config
    assert not (tmp_path / "hf" / "modeling_deepseek_mini.py").exists()
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    check_same_model(net, hf, greedy=True)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.eos_token == "<|endoftext|>"


@pytest.mark.parametrize("model", [SEED, REMOTE], ids=["seed", "latent_rope-softmax-gelu"])
def test_other_layouts_export_with_remote_code(tmp_path, tokenizer_overrides, model):
    path, net = checkpoint(tmp_path, tokenizer_overrides, model)
    result = export(path, tmp_path / "hf")
    assert not result.native and result.why_not_native
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", trust_remote_code=True).eval()
    check_same_model(net, hf, greedy=True)


def test_import_round_trip_is_bit_identical(tmp_path, tokenizer_overrides):
    path, net = checkpoint(tmp_path, tokenizer_overrides, V3)
    export(path, tmp_path / "hf")
    back = import_deepseek_v3(tmp_path / "hf", small_config(vocab_size=VOCAB).model)
    assert back.config == net.config
    for (name, a), b in zip(net.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    out = tmp_path / "warm.pt"
    assert main(["warm-start", "--source", str(tmp_path / "hf"), "--out", str(out)]) == 0
    warm = DeepSeekMini.from_checkpoint(out)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                 warm.state_dict().values(), strict=True))


def test_import_names_the_first_tensor_that_does_not_fit(tmp_path, tokenizer_overrides):
    from safetensors.torch import load_file, save_file

    path, _ = checkpoint(tmp_path, tokenizer_overrides, V3)
    export(path, tmp_path / "hf")
    file = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(str(file))
    tensors["model.layers.1.self_attn.kv_b_proj.weight"] = torch.zeros(5, 20)
    save_file(tensors, str(file))
    with pytest.raises(UserError, match=r"layers\.1\.attn\.kv_up\.weight should be"):
        import_deepseek_v3(tmp_path / "hf", small_config().model)
    del tensors["model.layers.1.self_attn.kv_b_proj.weight"]
    save_file(tensors, str(file))
    with pytest.raises(UserError, match=r"no tensor model\.layers\.1\.self_attn\.kv_b_proj"):
        import_deepseek_v3(tmp_path / "hf", small_config().model)


def test_export_refuses_a_folder_with_files(tmp_path, tokenizer_overrides, capsys):
    path, _ = checkpoint(tmp_path, tokenizer_overrides, SEED)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    assert main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "hf")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "hf" / "keep.txt").read_text() == "mine"
