"""Which kernel a weight-only quantized product should use on this CPU, on a decoding
step's own layer shapes: each contender's time against fp32 ``F.linear``.

Contenders (weights quantized per output channel; activations as each kernel takes them):

* ``int8pack bf16`` / ``int8pack fp32``: ``torch._weight_int8pack_mm`` with bf16 or fp32
  activations (gpt-fast's weight-only route; bf16 is what ``quantize``'s default
  ``int8pack`` kernel runs);
* ``int_mm dyn``: ``torch._int_mm`` (int8 x int8 -> int32) with the activations quantized
  per row on the fly;
* ``fbgemm dyn``: ``torch.ops.quantized.linear_dynamic`` (FBGEMM's packed int8 GEMM with
  per-tensor dynamic activation quantization, what ``torch.ao`` dynamic quantization and
  ``quantize``'s opt-in ``fbgemm`` kernel run);
* ``fbgemm fp16``: ``torch.ops.quantized.linear_dynamic_fp16`` (fp16 weights, fp32 x);
* ``int4pack``: ``torch._weight_int4pack_mm_for_cpu`` (groups of 32, bf16 activations);
* ``deq-bf16``: the int8 matrix cast to bf16 and one bf16 GEMM (what ``int8pack`` does
  past ``DEQUANTIZE_ROWS`` rows, a prompt's prefill);
* ``bf16 weights``: ``F.linear`` in bf16 (``--quantize bf16``).

``--megabytes`` of fp32 weights per shape in different matrices (far more bytes than the
caches hold), cycled, so each product streams its weights from memory as a decoding step
does; best of three passes, one thread. ``GB/s`` is fp32's weight bytes over its time;
each contender's column is its speed-up over fp32 in the same pass, with its relative
error against fp32 in brackets.

    python benchmarks/decoding/int8_kernels.py --rows 1 4
    python benchmarks/decoding/int8_kernels.py --models v3-mini --rows 1 2 8 16 32 64

Fills BENCHMARKS.md, section "int8 and bf16 weights".
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch.nn import functional as F

# (out, in) of the decode step's products: deepseek-v3-mini (hidden 576: q 576, kv_down
# 96, o 576, experts 1536, head 49,152) and cpu-hour (hidden 256: dense MLP 1536, the
# trimmed head's 8,193 rows).
SHAPES = {
    "v3-mini": [(576, 576), (96, 576), (1536, 576), (576, 1536), (49152, 576)],
    "cpu-hour": [(256, 256), (1536, 256), (256, 1536), (8192, 256)],
}


def best_time(fn, items, passes: int = 3) -> float:
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - start)
    return best


def quantized(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax(1) / 127
    return (w / scale[:, None]).round().to(torch.int8), scale


def int_mm(x: torch.Tensor, q_t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 x int8 -> int32 with a per-row activation scale (dynamic quantization)."""
    x_scale = x.abs().amax(1, keepdim=True) / 127
    xq = (x / x_scale).round().to(torch.int8)
    return torch._int_mm(xq, q_t).float() * x_scale * scale


def fbgemm_packed(w: torch.Tensor) -> object:
    q, scale = quantized(w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(
            q, scale.double(), torch.zeros(w.shape[0], dtype=torch.long), 0)
    return torch.ops.quantized.linear_prepack(qw, None)


def int4_packed(w: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32)
    zero = lo + 8 * scale  # the kernel computes (q - 8) * scale + zero
    packed = torch._convert_weight_to_int4pack_for_cpu(q.reshape(n, k), 1)
    sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().bfloat16()
    return packed, sz


CONTENDERS = {
    "int8pack bf16": (lambda w: tuple(t.bfloat16() if t.is_floating_point() else t
                                      for t in quantized(w)),
                      lambda x, p: torch._weight_int8pack_mm(x.bfloat16(), *p)),
    "int8pack fp32": (quantized, lambda x, p: torch._weight_int8pack_mm(x, *p)),
    "int_mm dyn": (lambda w: (lambda q, s: (q.t().contiguous(), s))(*quantized(w)),
                   lambda x, p: int_mm(x, *p)),
    "fbgemm dyn": (fbgemm_packed, lambda x, p: torch.ops.quantized.linear_dynamic(x, p, True)),
    "fbgemm fp16": (lambda w: torch.ops.quantized.linear_prepack_fp16(w, None),
                    lambda x, p: torch.ops.quantized.linear_dynamic_fp16(x, p)),
    "int4pack": (int4_packed,
                 lambda x, p: torch._weight_int4pack_mm_for_cpu(x.bfloat16(), p[0], 32, p[1])),
    "deq-bf16": (lambda w: (lambda q, s: (q, s.bfloat16()))(*quantized(w)),
                 lambda x, p: F.linear(x.bfloat16(), p[0].bfloat16()) * p[1]),
    "bf16 weights": (lambda w: w.bfloat16(), lambda x, p: F.linear(x.bfloat16(), p)),
}


def error(x: torch.Tensor, w: torch.Tensor, p: object, fn) -> float:
    """Relative error of a contender's product against fp32."""
    ref = F.linear(x, w)
    return ((fn(x, p).float() - ref).norm() / ref.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--megabytes", type=float, default=300,
                        help="fp32 weight bytes per shape, cycled")
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS),
                        choices=list(CONTENDERS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    names = args.contenders
    print(f"threads 1, capability {torch.backends.cpu.get_cpu_capability()}; "
          "speed-up over fp32 (relative error)")
    print("| model | shape (out x in) | rows | fp32 ms | fp32 GB/s | " + " | ".join(names) + " |")
    print("|---|---|---|---|---|" + "---|" * len(names))
    for model in args.models:
        for n, k in SHAPES[model]:
            count = max(2, int(args.megabytes * 1e6 / (4 * n * k)))
            ws = [torch.randn(n, k) * 0.02 for _ in range(count)]
            packs = {name: [CONTENDERS[name][0](w) for w in ws] for name in names}
            for m in args.rows:
                x = torch.randn(m, k)
                fp32 = best_time(lambda w, x=x: F.linear(x, w), ws)
                cells = []
                for name in names:
                    fn = CONTENDERS[name][1]
                    t = best_time(lambda p, fn=fn, x=x: fn(x, p), packs[name])
                    cells.append(f"{fp32 / t:.2f}x ({error(x, ws[0], packs[name][0], fn):.0e})")
                print(f"| {model} | {n} x {k} | {m} | {1e3 * fp32 / count:.3f} | "
                      f"{4e-9 * n * k * count / fp32:.1f} | " + " | ".join(cells) + " |",
                      flush=True)
            del ws, packs


if __name__ == "__main__":
    main()
