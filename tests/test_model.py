"""The model's behaviour against plain references: causality, MoE routing, aux losses,
attention, gradients, initial loss and parameter counts."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_run import small_config
from torch.nn import functional as F

from deepseek_mini import Config, DeepSeekMini
from deepseek_mini.model.attention import MultiHeadLatentAttention
from deepseek_mini.model.moe import MoE, activate
from deepseek_mini.model.norm import RMSNorm
from deepseek_mini.model.rope import apply_rope, rope_tables
from deepseek_mini.model.sizes import active_params, flops_per_token, total_params


def seeded_model(**model) -> DeepSeekMini:
    torch.manual_seed(0)
    return DeepSeekMini(small_config(**model).model)


def test_changing_future_tokens_never_changes_past_logits():
    model = seeded_model().eval()
    ids = torch.randint(0, 256, (2, 20))
    changed = ids.clone()
    changed[:, 12:] = torch.randint(0, 256, (2, 8))
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def plain_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """For each token: pick experts, weighted sum of their outputs, plus the shared ones."""
    out = torch.zeros_like(x)
    experts = moe.experts
    for t in range(x.shape[0]):
        probs = (x[t] @ moe.router.weight.T).softmax(-1)
        weights, chosen = probs.topk(moe.top_k)
        weights = weights / weights.sum()
        for w, e in zip(weights, chosen.tolist(), strict=True):
            gate = x[t] @ experts.w_gate[e] if experts.w_gate is not None else None
            out[t] += w * (activate(x[t] @ experts.w_up[e], gate) @ experts.w_down[e])
        if moe.shared is not None:
            out[t] += moe.shared(x[t])
    return out


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("shared", [0, 1, 2])
def test_moe_equals_per_token_reference(activation, shared):
    cfg = small_config(expert_activation=activation, num_shared_experts=shared).model
    torch.manual_seed(1)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(37, cfg.hidden_size)
    out, stats = moe(x)
    torch.testing.assert_close(out, plain_moe(moe, x), rtol=1e-5, atol=1e-5)
    assert int(stats.expert_counts.sum()) == 37 * cfg.top_k  # no token dropped


def test_aux_losses_equal_hand_computation():
    cfg = small_config(aux_loss_coef=0.01, z_loss_coef=0.001).model
    torch.manual_seed(2)
    moe = MoE(cfg)
    x = torch.randn(50, cfg.hidden_size)
    _, stats = moe(x)
    logits = (x @ moe.router.weight.T).double()
    probs = logits.softmax(-1)
    chosen = probs.topk(cfg.top_k).indices
    fraction = torch.stack([(chosen == e).sum() for e in range(cfg.num_experts)]).double()
    fraction /= 50 * cfg.top_k
    balance = cfg.num_experts * (fraction * probs.mean(0)).sum() * 0.01
    z = (torch.logsumexp(logits, -1) ** 2).mean() * 0.001
    assert stats.balance_loss.item() == pytest.approx(balance.item(), rel=1e-5)
    assert stats.z_loss.item() == pytest.approx(z.item(), rel=1e-5)


def test_uniform_router_gives_exactly_the_coefficient_per_layer():
    model = seeded_model(aux_loss_coef=0.05, z_loss_coef=0.0)
    for layer in model.layers:
        torch.nn.init.zeros_(layer.moe.router.weight)
    ids = torch.randint(0, 256, (2, 16))
    out = model(ids, targets=ids)
    assert out.balance_loss.item() == pytest.approx(0.05 * 2, abs=1e-7)
    assert out.aux.item() == pytest.approx(out.balance_loss.item() + out.z_loss.item())
    assert out.loss.item() == pytest.approx(out.ce.item() + out.aux.item(), rel=1e-6)


def test_gradients_reach_router_latent_and_every_used_expert():
    model = seeded_model(expert_activation="swiglu")
    ids = torch.randint(0, 256, (4, 32))
    out = model(ids, targets=torch.roll(ids, -1, 1))
    out.loss.backward()
    for i, layer in enumerate(model.layers):
        assert layer.moe.router.weight.grad.abs().sum() > 0
        for proj in (layer.attn.kv_down, layer.attn.k_up, layer.attn.v_up):
            assert proj.weight.grad.abs().sum() > 0
        used = out.expert_counts[i] > 0
        experts = layer.moe.experts
        for w in (experts.w_up, experts.w_gate, experts.w_down):
            per_expert = w.grad.abs().flatten(1).sum(1)
            assert torch.all(per_expert[used] > 0)
            assert torch.all(per_expert[~used] == 0)


def test_initial_loss_is_close_to_log_vocab():
    cfg = Config.from_yaml("configs/tiny.yaml", overrides=["model.num_layers=2"]).model
    torch.manual_seed(0)
    model = DeepSeekMini(cfg)
    ids = torch.randint(0, cfg.vocab_size, (4, 64))
    targets = torch.randint(0, cfg.vocab_size, (4, 64))
    ce = model(ids, targets=targets).ce.item()
    assert abs(ce - math.log(cfg.vocab_size)) < 0.3


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_attention_equals_explicit_softmax_with_repeated_kv_heads(kv_heads, device):
    """Four query heads on one KV head (the base config's layout: SDPA's ``enable_gqa``
    with a single head of K and V) or two."""
    cfg = small_config(num_heads=4, num_kv_heads=kv_heads).model
    torch.manual_seed(3)
    attn = MultiHeadLatentAttention(cfg, 0).to(device)
    x = torch.randn(2, 10, cfg.hidden_size).to(device)
    cos, sin = rope_tables(cfg.head_dim, 10, cfg.rope_theta)
    table = (cos[None, None].to(device), sin[None, None].to(device))
    out = attn(x, table, table)

    def heads(t, n):
        return t.view(2, 10, n, cfg.head_dim).transpose(1, 2)

    repeat = 4 // kv_heads
    latent = attn.kv_down(x)
    q = apply_rope(heads(attn.q_proj(x), 4), *table)
    k = apply_rope(heads(attn.k_up(latent), kv_heads), *table).repeat_interleave(repeat, dim=1)
    v = heads(attn.v_up(latent), kv_heads).repeat_interleave(repeat, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(cfg.head_dim)
    future = torch.ones(10, 10, dtype=torch.bool, device=device).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    ref = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 10, -1))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    cos, sin = rope_tables(16, 32, 10000.0)
    q, k = torch.randn(16), torch.randn(16)

    def score(i, j):
        qi = apply_rope(q.view(1, 1, 1, 16), cos[i], sin[i])
        kj = apply_rope(k.view(1, 1, 1, 16), cos[j], sin[j])
        return (qi * kj).sum()

    torch.testing.assert_close(score(5, 2), score(20, 17), rtol=1e-5, atol=1e-5)


def test_rmsnorm_matches_its_formula():
    norm = RMSNorm(8, eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 8)
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), ref)


def test_tied_head_shares_the_embedding_and_untied_does_not():
    tied = seeded_model(tie_embeddings=True)
    untied = seeded_model(tie_embeddings=False)
    assert tied.lm_head.weight.data_ptr() == tied.embed.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.embed.weight.data_ptr()


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("tie", [True, False])
def test_parameter_count_equals_formula(activation, tie):
    cfg = small_config(expert_activation=activation, tie_embeddings=tie).model
    model = DeepSeekMini(cfg)
    assert sum(p.numel() for p in model.parameters()) == total_params(cfg)


def test_base_config_sizes():
    cfg = Config.from_yaml("configs/base.yaml").model
    with torch.device("meta"):
        model = DeepSeekMini(cfg)
    assert sum(p.numel() for p in model.parameters()) == total_params(cfg) == 527_704_128
    assert active_params(cfg) == 209_199_168
    assert flops_per_token(cfg, 128) == 1_281_526_272
    assert cfg.kv_latent_dim == 72


def test_cross_entropy_ignores_masked_targets():
    model = seeded_model().eval()
    ids = torch.randint(0, 256, (1, 12))
    targets = ids.clone()
    targets[:, :6] = -100
    out = model(ids, targets=targets)
    ref = F.cross_entropy(out.logits[0, 6:], ids[0, 6:])
    torch.testing.assert_close(out.ce, ref)


def test_a_sequence_longer_than_max_position_is_a_clear_error():
    model = seeded_model(max_position=16).eval()
    model(torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"17 positions exceed model.max_position \(16\)"):
        model(torch.zeros(1, 17, dtype=torch.long))
