"""Which kernel a weight-only int8 product should use on this CPU: PyTorch's
``torch._weight_int8pack_mm`` with fp32 or bf16 activations, ``torch._int_mm`` with the
activations quantized to int8 on the fly, a cast of the int8 matrix to bf16 followed by a
bf16 GEMM (``deq-bf16``), and bf16 weights, each against fp32 ``F.linear``.

``--count`` different matrices per shape, cycled (far more than the caches hold), so each
product streams its weights from memory as a decoding step does; best of three passes,
one thread. Ratios are speed-ups over fp32 in the same pass.

    python benchmarks/decoding/int8_kernels.py --rows 1 2 4 8 16 32 64

Fills BENCHMARKS.md, section "int8 and bf16 weights".
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn import functional as F

SHAPES = [(1536, 576), (576, 1536), (49152, 576)]  # expert up / down, LM head


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


def timings(x: torch.Tensor, ws, wb, q32, qb, qt) -> tuple[float, list[float]]:
    """fp32's time for ``x`` through every matrix, and each alternative's."""
    xb = x.bfloat16()
    fp32 = best_time(lambda w: F.linear(x, w), ws)
    return fp32, [
        best_time(lambda w: F.linear(xb, w), wb),
        best_time(lambda p: torch._weight_int8pack_mm(x, *p), q32),
        best_time(lambda p: torch._weight_int8pack_mm(xb, *p), qb),
        best_time(lambda p: int_mm(x, *p), qt),
        best_time(lambda p: F.linear(xb, p[0].bfloat16()) * p[1], qb),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--count", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print("| shape (out x in) | rows | fp32 ms | bf16 weights | int8pack, fp32 x | "
          "int8pack, bf16 x | _int_mm, dynamic | deq-bf16 |")
    print("|---|---|---|---|---|---|---|---|")
    for n, k in SHAPES:
        count = max(2, args.count * 1536 * 576 // (n * k))
        ws = [torch.randn(n, k) * 0.02 for _ in range(count)]
        wb = [w.bfloat16() for w in ws]
        q32 = [quantized(w) for w in ws]
        qb = [(q, s.bfloat16()) for q, s in q32]
        qt = [(q.t().contiguous(), s) for q, s in q32]
        for m in args.rows:
            fp32, others = timings(torch.randn(m, k), ws, wb, q32, qb, qt)
            print(f"| {n} x {k} | {m} | {1e3 * fp32 / count:.3f} | "
                  + " | ".join(f"{fp32 / t:.2f}x" for t in others) + " |", flush=True)
        del ws, wb, q32, qb, qt


if __name__ == "__main__":
    main()
