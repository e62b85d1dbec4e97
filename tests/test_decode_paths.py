"""The batch-1 decoding shortcuts compute what the general paths compute: a lone token's
attention (no mask; both layouts) against the masked general form, float and quantized experts'
one-token path against the sorted grouped one, and the quantized SwiGLU projections
fused into one product (gate and up) against separate ones. Each test also checks that the
shortcut is the one taken, so a shortcut that stopped being used, or drifted, fails."""

from __future__ import annotations

import pytest
import torch
from test_quantize import V3  # the small DeepSeek-V3 layout the quantize tests use
from tiny_run import small_config

from deepseek_mini import DeepSeekMini, generate, quantize
from deepseek_mini.model.attention import MultiHeadLatentAttention
from deepseek_mini.model.latent_rope_attention import LatentRopeAttention
from deepseek_mini.model.moe import MoE, RoutedExperts
from deepseek_mini.model.quantize import (
    KERNELS,
    Int8Experts,
    Int8Linear,
    QuantizedFeedForward,
    int8_linear,
    quantize_rows,
)
from deepseek_mini.train.expert_parallel import ExpertParallelExperts


def lively(model: DeepSeekMini) -> DeepSeekMini:
    """Weights far from their initial values, so greedy tokens are decided by the model."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.08 if p.dim() > 1 else 0.1))
    return model.eval()


def spy(monkeypatch, cls: type, name: str) -> list[int]:
    """Count the calls of ``cls.name``."""
    calls, method = [], getattr(cls, name)

    def counted(self, *args, **kwargs):
        calls.append(1)
        return method(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, counted)
    return calls


LAYOUTS = {"v3": (LatentRopeAttention, {**V3, "q_lora_rank": 0}),
           "seed": (MultiHeadLatentAttention, {"num_kv_heads": 1}),
           "seed-gqa": (MultiHeadLatentAttention, {"num_kv_heads": 2})}


@pytest.mark.parametrize("mode", ["fp32", "int8", "bf16"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_token_attention_step_equals_the_masked_general_step(layout, mode, batch,
                                                                 monkeypatch):
    """A decoding step with no mask takes ``_decode_one``; the same step with an all-true
    mask takes the general form (SDPA; absorbed for latent_rope). Their logits agree to
    fp32 rounding at every one of 24 greedy steps (quantized: to a few bf16 roundings,
    since the products' bf16 activations may round an fp32 difference either way), and
    so do the tokens."""
    tolerance = ({"rtol": 1e-5, "atol": 1e-5} if mode == "fp32"
                 else {"rtol": 0.02, "atol": 0.04})
    torch.manual_seed(0)
    attention, overrides = LAYOUTS[layout]
    model = lively(DeepSeekMini(small_config(**overrides).model))
    if mode != "fp32":
        quantize(model, mode)
    shortcut = spy(monkeypatch, attention, "_decode_one")
    ids = torch.randint(0, 256, (batch, 6))
    fast, general = model.new_cache(batch, 32), model.new_cache(batch, 32)
    with torch.inference_mode():
        a = b = model(ids, cache=fast).logits[:, -1]
        model(ids, cache=general)
        for _ in range(24):
            token = a.argmax(-1, keepdim=True)
            a = model(token, cache=fast).logits[:, -1]
            general.attention_mask = lambda steps, c=general: torch.ones(
                batch, 1, steps, c.length, dtype=torch.bool)
            b = model(token, cache=general).logits[:, -1]
            torch.testing.assert_close(a, b, **tolerance)
            assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert len(shortcut) == 24 * model.config.num_layers


def test_one_token_steps_generate_what_full_recomputation_does():
    """Greedy decoding through the shortcuts (q_lora_rank too, MTP unused) equals the
    uncached decoding that recomputes every position with the plain forms."""
    torch.manual_seed(0)
    model = lively(DeepSeekMini(small_config(**V3, q_lora_rank=24).model))
    prompt = torch.randint(0, 256, (1, 5))
    assert torch.equal(generate(model, prompt, 30), generate(model, prompt, 30, use_cache=False))


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_float_experts_one_token_path_equals_the_grouped_path(activation, monkeypatch):
    """A lone token's chosen experts, run one by one on their own weights, give the rows
    of the sorted grouped products; an MoE layer on a CPU takes that path for one token
    and its output (and router statistics) match the grouped path's."""
    torch.manual_seed(0)
    experts = RoutedExperts(4, 64, 48, activation)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(std=0.1)
    x, chosen = torch.randn(1, 64), torch.tensor([3, 1])
    order = chosen.argsort(stable=True)
    grouped = experts(x.repeat(2, 1), torch.bincount(chosen, minlength=4))
    torch.testing.assert_close(experts.one_token(x, chosen)[order], grouped,
                               rtol=1e-6, atol=1e-7)
    moe = DeepSeekMini(small_config(expert_activation=activation).model).layers[0].moe
    shortcut = spy(monkeypatch, RoutedExperts, "one_token")
    token = torch.randn(1, 1, moe.router.weight.shape[1])
    with torch.no_grad():
        out, stats = moe(token)
        assert len(shortcut) == 1
        moe.experts.one_token = None  # back to the grouped path
        ref, ref_stats = moe(token)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    assert torch.equal(stats.expert_counts, ref_stats.expert_counts)
    assert len(shortcut) == 1


def test_one_token_path_stays_off_for_a_token_batch_and_for_expert_parallel_experts():
    """Two tokens take the grouped path; expert-parallel experts (a rank's share of the
    experts, global ids) have no one-token path at all."""
    assert ExpertParallelExperts.one_token is None
    moe: MoE = DeepSeekMini(small_config().model).layers[0].moe
    moe.experts.one_token = lambda *a: pytest.fail("one_token took two tokens")
    with torch.no_grad():
        moe(torch.randn(1, 2, moe.router.weight.shape[1]))


@pytest.mark.parametrize("kernel", KERNELS)
def test_fused_gate_and_up_equal_separate_int8_products(kernel):
    """Int8 experts and SwiGLU MLPs multiply gate and up as one [2 * inner, in] matrix:
    each output equals the separate product of that projection's own int8 rows exactly
    (one-token, sorted and gathered expert paths alike)."""
    torch.manual_seed(0)
    experts = RoutedExperts(4, 64, 48, "swiglu")
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(std=0.1)
    int8 = Int8Experts(experts, kernel)
    assert not hasattr(int8, "w_gate_q") and int8.w_gate_up_q.shape == (4, 96, 64)

    def separate(x: torch.Tensor, e: int) -> torch.Tensor:
        rows = x.to(int8.compute)
        layer = {name: Int8Linear(*quantize_rows(getattr(experts, name)[e].T), kernel)
                 for name in ("w_gate", "w_up", "w_down")}
        h = torch.nn.functional.silu(layer["w_gate"](rows)) * layer["w_up"](rows)
        return layer["w_down"](h).to(x.dtype)

    x, chosen = torch.randn(1, 64), torch.tensor([2, 0])
    expected = torch.cat([separate(x, e) for e in chosen.tolist()])
    torch.testing.assert_close(int8.one_token(x, chosen), expected, rtol=0, atol=0)
    torch.testing.assert_close(int8(x.repeat(2, 1), torch.tensor([1, 0, 1, 0])),
                               expected.flip(0), rtol=0, atol=0)
    gathered = int8.gathered(x.repeat(2, 1), chosen)  # bf16 products with int8pack
    assert float((gathered - expected).norm() / expected.norm()) < 0.01

    model = DeepSeekMini(small_config(**V3).model)
    shared = model.layers[0].moe.shared
    quantize(model, "int8", kernel)
    fused = model.layers[0].moe.shared
    assert isinstance(fused, QuantizedFeedForward)
    x = torch.randn(3, model.config.hidden_size)
    gate, up, down = (Int8Linear.from_weight(getattr(shared, name).weight, kernel)
                      for name in ("gate", "up", "down"))
    torch.testing.assert_close(fused(x), down(torch.nn.functional.silu(gate(x)) * up(x)),
                               rtol=0, atol=0)


def test_int8_linear_rows_do_not_depend_on_their_neighbours():
    """What the fusion relies on: an output channel of the int8pack kernel is the same
    whatever other rows share its matrix."""
    torch.manual_seed(0)
    w = torch.randn(96, 64) * 0.1
    q, scale = quantize_rows(w)
    x = torch.randn(1, 64)
    whole = int8_linear(x, q, scale)
    halves = torch.cat([int8_linear(x, q[:48], scale[:48]), int8_linear(x, q[48:], scale[48:])],
                       dim=-1)
    torch.testing.assert_close(whole, halves, rtol=0, atol=0)
