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


@pytest.mark.parametrize("model", [V3, SEED], ids=["native", "remote-code"])
def test_the_export_reproduces_the_prompt_convention(tmp_path, tokenizer_overrides, model):
    """Fixed bug: every prompt follows <|endoftext|> (inference/prompts.py), but the export
    said add_bos_token false, so transformers' generate on tokenizer(prompt) wrote other
    text than ours. The exported tokenizer now adds it, pads on the left with it, and
    generate on its output is ours token for token, text included."""
    import tokenizers

    from deepseek_mini.data.tokenizer import load_tokenizer
    from deepseek_mini.inference.prompts import completion_text, encode_prompts

    path, net = checkpoint(tmp_path, tokenizer_overrides, model)
    out = tmp_path / "hf"
    export(path, out)
    remote = model is SEED
    tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=remote).eval()
    ours = load_tokenizer(tokenizer_overrides[0].split("=", 1)[1])
    prompts = ["Once upon a time", "The dog ran to the park and"]
    ids, mask, _ = encode_prompts(ours, prompts, 64, 12)
    enc = tok(prompts, return_tensors="pt", padding=True)
    assert torch.equal(enc.input_ids, ids) and torch.equal(enc.attention_mask, mask)
    # what the server's usage counts as prompt_tokens: the prompt as the model reads it
    assert len(tok(prompts[0]).input_ids) == 1 + len(ours.encode(prompts[0]))
    assert tokenizers.Tokenizer.from_file(str(out / "tokenizer.json")).encode(
        prompts[0]).ids == [ours.eos_id, *ours.encode(prompts[0])]  # the file alone too
    want = generate(net, ids, 12, eos_id=ours.eos_id, attention_mask=mask)
    got = hf.generate(**enc, max_new_tokens=12)  # generation_config.json's defaults: greedy
    assert torch.equal(got, want)
    texts = tok.batch_decode(got[:, ids.shape[1]:], skip_special_tokens=True)
    assert texts == [completion_text(ours, row) for row in want[:, ids.shape[1]:].tolist()]
    assert hf.generation_config.bos_token_id == ours.eos_id == hf.config.bos_token_id


def test_the_remote_code_export_loads_without_a_model_type_warning(tmp_path,
                                                                   tokenizer_overrides, capfd):
    """"a model of type `deepseek_mini` to instantiate a model of type ``" is transformers'
    base config, which it falls back on when the tokenizer is loaded without
    trust_remote_code=True; loaded as the docs say, model and tokenizer are quiet, and the
    shipped config class names the config.json's model_type."""
    path, _ = checkpoint(tmp_path, tokenizer_overrides, SEED)
    out = tmp_path / "hf"
    export(path, out)
    capfd.readouterr()
    model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert "to instantiate a model of type" not in "".join(capfd.readouterr())
    assert type(model.config).model_type == json.loads(
        (out / "config.json").read_text())["model_type"] == "deepseek_mini"


def test_the_remote_code_exports_tokenizer_needs_no_code(tmp_path, tokenizer_overrides,
                                                         capsys):
    """Fixed bug: the tokenizer of a remote-code export is transformers' own fast tokenizer
    (no auto_map): with trust_remote_code=False it loads without running or asking about
    the model's code, and AutoModelForCausalLM still refuses to run that code unasked."""
    import sys

    path, _ = checkpoint(tmp_path, tokenizer_overrides, SEED)
    out = tmp_path / "hf"
    export(path, out)
    assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())
    before = set(sys.modules)
    tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=False)
    assert tok("a").input_ids[0] == tok.bos_token_id == tok.eos_token_id
    assert not any("modeling_deepseek_mini" in m for m in set(sys.modules) - before)
    assert "custom code" not in capsys.readouterr().out
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_the_export_follows_the_umask(tmp_path, tokenizer_overrides, umask):
    """Fixed bug: the folder was drwx------ and model.safetensors -rw-------."""
    import os
    import stat

    path, _ = checkpoint(tmp_path, tokenizer_overrides, SEED)
    old = os.umask(umask)
    try:
        export(path, tmp_path / "hf")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "hf").stat().st_mode) == 0o777 & ~umask
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "hf").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}


def test_export_refuses_non_finite_weights_as_generate_does(tmp_path, tokenizer_overrides,
                                                            capsys):
    """Fixed bug: export wrote NaN weights that generate, eval and serve refuse."""
    path, net = checkpoint(tmp_path, tokenizer_overrides, SEED)
    state = net.state_dict()
    state["layers.0.attn.q_proj.weight"][0, 0] = float("nan")
    atomic_save(weights_checkpoint(state, torch.load(path, weights_only=True)["config"]), path)
    assert main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "hf")]) == 2
    assert "holds non-finite weights (inf or NaN)" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.*"))
