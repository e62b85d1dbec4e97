"""Each fast path computes what the plain way computes: the whole model against
benchmarks/helpers/plain_model.py (explicit softmax attention with repeated KV heads, per-slot and
per-expert loops, full-logits cross-entropy, uncached decoding), and the pieces one by one
(grouped expert GEMMs, chunked cross-entropy through the LM head, fused AdamW)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers.plain_model import PlainDeepSeekMini
from torch.nn import functional as F

from deepseek_mini import Config, DeepSeekMini
from deepseek_mini.inference.generate import generate
from deepseek_mini.model import loss as loss_module
from deepseek_mini.model import transformer as transformer_module
from deepseek_mini.model.loss import linear_cross_entropy
from deepseek_mini.model.moe import grouped_matmul
from deepseek_mini.model.transformer import compile_model

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def small_config(*overrides: str):
    return Config.from_yaml(TINY, overrides=["model.vocab_size=256", "model.hidden_size=64",
                                             "model.expert_hidden=96", *overrides]).model


def model_pair(*overrides: str) -> tuple[DeepSeekMini, PlainDeepSeekMini]:
    torch.manual_seed(0)
    cfg = small_config(*overrides)
    ours = DeepSeekMini(cfg)
    plain = PlainDeepSeekMini(cfg)
    plain.load_state_dict(ours.state_dict())
    return ours, plain


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("overrides", [
    ("model.expert_activation=gelu",),
    ("model.expert_activation=swiglu",),
    ("model.num_kv_heads=2", "model.num_shared_experts=0"),
    ("model.num_heads=2", "model.num_kv_heads=2", "model.top_k=1"),
    ("model.expert_hidden=90",),
])
def test_model_matches_plain_implementation_in_loss_logits_and_gradients(overrides, device):
    ours, plain = (m.to(device) for m in model_pair(*overrides))
    ids = torch.randint(0, 256, (3, 24)).to(device)
    targets = torch.randint(0, 256, (3, 24)).to(device)
    targets[0, :5] = -100
    out = ours(ids, targets=targets)
    logits, loss = plain(ids, targets)
    torch.testing.assert_close(out.logits, logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    loss.backward()
    plain_grads = dict(plain.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, plain_grads[name].grad, rtol=1e-3, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_16_bit_autocast_forward_and_backward_stay_near_fp32(activation, dtype, device):
    """Under autocast (the trainer's bf16 and fp16) the loss, logits and every gradient
    stay near the fp32 plain model's: bf16 keeps 8 significant bits, so a few roundings
    through two layers land within a few percent; fp16 (11 bits) too, once the loss is
    scaled as the trainer's GradScaler scales it (unscaled, fp16's small gradients
    underflow: the queries' came out 56% off). The CPU has autocast for both, so this runs
    there too (emulated, but tiny)."""
    ours, plain = (m.to(device) for m in model_pair(f"model.expert_activation={activation}"))
    ids = torch.randint(0, 256, (3, 24)).to(device)
    targets = torch.randint(0, 256, (3, 24)).to(device)
    with torch.autocast(device.type, dtype=dtype):
        out = ours(ids, targets=targets)
    logits, loss = plain(ids, targets)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert relative_error(out.logits, logits) < 0.03
    assert abs(out.loss.item() - loss.item()) < 0.01 * loss.item()
    scale = 2.0 ** 16 if dtype == torch.float16 else 1.0  # GradScaler's first scale
    (out.loss * scale).backward()
    loss.backward()
    plain_grads = dict(plain.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad.dtype == torch.float32, name
        assert relative_error(p.grad / scale, plain_grads[name].grad) < 0.08, name


def test_cached_generation_matches_uncached_plain_decoding(device):
    ours, plain = (m.to(device) for m in model_pair("model.num_layers=2"))
    ours.eval()
    prompt = torch.randint(0, 256, (3, 7)).to(device)
    expected = plain.generate(prompt, 12)
    assert torch.equal(generate(ours, prompt, max_new_tokens=12, temperature=0.0), expected)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_one_token_decoding_step_matches_plain_forward(activation, device):
    """Batch-1, one-token steps go through whatever small-batch MoE path exists."""
    ours, plain = (m.to(device) for m in model_pair(f"model.expert_activation={activation}"))
    ours.eval()
    ids = torch.randint(0, 256, (1, 10)).to(device)
    cache = ours.new_cache(1, 10)
    with torch.no_grad():
        ours(ids[:, :9], cache=cache)
        step = ours(ids[:, 9:], cache=cache).logits[:, -1]
        reference = plain(ids)[0][:, -1]
    torch.testing.assert_close(step, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("counts", "width"), [([5, 0, 9, 2], 12), ([0, 0, 16, 0], 8),
                                                ([1, 1, 1, 1], 8), ([3, 4, 0, 2], 6)])
def test_grouped_matmul_matches_a_loop_over_experts_forward_and_backward(counts, width, dtype,
                                                                         device):
    """Width 6 (24-byte rows) is too narrow for ``_grouped_mm`` and takes the loop; so do
    12-wide bf16 rows (24 bytes). bf16 is the dtype CUDA's ``_grouped_mm`` runs (Hopper
    and newer); its products sum in a different order than the loop's, so they agree
    within bf16's rounding (eps 2**-8, a few roundings)."""
    torch.manual_seed(0)
    x = torch.randn(sum(counts), 8).to(device, dtype).requires_grad_()
    w = torch.randn(len(counts), 8, width).to(device, dtype).requires_grad_()
    grad_out = torch.randn(sum(counts), width).to(device, dtype)
    fast = grouped_matmul(x, w, torch.tensor(counts, device=device))
    (fast * grad_out).sum().backward()
    fast_grads = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    slow = torch.cat([chunk @ w[e] for e, chunk in enumerate(x.split(counts))])
    (slow * grad_out).sum().backward()
    tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 3e-2}
    torch.testing.assert_close(fast, slow, **tol)
    torch.testing.assert_close(fast_grads[0], x.grad, **tol)
    torch.testing.assert_close(fast_grads[1], w.grad, **tol)


@pytest.mark.parametrize("chunk_rows", [7, 64, 1000])
def test_chunked_cross_entropy_matches_full_logits(chunk_rows):
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, requires_grad=True)
    weight = torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(0, 300, (50,))
    targets[::4] = -100
    fast = linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows)
    (fast * 3.0).backward()
    fast_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    slow = F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100)
    (slow * 3.0).backward()
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(fast_grads[0], hidden.grad)
    torch.testing.assert_close(fast_grads[1], weight.grad)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets), slow)


@pytest.mark.parametrize("chunk_rows", [7, 64, 1000])
@pytest.mark.parametrize("group_bytes", [1 << 28, 1])  # one group; a group per chunk
def test_chunked_cross_entropy_under_bf16_autocast_matches_full_logits(
        chunk_rows, group_bytes, monkeypatch):
    """Under autocast the weight's gradient comes from kept 16-bit logit gradients, one
    product per group of rows. It matches autocast's own full-logits cross-entropy, and
    the fp32 reference within bf16's tolerance: bf16 keeps 8 significant bits (eps =
    2**-8), a gradient goes through about three roundings (operands, logit gradients,
    product), so 8 eps (3.1%) of its largest entry; the loss, summed in fp32 from bf16
    logits, within 1 eps relative."""
    monkeypatch.setattr(loss_module, "GRADIENT_GROUP_BYTES", group_bytes)
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, requires_grad=True)
    weight = torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(0, 300, (50,))
    targets[::4] = -100
    results = []
    for loss_of, autocast in (
            (lambda: linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows), True),
            (lambda: F.cross_entropy((hidden @ weight.T).float(), targets), True),
            (lambda: F.cross_entropy(hidden @ weight.T, targets), False)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_of()
        (loss * 3.0).backward()
        results.append((loss, hidden.grad, weight.grad))
        hidden.grad = weight.grad = None
    (fast, *fast_grads), (slow, *slow_grads), (exact, *exact_grads) = results
    assert fast.dtype == torch.float32 and fast_grads[1].dtype == torch.float32
    torch.testing.assert_close(fast, slow)
    for ours, theirs in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-3 * theirs.abs().max())
    eps = 2.0 ** -8
    torch.testing.assert_close(fast, exact, rtol=eps, atol=0.0)
    for ours, reference in zip(fast_grads, exact_grads, strict=True):
        torch.testing.assert_close(ours, reference, rtol=0.0,
                                   atol=8 * eps * reference.abs().max())


@pytest.mark.parametrize("overrides", [(), ("model.head_vocab=64",), ("model.mtp_depth=1",)])
def test_tied_embedding_gradient_in_one_buffer_matches_autograds_two(overrides, monkeypatch):
    """The tied lookup adds the looked-up rows' gradient into the head's (tied_embedding.py)
    instead of autograd's second dense tensor: the same sums in another order, so the
    embedding's gradient within fp32 rounding and every other gradient bitwise, over two
    accumulated backward passes (micro-batches) and a trimmed or MTP head."""
    torch.manual_seed(0)
    model = DeepSeekMini(small_config(*overrides))
    batches = [(torch.randint(0, 256, (3, 24)), torch.randint(0, 256, (3, 24))) for _ in "ab"]
    batches[0][1][0, :5] = -100
    calls = []

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        for ids, targets in batches:
            model(ids, targets=targets).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()
                if p.grad is not None}

    def counted(weight, ids):
        calls.append(ids)
        return tied(weight, ids)

    tied = transformer_module.tied_lookup
    monkeypatch.setattr(transformer_module, "tied_lookup", counted)
    fast = grads()
    assert len(calls) == 2
    monkeypatch.setattr(transformer_module, "tied_lookup",
                        lambda weight, ids: (F.embedding(ids, weight), None))
    plain = grads()
    assert fast.keys() == plain.keys()
    for name, grad in fast.items():
        if name == "embed.weight":
            torch.testing.assert_close(grad, plain[name], rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(grad, plain[name]), name


def test_tied_lookup_without_a_head_gradient_is_the_embeddings():
    weight = torch.randn(10, 4, requires_grad=True)
    ids = torch.tensor([[1, 3, 3], [0, 9, 1]])
    rows, _ = transformer_module.tied_lookup(weight, ids)
    (grad,) = torch.autograd.grad((rows * torch.arange(24.0).view(2, 3, 4)).sum(), weight)
    (expected,) = torch.autograd.grad(
        (F.embedding(ids, weight) * torch.arange(24.0).view(2, 3, 4)).sum(), weight)
    assert torch.equal(grad, expected)


def test_fused_adamw_matches_the_per_tensor_loop():
    """The trainer's optimizer (optim.build_optimizer) is the fused kernel."""
    ours, _ = model_pair()
    twin = copy.deepcopy(ours)
    settings = {"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.1}
    fused = torch.optim.AdamW(ours.parameters(), fused=True, **settings)
    loop = torch.optim.AdamW(twin.parameters(), foreach=False, **settings)
    ids = torch.randint(0, 256, (2, 16))
    for _ in range(3):
        ours(ids, targets=ids).loss.backward()
        for p, q in zip(ours.parameters(), twin.parameters(), strict=True):
            q.grad = p.grad.clone()
        fused.step()
        loop.step()
        fused.zero_grad()
        loop.zero_grad()
    for (name, p), q in zip(ours.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=lambda m, n=name: f"{n}: {m}")


def test_compiled_model_matches_eager_forward_and_backward(device):
    """Dynamo traces the whole model but the grouped expert product (fp32 on the CPU has
    no fake-tensor rule for ``_grouped_mm``); the compiled model computes the same. On
    the CPU dynamo's graph runs eagerly (inductor would spend a minute in a C++ compiler);
    on CUDA inductor generates the kernels the trainer's ``train.compile`` runs."""
    cfg = Config.from_yaml(TINY, overrides=[
        "model.vocab_size=256", "model.hidden_size=64", "model.num_layers=1",
        "model.expert_hidden=64"]).model
    torch.manual_seed(0)
    model = DeepSeekMini(cfg).to(device)
    ids = torch.randint(0, cfg.vocab_size, (2, 16)).to(device)
    eager = model(ids, targets=ids)
    eager.loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    backend = "inductor" if device.type == "cuda" else "eager"
    compiled = compile_model(model, backend=backend, dynamic=False)(ids, targets=ids)
    compiled.loss.backward()
    tol = {} if backend == "eager" else {"rtol": 1e-4, "atol": 1e-5}  # fused kernels' order
    torch.testing.assert_close(compiled.loss, eager.loss, **tol)
    for grad, expected in zip((p.grad for p in model.parameters()), eager_grads, strict=True):
        torch.testing.assert_close(grad, expected, **tol)
