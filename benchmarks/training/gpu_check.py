"""One script for the CUDA paths: what runs on a GPU, how fast, and whether it fits.

    python benchmarks/training/gpu_check.py                  # base config, batch 8 x 128
    python benchmarks/training/gpu_check.py --json gpu.json  # also keep the report
    python benchmarks/training/gpu_check.py --smoke          # exercise the script on the CPU

It checks, and prints one line each:
- TF32: what ``train.tf32`` leaves set for fp32 matmuls;
- attention: which SDPA backends accept the model's shapes (8 query heads, 1 KV head of
  72, causal, ``enable_gqa``) and which kernel the default dispatch actually runs;
- routed experts: whether ``torch._grouped_mm`` runs for each dtype (else the per-expert
  loop) and equals the loop, forward and backward;
- training: ``--steps`` steps of the trainer's own step per precision (fp16 with the
  GradScaler, bf16 where the GPU has it): finite losses, the loss scale, tokens/s, MFU
  against the matmul peak measured here in that dtype, and peak memory against an A10G's
  24 GB;
- decoding: ``generate`` tokens/s at batch 1 and 8 with 16-bit weights.

Without a CUDA device it says so and exits with status 0: nothing is guessed.

Fills BENCHMARKS.md, section "GPU".
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import _paths  # noqa: F401, E402 (puts benchmarks/ on sys.path)
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from deepseek_mini import Config  # noqa: E402
from deepseek_mini.inference.generate import generate  # noqa: E402
from deepseek_mini.model.moe import _grouped_mm_works, grouped_matmul  # noqa: E402
from deepseek_mini.train.mfu import format_flops, measure_matmul_peak  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
A10G_BYTES = 24 * 10**9
SMOKE = ["model.vocab_size=512", "model.hidden_size=64", "model.num_layers=2",
         "model.num_heads=4", "model.expert_hidden=128"]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def check_tf32(cfg: Config) -> dict:
    from deepseek_mini.train.precision import setup_precision

    setup_precision(cfg.train)
    return {"train.tf32": cfg.train.tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32}


def check_attention(cfg: Config, device: torch.device, dtype: torch.dtype) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    m = cfg.model
    shape = (8, m.num_heads, cfg.data.seq_len, m.head_dim)
    q = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    kv_shape = (8, m.num_kv_heads, cfg.data.seq_len, m.head_dim)
    k = torch.randn(kv_shape, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(kv_shape, device=device, dtype=dtype, requires_grad=True)

    def attend() -> None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             enable_gqa=m.num_kv_heads != m.num_heads)
        out.float().sum().backward()

    accepted = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel(backend):
                attend()
            accepted[backend.name] = True
        except RuntimeError:
            accepted[backend.name] = False
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        attend()
    names = {e.key for e in prof.key_averages()}
    ran = sorted(n for n in names if any(s in n.lower() for s in
                                         ("flash", "efficient", "fmha", "cudnn", "_math")))
    return {"dtype": str(dtype), "accepted": accepted, "kernels_run": ran[:6]}


def check_grouped_mm(device: torch.device) -> dict:
    report = {}
    for name, dtype in DTYPES.items():
        torch.manual_seed(0)
        counts = torch.tensor([300, 0, 500, 224], device=device)
        x = torch.randn(1024, 576, device=device, dtype=dtype, requires_grad=True)
        w = (torch.randn(4, 576, 1536, device=device) * 0.02).to(dtype).requires_grad_()
        grad = torch.randn(1024, 1536, device=device, dtype=dtype)
        fast = grouped_matmul(x, w, counts)
        fast.backward(grad)
        fast_grads = x.grad.clone(), w.grad.clone()
        x.grad = w.grad = None
        slow = torch.cat([c @ w[e] for e, c in enumerate(x.split(counts.tolist()))])
        slow.backward(grad)
        tol = {"rtol": 2e-2, "atol": 2e-2} if dtype != torch.float32 else {}
        try:
            for a, b in ((fast, slow), (fast_grads[0], x.grad), (fast_grads[1], w.grad)):
                torch.testing.assert_close(a.float(), b.float(), **tol)
            equal = True
        except AssertionError:
            equal = False
        report[name] = {"grouped_mm": _grouped_mm_works(device.type, dtype),
                        "equals_loop": equal}
    return report


def check_training(cfg: Config, steps: int, peak: float) -> dict:
    from helpers.contenders import build_ours

    device = torch.device(cfg.train.device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    contender = build_ours(cfg)
    precision, run_losses = contender.precision, []
    ids = torch.randint(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.data.seq_len + 1),
                        device=device)
    for _ in range(3):  # warm-up, and the optimizer state's first allocation
        contender.train_step(ids)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        losses, finite = contender.train_step(ids)
        run_losses.append((losses[0], finite))
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    tokens_per_s = cfg.train.batch_size * cfg.data.seq_len / seconds
    report = {
        "precision": precision.describe(),
        "losses": [round(float(loss), 4) for loss, _ in run_losses],
        "all_finite": all(bool(f) for _, f in run_losses),
        "loss_scale": precision.scaler.get_scale() if precision.scaler.is_enabled()
        else None,
        "step_s": seconds, "tokens_per_s": tokens_per_s,
        "mfu": contender.train_flops_per_token * tokens_per_s / peak,
        "peak": format_flops(peak),
    }
    if device.type == "cuda":
        allocated = torch.cuda.max_memory_allocated(device)
        report.update(peak_allocated_gb=allocated / 1e9,
                      peak_reserved_gb=torch.cuda.max_memory_reserved(device) / 1e9,
                      fits_a10g=torch.cuda.max_memory_reserved(device) < 0.95 * A10G_BYTES)
    report["decode_tokens_per_s"] = check_decoding(contender.model, cfg)
    return report


def check_decoding(model: torch.nn.Module, cfg: Config, new_tokens: int = 32) -> dict:
    device = model.device
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    decoder = copy.deepcopy(model).to(dtype).eval()
    speeds = {}
    for batch in (1, 8):
        prompt = torch.randint(0, cfg.model.vocab_size, (batch, 16), device=device)
        generate(decoder, prompt, max_new_tokens=2)
        _sync(device)
        start = time.perf_counter()
        generate(decoder, prompt, max_new_tokens=new_tokens)
        _sync(device)
        speeds[batch] = batch * new_tokens / (time.perf_counter() - start)
    return speeds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "base.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--precisions", default="fp16,bf16")
    p.add_argument("--smoke", action="store_true",
                   help="run every check on the CPU with a tiny model (tests the script)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine, so nothing was checked "
              "(run it where there is one; --smoke exercises the script on the CPU)")
        return 0
    device = torch.device("cpu" if args.smoke else "cuda")
    overrides = [f"train.device={device.type}", "train.batch_size=8",
                 "train.micro_batch_size=8", "data.seq_len=128", *args.set]
    if args.smoke:
        overrides = SMOKE + overrides
    base = Config.from_yaml(args.config, overrides=overrides)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)"
    print(f"device: {name}; torch {torch.__version__}; model "
          f"{base.model.num_layers} layers, batch {base.train.batch_size} x "
          f"{base.data.seq_len}")
    report: dict = {"device": name, "tf32": check_tf32(base)}
    print(f"TF32: {report['tf32']}")
    attn_dtype = torch.float16 if device.type == "cuda" else torch.float32
    report["attention"] = check_attention(base, device, attn_dtype)
    print(f"attention: {report['attention']}")
    report["grouped_mm"] = check_grouped_mm(device)
    print(f"grouped expert GEMMs: {report['grouped_mm']}")
    for precision in args.precisions.split(","):
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            print("training bf16: this GPU has no bf16; skipped")
            continue
        cfg = Config.from_yaml(args.config, overrides=overrides + [
            f"train.precision={precision}"])
        peak = measure_matmul_peak(device, DTYPES[precision])
        report[f"train_{precision}"] = check_training(cfg, args.steps, peak)
        print(f"training {precision}: {report[f'train_{precision}']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
