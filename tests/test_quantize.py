"""Weight-only quantization (model/quantize.py): int8 layers and experts against fp32
references within stated tolerances, the gathered expert path against the grouped one,
a quantized model's cached decoding against its uncached decoding, what ``quantize``
replaces, quantized CE, and the one-line errors of ``--quantize``."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_run import small_config
from torch import nn
from torch.nn import functional as F

from deepseek_mini import DeepSeekMini, UserError, generate, load_for_inference, quantize
from deepseek_mini.cli import main as cli_main
from deepseek_mini.cli.main import main
from deepseek_mini.files import atomic_save
from deepseek_mini.model import quantize as quantize_module
from deepseek_mini.model.moe import RoutedExperts
from deepseek_mini.model.quantize import (
    KERNELS,
    Int8Experts,
    Int8Linear,
    QuantizedEmbedding,
    check_device,
    quantize_rows,
)

V3 = {"attention": "latent_rope", "router": "sigmoid", "expert_activation": "swiglu",
      "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "kv_latent_dim": 32,
      "max_position": 96}
LAYOUTS = {"seed": {"max_position": 96}, "v3": V3}
# Every quantized path: int8 through each kernel (model/quantize.py), and bf16.
PATHS = {"int8-fbgemm": ("int8", "fbgemm"), "int8-inductor": ("int8", "inductor"),
         "int8-int8pack": ("int8", "int8pack"), "bf16": ("bf16", None)}


def quantized(model: DeepSeekMini, path: str) -> DeepSeekMini:
    mode, kernel = PATHS[path]
    return quantize(model, mode, kernel)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().float(), ref.detach().float()
    return float((out - ref).norm() / ref.norm())


def lively(model: DeepSeekMini) -> DeepSeekMini:
    """Weights far from their initial values, so logits are peaked enough for greedy
    decoding to be decided by the model, not by rounding."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.08 if p.dim() > 1 else 0.1))
    return model.eval()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rows", [1, 5, 16, 40])  # int8pack: its kernel up to 16 rows, then a cast
@pytest.mark.parametrize("width", [64, 72, 13])  # int8pack: 72 and 13 always take fp32
def test_int8_linear_matches_fp32_within_quantization_error(kernel, rows, width):
    """Against fp32 ``F.linear``: relative error under 2% for int8pack (per-channel int8
    rounds each weight by at most 1/254 of its row's largest; bf16 activations add ~0.3%),
    under 3% for fbgemm (it also rounds the activations to 8 bits). Against the
    dequantized weight ``q * s`` only the activations' rounding is left: bf16 (under 1%)
    or 8-bit (under 2.5%)."""
    torch.manual_seed(0)
    weight = torch.randn(48, width) * 0.05
    x = torch.randn(3, rows, width)
    layer = Int8Linear.from_weight(weight, kernel)
    out = layer(x)
    assert out.shape == (3, rows, 48) and out.dtype == torch.float32
    fbgemm = kernel == "fbgemm"
    assert relative_error(out, F.linear(x, weight)) < (0.03 if fbgemm else 0.02)
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    dequantized = F.linear(x, q.float() * scale.float()[:, None])
    assert relative_error(out, dequantized) < (0.025 if fbgemm else 0.01)
    # each row rounded as if alone: a row's output does not depend on the others' size
    if fbgemm and rows > 1:
        scaled = x.clone()
        scaled[:, 0] *= 1000
        assert relative_error(layer(scaled)[:, 1:], out[:, 1:]) < 0.01
    torch.testing.assert_close(layer.dequantized(torch.float32), q.float() * scale.float()[:, None])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_int8_experts_match_fp32_experts_and_gathered_equals_grouped(activation, kernel):
    """Sorted rows through each chosen expert's int8 weights match the fp32 experts within
    3% (two int8 products in a row; 5% with fbgemm's 8-bit activations); the gathered
    path, which indexes only the chosen experts' int8 weights, gives the grouped path's
    output within the activations' rounding (1% bf16, 5% fbgemm's row-at-a-time)."""
    torch.manual_seed(0)
    experts = RoutedExperts(4, 64, 48, activation)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(std=0.1)
    chosen = torch.tensor([2, 0, 2, 3, 0, 0, 3, 2, 2])  # expert 1 gets no row
    x = torch.randn(len(chosen), 64)
    order = chosen.argsort(stable=True)
    counts = torch.bincount(chosen, minlength=4)
    reference = experts(x[order], counts)
    int8 = Int8Experts(experts, kernel)
    grouped = int8(x[order], counts)
    fbgemm = kernel == "fbgemm"
    assert relative_error(grouped, reference) < (0.05 if fbgemm else 0.03)
    gathered = int8.gathered(x[order], chosen[order])
    assert relative_error(gathered, grouped) < (0.05 if fbgemm else 0.01)
    assert relative_error(int8.gathered(x, chosen),
                          experts.gathered(x, chosen)) < (0.05 if fbgemm else 0.03)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_one_token_path_equals_the_grouped_path_and_its_layer_counts_the_same(activation):
    """A lone token's k chosen experts, unsorted (``one_token``), give the grouped path's
    rows exactly (the same int8 products); an MoE layer taking it reports the router
    statistics the grouped path does, counts included."""
    torch.manual_seed(0)
    experts = RoutedExperts(4, 64, 48, activation)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(std=0.1)
    int8 = Int8Experts(experts)
    x, chosen = torch.randn(1, 64), torch.tensor([3, 1])
    order = chosen.argsort(stable=True)
    grouped = int8(x.expand(2, 64), torch.bincount(chosen, minlength=4))
    torch.testing.assert_close(int8.one_token(x, chosen)[order], grouped, rtol=0, atol=0)
    model = quantize(DeepSeekMini(small_config(expert_activation=activation).model), "int8")
    moe, token = model.layers[0].moe, torch.randn(1, 1, model.config.hidden_size)
    out, stats = moe(token)
    moe.experts.one_token = None  # back to the grouped path
    ref, ref_stats = moe(token)
    torch.testing.assert_close(out, ref)
    assert torch.equal(stats.expert_counts, ref_stats.expert_counts)
    assert stats.balance_loss == ref_stats.balance_loss


@pytest.mark.parametrize("mode", ["int8", "bf16"])
def test_quantize_replaces_every_matrix_but_the_router(mode):
    model = DeepSeekMini(small_config(**V3, mtp_depth=1).model)
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    routers = [layer.moe.router.weight for layer in model.layers]
    assert quantize(model, mode) is model
    kinds = {type(m) for m in model.modules()}
    assert not kinds & {nn.Linear, nn.Embedding, RoutedExperts}
    assert isinstance(model.embed, QuantizedEmbedding)
    table = model.embed.table
    assert (model.lm_head.q if mode == "int8" else model.lm_head.weight) is table  # tied, once
    assert [layer.moe.router.weight for layer in model.layers] == routers
    stored = {t.data_ptr(): t.numel() * t.element_size()
              for t in [*model.parameters(), *model.buffers()]}
    assert sum(stored.values()) < float_bytes * (0.3 if mode == "int8" else 0.55)
    assert model.dtype == torch.float32 and model.new_cache(1, 4).latents.dtype == torch.float32
    with pytest.raises(UserError, match="already quantized"):
        quantize(model, mode)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_quantized_cached_decoding_equals_uncached(layout, path, device, request):
    """The latent cache (absorbed for latent_rope) against full recomputation of the same
    quantized model, batch 2 with left padding: each step's logits agree within 0.05
    (bf16 activations, and the cast GEMM where the prefill has many rows) and the greedy
    tokens are equal. fbgemm rounds each product's activations to 8 bits, one row at a
    time in a step and rows brought to one range in a prompt, so its steps agree within
    8% relative at this tiny width (hidden 64), not to the token. And the quantized model
    stays close to its fp32 original (logits within 5% relative; 10% for fbgemm).

    The commands refuse ``--quantize`` off the CPU (``check_device``); on CUDA this runs
    the same model-level paths to learn whether they would work there: neither int8
    kernel (``torch._weight_int8pack_mm``, FBGEMM's packed GEMM) may have a CUDA kernel,
    so a failure there is expected (xfail, not strict) rather than a regression."""
    mode, _ = PATHS[path]
    if device.type != "cpu" and mode == "int8":
        request.applymarker(pytest.mark.xfail(reason="int8 weight-only kernels: CPU only",
                                              strict=False))
    torch.manual_seed(0)
    fp32 = lively(DeepSeekMini(small_config(**LAYOUTS[layout]).model)).to(device)
    model = quantized(copy.deepcopy(fp32), path)
    fbgemm = path == "int8-fbgemm"
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    ids = ids.to(device)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    cached = generate(model, ids, max_new_tokens=24, attention_mask=mask)
    if not fbgemm:
        assert torch.equal(cached, generate(model, ids, max_new_tokens=24,
                                            attention_mask=mask, use_cache=False))
    with torch.inference_mode():
        full_mask = torch.cat([mask, torch.ones(2, 24, dtype=torch.long, device=device)], 1)
        positions = (full_mask.cumsum(-1) - 1).clamp_min(0)
        full = model(cached, positions=positions, attention_mask=full_mask).logits
        cache = model.new_cache(2, cached.shape[1])
        steps = [model(cached[:, :20], cache=cache, positions=positions[:, :20],
                       attention_mask=mask).logits[:, -1]]
        for t in range(20, cached.shape[1] - 1):
            steps.append(model(cached[:, t:t + 1], cache=cache,
                               positions=positions[:, t:t + 1]).logits[:, -1])
        if fbgemm:
            assert relative_error(torch.stack(steps, 1), full[:, 19:-1]) < 0.08
        else:
            torch.testing.assert_close(torch.stack(steps, 1), full[:, 19:-1], atol=0.05, rtol=0)
        reference = fp32(cached, positions=positions, attention_mask=full_mask).logits
        assert relative_error(full[:, 2:], reference[:, 2:]) < (0.1 if fbgemm else 0.05)


@pytest.mark.parametrize("mode", ["int8", "bf16"])
def test_quantized_cross_entropy_is_that_of_its_logits(mode):
    """With targets, a quantized head's CE (chunked through the head module) is the CE of
    the logits it produces, MTP's included."""
    model = quantize(lively(DeepSeekMini(small_config(mtp_depth=1).model)), mode)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    targets = ids.roll(-1, 1)
    targets[:, -1] = -100
    with torch.inference_mode():
        out = model(ids, targets=targets)
        expected = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(out.ce, expected, atol=1e-5, rtol=0)
    assert torch.isfinite(out.mtp_ce)


def trimmed(tie: bool, kept: int = 40, **model) -> DeepSeekMini:
    """A lively model with a trimmed head keeping ``kept`` random ids (all: no "other")."""
    torch.manual_seed(0)
    net = DeepSeekMini(small_config(head_vocab=kept, tie_embeddings=tie, **model).model)
    net.head.set_ids(torch.randperm(256, generator=torch.Generator().manual_seed(4))[:kept])
    return lively(net)


@pytest.mark.parametrize("mode", ["int8", "bf16"])
@pytest.mark.parametrize("tie", [True, False])
def test_quantized_trimmed_head_scores_its_rows_of_the_quantized_table(mode, tie):
    """A trimmed head keeps its ids and classes; its scored rows are the kept rows of the
    quantized head table (the tied embedding's, quantized once) and the quantized "other"
    vector; its full-vocabulary logits follow the head's formula on them, and stay close
    to fp32's (5% relative)."""
    fp32 = trimmed(tie)
    model = quantize(copy.deepcopy(fp32), mode)
    head, ids = model.head, fp32.head.ids
    assert torch.equal(head.ids, ids) and torch.equal(head.classes, fp32.head.classes)
    table = model.lm_head.q if mode == "int8" else model.lm_head.weight
    if tie:
        assert table is model.embed.table
    rows = head.rows.q if mode == "int8" else head.rows.weight
    assert rows.shape == (41, 64) and torch.equal(rows[:40], table[ids])
    if mode == "int8":
        other_q, other_scale = quantize_rows(fp32.head.other[None])
        assert torch.equal(rows[40:], other_q) and torch.equal(head.rows.scale[40:], other_scale)
    ids_in = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        logits, reference = model(ids_in).logits, fp32(ids_in).logits
        hidden = torch.randn(3, 64)
        scores = head.rows(hidden)
        torch.testing.assert_close(head.logits(hidden, head.rows),
                                   scores[:, fp32.head.classes] - fp32.head.offsets)
    assert logits.shape == (2, 12, 256) and relative_error(logits, reference) < 0.05


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kept", [40, 256])  # 256: every id kept, no "other" class
def test_quantized_trimmed_head_decodes_cached_as_uncached_and_its_ce_is_its_logits(path,
                                                                                    kept):
    """Cached greedy decoding of a quantized trimmed head (batch 2, left padding) equals
    full recomputation (for all but 10% of fbgemm's tokens: its 8-bit activations are
    rounded per row in a step, over rows brought to one range in a prompt); with targets
    its CE (chunked through the head module, MTP's included) is the CE of the logits it
    produces, and within 0.02 nats of fp32's (0.05 for fbgemm at this tiny width)."""
    fp32 = trimmed(True, kept, mtp_depth=1)
    model = quantized(copy.deepcopy(fp32), path)
    fbgemm = path == "int8-fbgemm"
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    cached = generate(model, ids, max_new_tokens=16, attention_mask=mask)
    uncached = generate(model, ids, max_new_tokens=16, attention_mask=mask, use_cache=False)
    assert float((cached == uncached).float().mean()) >= (0.9 if fbgemm else 1.0)
    targets = ids.roll(-1, 1)
    targets[:, -1] = -100
    with torch.inference_mode():
        out = model(ids, targets=targets)
        expected = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten())
        reference = fp32(ids, targets=targets).ce
    torch.testing.assert_close(out.ce, expected, atol=1e-5, rtol=0)
    assert torch.isfinite(out.mtp_ce)
    assert abs(float(out.ce - reference)) < (0.05 if fbgemm else 0.02)


def test_unknown_mode_and_unsupported_device_are_one_line_errors():
    model = DeepSeekMini(small_config().model)
    with pytest.raises(UserError, match=r"^unknown quantization 'int4': choose one of int8, "
                                        r"bf16$"):
        quantize(model, "int4")
    with pytest.raises(UserError, match="runs on the CPU only") as err:
        check_device("cuda", "int8")
    assert "\n" not in str(err.value)
    assert cli_main.QUANTIZE_MODES == quantize_module.MODES


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, smollm2_tokenizer):
    cfg = small_config(vocab_size=49152)
    cfg.data.tokenizer = str(smollm2_tokenizer.path)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    atomic_save({"model": DeepSeekMini(cfg.model).state_dict(), "config": cfg.to_dict()}, path)
    return path


def test_load_for_inference_quantizes_and_the_file_stays_full_precision(checkpoint):
    before = checkpoint.read_bytes()
    model, _, _ = load_for_inference(checkpoint, quantize="int8")
    assert model.quantization == "int8" and isinstance(model.lm_head, Int8Linear)
    assert checkpoint.read_bytes() == before


def test_cli_generates_and_evaluates_quantized(checkpoint, capsys, tmp_path):
    args = ["generate", "--checkpoint", str(checkpoint), "--max-new-tokens", "5",
            "--temperature", "0", "--prompt", "Once upon a time"]
    assert main([*args, "--quantize", "int8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Once upon a time") and len(out) > len("Once upon a time\n")
    assert main([*args, "--quantize", "int8", "--no-cache"]) == 0
    assert capsys.readouterr().out == out
    data = tmp_path / "held.txt"
    data.write_text("Tom had a red ball.\n<|endoftext|>\nThe cat sat on the mat.\n")
    ces = {}
    for mode in (None, "int8", "bf16"):
        extra = ["--quantize", mode] if mode else []
        assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--json",
                     "--seq-len", "32",
                     *extra]) == 0
        ces[mode] = float(capsys.readouterr().out.split('"ce": ')[1].split(",")[0])
    assert abs(ces["int8"] - ces[None]) < 0.01 and abs(ces["bf16"] - ces[None]) < 0.01


@pytest.mark.parametrize("argv, message", [
    (["generate", "--checkpoint", "x.pt", "--quantize", "int4"],
     "argument --quantize: invalid choice: 'int4'"),
    (["eval", "--hf-model", "smollm2", "--data", "x.txt", "--quantize", "int8"],
     "--quantize applies to a deepseek-mini --checkpoint"),
])
def test_cli_quantize_errors_are_one_line(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("command", ["generate", "serve", "eval"])
def test_cli_refuses_quantize_off_the_cpu_in_one_line(command, checkpoint, capsys,
                                                      monkeypatch, tmp_path):
    """A machine without CUDA cannot ask for it; a CUDA device is stood in for where each
    command resolves its device."""
    module = __import__(f"deepseek_mini.cli.{command}", fromlist=["resolve_device"])
    monkeypatch.setattr(module, "resolve_device", lambda *a: torch.device("cuda"))
    monkeypatch.setattr(module, "use_threads", lambda *a: None)
    if command == "serve":
        monkeypatch.setattr(module, "check_installed", lambda: None)
    data = tmp_path / "held.txt"
    data.write_text("Tom had a red ball.\n")
    extra = ["--data", str(data)] if command == "eval" else []
    assert main([command, "--checkpoint", str(checkpoint), "--quantize", "int8", *extra]) == 2
    err = capsys.readouterr().err
    assert err == ("error: --quantize int8 runs on the CPU only (its kernels were measured "
                   "there); got device cuda: drop --quantize or use --device cpu\n")


def test_unknown_int8_kernel_is_a_one_line_error():
    with pytest.raises(UserError, match=r"^unknown int8 kernel 'int4pack': choose one of "
                                        r"fbgemm, inductor, int8pack$"):
        quantize(DeepSeekMini(small_config().model), "int8", "int4pack")


@pytest.mark.parametrize(("capability", "kernel"), [("AVX2", "inductor"),
                                                     ("AVX512", "int8pack"),
                                                     ("DEFAULT", "int8pack")])
def test_the_default_kernel_keeps_the_quality_on_every_cpu(monkeypatch, capability, kernel):
    """The compiled one-row kernel where it was measured faster (an AVX2-only CPU),
    int8pack elsewhere; never fbgemm, faster on an AVX2 CPU but whose 7-bit activations
    cost 0.14 nats on a real model (BENCHMARKS.md, "Quantization quality")."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert quantize_module.best_kernel() == kernel


@pytest.mark.parametrize(("out", "width"), [(48, 64), (13, 36)])
def test_compiled_one_row_kernel_is_the_dequantized_product_in_fp32(monkeypatch, out, width):
    """The ``inductor`` kernel's one-row product is fp32 ``F.linear`` with the dequantized
    weight ``q * s`` within fp32 rounding (its activations stay fp32), for word counts
    that are and are not a multiple of the vector width; an expert's slice of a stacked
    [experts, out, in] tensor is read in place, and a layer and experts running the
    kernel give those products."""
    monkeypatch.setattr(quantize_module, "MATVEC_MIN_WEIGHTS", 0)  # tiny matrices too
    torch.manual_seed(0)
    q, scale = quantize_rows(torch.randn(3, out, width))
    x = torch.randn(1, 1, width)

    def reference(q: torch.Tensor, scale: torch.Tensor, x: torch.Tensor = x) -> torch.Tensor:
        return F.linear(x.double(), q.double() * scale.double()[:, None])

    for e in range(3):
        assert quantize_module.matvec_applies(x, q[e])
        product = quantize_module.int8_linear(x, q[e], scale[e], kernel="inductor")
        assert product.shape == (1, 1, out) and product.dtype == torch.float32
        torch.testing.assert_close(product.double(), reference(q[e], scale[e]),
                                   rtol=1e-5, atol=1e-6)
    layer = Int8Linear(q[0], scale[0], "inductor")
    torch.testing.assert_close(layer(x).double(), reference(q[0], scale[0]),
                               rtol=1e-5, atol=1e-6)


def test_compiled_kernel_takes_one_row_of_a_large_matrix_and_falls_back_if_it_fails(
        monkeypatch):
    """Several rows, a width that is not a multiple of 4 or a matrix under
    ``MATVEC_MIN_WEIGHTS`` take int8pack's paths; where the kernel cannot be compiled
    (no C++ compiler, say), a warning, and int8pack's product for the one row too."""
    q, scale = quantize_rows(torch.randn(16, 64))
    assert not quantize_module.matvec_applies(torch.randn(1, 64), q)  # too small
    monkeypatch.setattr(quantize_module, "MATVEC_MIN_WEIGHTS", 0)
    assert not quantize_module.matvec_applies(torch.randn(2, 64), q)
    assert not quantize_module.matvec_applies(torch.randn(1, 18), torch.ones(4, 18).char())

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(quantize_module, "_MATVEC", {})
    monkeypatch.setattr(torch._inductor, "compile", broken)
    x = torch.randn(1, 64)
    with pytest.warns(UserWarning, match="compiled int8 kernel is unavailable"):
        assert not quantize_module.matvec_applies(x, q)
    assert quantize_module.compiled_matvec(16, 64) is None  # not tried again
    torch.testing.assert_close(quantize_module.int8_linear(x, q, scale, kernel="inductor"),
                               quantize_module.int8_linear(x, q, scale), rtol=0, atol=0)


def test_compiled_fbgemm_ops_match_the_eager_products():
    """A compiled step cannot trace FBGEMM's packed weights, so it calls opaque ops that
    find them by the int8 matrix: the same products as eager, a layer's and the gathered
    experts', for a deep-copied model too (packed on first use)."""
    torch.manual_seed(0)
    layer = Int8Linear.from_weight(torch.randn(48, 64) * 0.05, "fbgemm")
    x = torch.randn(1, 3, 64)
    linear = quantize_module.fbgemm_linear_op
    torch.testing.assert_close(linear(x, layer.q, layer.scale), layer(x), rtol=0, atol=0)
    copied = copy.deepcopy(layer)
    torch.testing.assert_close(linear(x, copied.q, copied.scale), layer(x), rtol=0, atol=0)
    experts = RoutedExperts(4, 64, 48, "swiglu")
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(std=0.1)
    int8 = Int8Experts(experts, "fbgemm")
    rows, chosen = torch.randn(3, 64), torch.tensor([2, 0, 2])
    expected = torch.cat([int8.one_token(rows[i:i + 1], chosen[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(int8.gathered(rows, chosen), expected, rtol=0, atol=0)
