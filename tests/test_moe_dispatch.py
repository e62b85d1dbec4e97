"""The MoE layer's dispatch (one sort per layer, its inverse permutation by a scatter)
computes what the plain per-expert loop computes (benchmarks/helpers/plain_model.py's
``PlainMoE``): output, losses and every gradient, in fp32 and under bf16 autocast; and
the paired MoE-vs-dense step benchmark runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from child_process import run_benchmark
from helpers.plain_model import PlainMoE
from test_fast_paths import small_config

from deepseek_mini.model.moe import MoE

ROOT = Path(__file__).resolve().parents[1]


def layer_pair(*overrides: str) -> tuple[MoE, PlainMoE]:
    torch.manual_seed(0)
    cfg = small_config(*overrides)
    ours, plain = MoE(cfg), PlainMoE(cfg)
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.1)
    plain.load_state_dict(ours.state_dict())
    return ours, plain


def run(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """(output, losses, parameter gradients, input gradient) of one forward + backward."""
    x = x.clone().requires_grad_(True)
    out, extra = layer(x)
    losses = extra if isinstance(extra, torch.Tensor) else extra.balance_loss + extra.z_loss
    ((out.float() * grad).sum() + losses).backward()
    return out, losses, {n: p.grad for n, p in layer.named_parameters()}, x.grad


@pytest.mark.parametrize("overrides", [
    ("model.expert_activation=gelu",),
    ("model.expert_activation=swiglu",),
    ("model.top_k=1", "model.num_shared_experts=0"),
    ("model.top_k=3", "model.num_experts=8"),
    ("model.expert_hidden=90",),  # the per-expert loop instead of _grouped_mm
])
def test_moe_layer_matches_the_per_expert_loop_in_fp32(overrides):
    ours, plain = layer_pair(*overrides)
    x, grad = torch.randn(3, 20, 64), torch.randn(3, 20, 64)
    out, losses, grads, x_grad = run(ours, x, grad)
    out_p, losses_p, grads_p, x_grad_p = run(plain, x, grad)
    torch.testing.assert_close(out, out_p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses, losses_p, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x_grad, x_grad_p, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_p[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_moe_layer_under_bf16_autocast_stays_near_the_fp32_loop(activation):
    """bf16 products (8 mantissa bits): within 3e-2 of the fp32 reference's scale."""
    ours, plain = layer_pair(f"model.expert_activation={activation}")
    x, grad = torch.randn(2, 16, 64), torch.randn(2, 16, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _, grads, x_grad = run(ours, x, grad)
    out_p, _, grads_p, x_grad_p = run(plain, x, grad)
    assert out.dtype == torch.float32  # the layer hands back its input's dtype

    def near(a: torch.Tensor, b: torch.Tensor) -> None:
        assert (a.float() - b).abs().max() <= 3e-2 * b.abs().max()

    near(out, out_p)
    near(x_grad, x_grad_p)
    for name, g in grads.items():
        near(g, grads_p[name])


def test_moe_step_benchmark_runs_quick(tmp_path):
    out = tmp_path / "moe.json"
    run_benchmark("training/moe_step.py", "--quick", "--out", str(out))
    (size,) = json.loads(out.read_text())["sizes"]
    assert size["dense_hidden"] == 3 * 64  # (top_k + shared) x expert_hidden
    assert size["ratio"]["wall"] > 0
