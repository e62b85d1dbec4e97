"""DeepSeek-V3's mechanisms beside the seed's: absorbed decoding equals the plain form,
the sigmoid router's bias moves against the load without gradient or optimizer, dense
leading layers, and the seed's checkpoints still load."""

from __future__ import annotations

import pytest
import torch
from tiny_run import small_config

from deepseek_mini.config import ConfigError
from deepseek_mini.model.router import SigmoidRouter, sigmoid_routers
from deepseek_mini.model.transformer import DeepSeekMini
from deepseek_mini.train.optim import build_optimizer
from deepseek_mini.train.precision import setup_precision
from deepseek_mini.train.step import train_step

V3 = {"attention": "latent_rope", "router": "sigmoid", "expert_activation": "swiglu",
      "qk_nope_head_dim": 12, "qk_rope_head_dim": 8, "v_head_dim": 12, "q_lora_rank": 24,
      "kv_latent_dim": 20, "first_k_dense": 1, "num_layers": 3, "max_position": 96}


def lively(model: DeepSeekMini) -> DeepSeekMini:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.05 if p.dim() > 1 else 0.1))
    return model.eval()


def test_absorbed_decoding_matches_the_plain_form_at_every_step(device):
    """64 greedy tokens, batch 3, left padding: each step's logits from the latent cache
    (absorbed) equal a full recompute (plain form) within 1e-4."""
    torch.manual_seed(0)
    model = lively(DeepSeekMini(small_config(**V3).model)).to(device)
    ids = torch.randint(0, 256, (3, 7)).to(device)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, :1] = 0
    cache = model.new_cache(3, 7 + 64)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        step_logits = model(ids, cache=cache, positions=positions, attention_mask=mask).logits
        for _ in range(64):
            token = step_logits[:, -1].argmax(-1, keepdim=True)
            full_plain = model(torch.cat([ids, token], 1),
                               attention_mask=torch.cat([mask, torch.ones_like(token)], 1))
            positions = positions[:, -1:] + 1
            step_logits = model(token, cache=cache, positions=positions,
                                attention_mask=torch.ones_like(token)).logits
            torch.testing.assert_close(step_logits[:, -1], full_plain.logits[:, -1],
                                       atol=1e-4, rtol=0)
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    assert cache.latents.shape[-1] == 20 and cache.rope_keys.shape[-1] == 8  # nothing else


def test_decoding_is_absorbed_after_the_prefill(monkeypatch):
    from deepseek_mini.model.latent_rope_attention import LatentRopeAttention

    calls = []  # both absorbed forms (the general one, a lone token's) split W_UK and W_UV
    plain, absorbed = LatentRopeAttention._plain, LatentRopeAttention._absorbing_weights
    monkeypatch.setattr(LatentRopeAttention, "_plain",
                        lambda self, *a, **k: calls.append("plain") or plain(self, *a, **k))
    monkeypatch.setattr(LatentRopeAttention, "_absorbing_weights",
                        lambda self, *a: calls.append("absorbed") or absorbed(self, *a))
    model = DeepSeekMini(small_config(**V3).model).eval()
    cache = model.new_cache(1, 10)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        model(torch.tensor([[4]]), cache=cache)
    assert calls == ["plain"] * 3 + ["absorbed"] * 3


def test_sigmoid_bias_moves_against_the_load_and_stays_out_of_gradient_and_optimizer():
    cfg = small_config(**V3, bias_update_rate=0.01)
    cfg.train.precision, cfg.train.device = "fp32", "cpu"
    torch.manual_seed(1)
    model = DeepSeekMini(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    routers = sigmoid_routers(model)
    assert len(routers) == 2  # layer 0 is dense
    assert all(id(r.expert_bias) not in optimized and not r.expert_bias.requires_grad
               for r in routers)
    batch = torch.randint(0, 256, (4, 17))
    with torch.no_grad():
        loads = model(batch[:, :-1], targets=batch[:, 1:]).expert_counts.float()
    before = [r.expert_bias.clone() for r in routers]
    train_step(model, optimizer, batch, 4, 1.0, setup_precision(cfg.train))
    for router, old, load in zip(routers, before, loads, strict=True):
        step = router.expert_bias - old
        expected = 0.01 * torch.sign(load.mean() - load)
        torch.testing.assert_close(step, expected)
        assert router.expert_bias.grad is None


def test_bias_changes_the_choice_but_not_the_weights():
    cfg = small_config(**V3, routed_scaling_factor=2.0).model
    torch.manual_seed(2)
    router = SigmoidRouter(cfg)
    x = torch.randn(30, cfg.hidden_size)
    first = router(x)
    router.expert_bias[first.chosen[0, 0]] = -10.0  # the first token's best expert is shunned
    second = router(x)
    assert first.chosen[0, 0] not in second.chosen[0]
    scores = torch.sigmoid(x @ router.weight.T)
    picked = scores.gather(1, second.chosen)
    torch.testing.assert_close(second.weights, picked / picked.sum(-1, keepdim=True) * 2.0)


def test_groups_limit_each_token_to_its_best_groups():
    cfg = small_config(**V3, num_experts=8, top_k=2, n_group=4, topk_group=1).model
    torch.manual_seed(3)
    routing = SigmoidRouter(cfg)(torch.randn(50, cfg.hidden_size))
    assert torch.equal(routing.chosen[:, 0] // 2, routing.chosen[:, 1] // 2)


def test_seed_checkpoint_keys_are_unchanged():
    """A seed-layout state dict written before these options loads as it did: same keys."""
    model = DeepSeekMini(small_config().model)
    keys = set(model.state_dict())
    assert "layers.0.moe.router.weight" in keys
    assert not any("expert_bias" in k or ".mlp." in k for k in keys)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("attention", "mla", "model.attention must be one of latent, latent_rope"),
    ("router", "topk", "model.router must be one of softmax, sigmoid"),
    ("qk_rope_head_dim", 7, "qk_rope_head_dim (7) must be even"),
    ("first_k_dense", 3, "first_k_dense (3) must not exceed model.num_layers (2)"),
    ("n_group", 3, "model.n_group (3) must divide model.num_experts (4)"),
])
def test_new_keys_are_checked(key, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        small_config(**{key: value, **({"router": "sigmoid"} if key == "n_group" else {})})


def test_static_cache_decoding_matches_the_eager_cache(device):
    """The compiled decode step's static cache holds the rope keys too."""
    torch.manual_seed(4)
    model = lively(DeepSeekMini(small_config(**V3).model)).to(device)
    ids = torch.randint(0, 256, (2, 5)).to(device)
    logits = []
    for static in (False, True):
        cache = model.new_cache(2, 12, static=static)
        with torch.no_grad():
            out = [model(ids, cache=cache).logits[:, -1]]
            for t in range(6):
                out.append(model(torch.full((2, 1), t + 1, device=device), cache=cache,
                                 positions=torch.full((2, 1), 5 + t, device=device)
                                 ).logits[:, -1])
        logits.append(torch.stack(out))
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=0)


def test_leading_dense_layers_and_mtp_go_through_every_command(tmp_path, capsys):
    """Fixed bug: ``model.first_k_dense`` > 0 died at its first validation (expert counts
    assumed every layer has experts). Trained with an MTP module too, such a model
    validates, logs its MoE layers' usage under their own indices (dense layer 0 has
    none), plots, evaluates with ``--experts``, serves, and exports to transformers'
    DeepseekV3 with the same greedy tokens."""
    import json

    import transformers
    from fastapi.testclient import TestClient
    from tiny_run import TINY_YAML, tiny_overrides

    from deepseek_mini.cli.main import main
    from deepseek_mini.data.demo_corpus import demo_stories
    from deepseek_mini.inference.batcher import Batcher
    from deepseek_mini.inference.generate import generate
    from deepseek_mini.inference.loading import load_for_inference
    from deepseek_mini.inference.prompts import completion_text, encode_prompts
    from deepseek_mini.serve.app import create_app
    from deepseek_mini.train.trackers import scalars

    out = tmp_path / "run"
    layout = {**V3, "num_layers": 3, "first_k_dense": 1, "dense_hidden": 40, "mtp_depth": 1,
              "max_position": 64, "kv_latent_dim": 16, "q_lora_rank": 0}
    sets = [*tiny_overrides(tmp_path), *(f"model.{k}={v}" for k, v in layout.items()),
            f"train.out_dir={out}"]
    assert main(["train", "--config", str(TINY_YAML), *(a for s in sets for a in ("--set", s))
                 ]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_ce" in r]
    assert [r["step"] for r in evals] == [4, 8] and all("val_mtp_ce" in r for r in evals)
    for row in evals:
        assert row["expert_layers"] == [1, 2]
        assert len(row["expert_fractions"]) == 2 and len(row["router_entropy"]) == 2
    names = scalars(evals[-1])
    assert {"experts/layer1/expert0", "experts/layer2/expert3", "router_entropy/layer2"} <= set(
        names) and not any("layer0" in n for n in names)

    capsys.readouterr()
    assert main(["plot", str(out)]) == 0
    assert (out / "experts.png").read_bytes()[:4] == b"\x89PNG"

    data = tmp_path / "heldout.txt"
    data.write_text("<|endoftext|>".join(demo_stories(6, 99)))
    assert main(["eval", "--checkpoint", str(out / "latest.pt"), "--data", str(data),
                 "--experts"]) == 0
    table = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(table) if line.startswith("layer "))
    assert [line.split()[0] for line in table[start + 1:start + 3]] == ["1", "2"]
    assert main(["eval", "--checkpoint", str(out / "latest.pt"), "--data", str(data),
                 "--experts", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["experts"]["expert_layers"] == [1, 2]

    model, tok, _ = load_for_inference(out / "latest.pt")
    ids, mask, _ = encode_prompts(tok, ["Once upon a time"], 64, 10)
    want = generate(model, ids, 10, eos_id=tok.eos_id, attention_mask=mask)
    batcher = Batcher(model, tok.eos_id).start()
    try:
        reply = TestClient(create_app(batcher, tok, "m")).post(
            "/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 10,
                                     "temperature": 0})
    finally:
        batcher.close()
    assert reply.json()["choices"][0]["text"] == completion_text(
        tok, want[0, ids.shape[1]:].tolist())

    assert main(["export", "--checkpoint", str(out / "latest.pt"), "--out",
                 str(tmp_path / "hf")]) == 0
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    got = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert torch.equal(got[:, :want.shape[1]], want)


def test_a_dense_model_trains_validates_and_evaluates(tmp_path, capsys):
    """``first_k_dense == num_layers`` is the dense model of the MoE-against-dense
    comparison (BENCHMARKS.md, "The levers"): every layer a dense MLP as wide as the
    experts a token runs (top_k + shared), so the active FLOPs match. It has no routers, no
    router loss and no expert statistics: training validates, eval scores it and refuses
    ``--experts`` in one line."""
    from tiny_run import TINY_YAML, tiny_overrides

    from deepseek_mini.cli.main import main

    cfg = small_config(first_k_dense=2, num_layers=2)
    model = DeepSeekMini(cfg.model)
    assert not any("router" in k or "experts" in k for k in model.state_dict())
    ids = torch.randint(0, 256, (2, 9))
    out = model(ids[:, :-1], targets=ids[:, 1:])
    assert out.aux.item() == 0 and out.expert_counts.shape == (0, cfg.model.num_experts)
    moe = DeepSeekMini(small_config(num_layers=2).model)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in moe.parameters())

    run = tmp_path / "run"
    sets = [*tiny_overrides(tmp_path), "model.first_k_dense=2", f"train.out_dir={run}"]
    assert main(["train", "--config", str(TINY_YAML), *(a for s in sets for a in ("--set", s))
                 ]) == 0
    logged = (run / "train.log").read_text()
    assert "val ce" in logged and "experts:" not in logged
    data = tmp_path / "heldout.txt"
    data.write_text("Once upon a time there was a cat.")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run / "latest.pt"), "--data", str(data)]) == 0
    assert main(["eval", "--checkpoint", str(run / "latest.pt"), "--data", str(data),
                 "--experts"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --experts:") and "dense model" in err[-1]
