"""Each fast path against the plain way of computing the same thing, at the base config's
shapes (batch 8 × 128 tokens, hidden 576, 8 experts of 1536, vocab 49,152):

    python benchmarks/training/fast_path_kernels.py [--repeats 5] [--threads N]

- routed experts: ``torch._grouped_mm`` over tokens sorted by expert vs one matmul per
  expert (forward, and forward + backward);
- routed experts' backward: each projection's forward and backward timed apart, grouped
  vs one dense matmul of the same FLOPs (the backward should cost 2x the forward);
- LM head + cross-entropy: chunked ``linear_cross_entropy`` vs ``F.cross_entropy`` on
  the full logits (forward + backward);
- attention: SDPA with the one KV head broadcast (``enable_gqa``) vs explicit softmax
  over repeated KV heads (forward + backward);
- AdamW over 60 M parameters: fused vs foreach vs the per-tensor loop;
- a 1024² matmul in fp32 vs bf16, in both layouts (why the CPU trains in fp32).

The equality of each pair is tests/test_fast_paths.py's business; this only times them.
Each figure is the fastest of ``--repeats`` runs: on a shared machine the minimum is the
least disturbed estimate.

Fills BENCHMARKS.md, section "Where the time goes".
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F

from deepseek_mini.model.loss import linear_cross_entropy

TOKENS, HIDDEN, EXPERTS, INNER, VOCAB, TOP_K = 1024, 576, 8, 1536, 49152, 2
HEADS, HEAD_DIM, SEQ = 8, 72, 128


def fastest(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def report(name: str, fast: float, slow: float, fast_label: str, slow_label: str) -> None:
    print(f"{name:<34}{fast_label:>14} {fast * 1e3:9.1f} ms   {slow_label:>14} "
          f"{slow * 1e3:9.1f} ms   {slow / fast:6.2f}x")


def experts(repeats: int) -> None:
    slots = TOKENS * TOP_K
    x = torch.randn(slots, HIDDEN, requires_grad=True)
    w = (torch.randn(EXPERTS, HIDDEN, INNER) * 0.02).requires_grad_()
    counts = torch.bincount(torch.randint(0, EXPERTS, (slots,)), minlength=EXPERTS)
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    grad = torch.randn(slots, INNER)

    def grouped():
        return torch._grouped_mm(x, w, offs=offsets)

    def loop():
        return torch.cat([c @ w[e] for e, c in enumerate(x.split(counts.tolist()))])

    def with_backward(fn):
        def run():
            fn().backward(grad)
            x.grad = w.grad = None
        return run

    with torch.no_grad():
        report("experts up-proj, forward", fastest(grouped, repeats), fastest(loop, repeats),
               "grouped_mm", "loop")
    report("experts up-proj, fwd + bwd", fastest(with_backward(grouped), repeats),
           fastest(with_backward(loop), repeats), "grouped_mm", "loop")


def forward_backward(forward: Callable[[], torch.Tensor], grad: torch.Tensor,
                     leaves: tuple[torch.Tensor, ...], repeats: int) -> tuple[float, float]:
    """Fastest forward and fastest backward of ``repeats`` runs, each timed on its own.
    The leaves' gradients are dropped after each run, so no backward accumulates."""
    best_forward = best_backward = math.inf
    for _ in range(repeats + 1):
        start = time.perf_counter()
        out = forward()
        middle = time.perf_counter()
        out.backward(grad)
        end = time.perf_counter()
        for leaf in leaves:
            leaf.grad = None
        best_forward = min(best_forward, middle - start)
        best_backward = min(best_backward, end - middle)
    return best_forward, best_backward


def projection_backward(width_in: int, width_out: int, counts: torch.Tensor,
                        repeats: int) -> None:
    """One projection of the routed experts, ``width_in`` -> ``width_out``."""
    slots = int(counts.sum())
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    x = torch.randn(slots, width_in, requires_grad=True)
    w = (torch.randn(EXPERTS, width_in, width_out) * 0.02).requires_grad_()
    dense = w[0].detach().clone().requires_grad_()
    grad = torch.randn(slots, width_out)
    timings = {
        "grouped_mm": forward_backward(lambda: torch._grouped_mm(x, w, offs=offsets), grad,
                                       (x, w), repeats),
        "dense mm": forward_backward(lambda: x @ dense, grad, (x, dense), repeats)}
    for name, (fwd, bwd) in timings.items():
        print(f"experts {width_in}->{width_out}, {name:<11} forward {fwd * 1e3:6.1f} ms"
              f"   backward {bwd * 1e3:6.1f} ms   backward/forward {bwd / fwd:4.2f}")


def experts_backward(repeats: int) -> None:
    """Whether the grouped product's backward (grad_x and grad_W, 2x the forward's FLOPs)
    costs more than 2x its forward, against one dense matmul over the same rows. Buffers
    are recycled from one repeat to the next here, so no first-touch page faults."""
    counts = torch.bincount(torch.randint(0, EXPERTS, (TOKENS * TOP_K,)), minlength=EXPERTS)
    projection_backward(HIDDEN, INNER, counts, repeats)
    projection_backward(INNER, HIDDEN, counts, repeats)


def cross_entropy(repeats: int) -> None:
    hidden = torch.randn(TOKENS, HIDDEN, requires_grad=True)
    weight = (torch.randn(VOCAB, HIDDEN) * 0.02).requires_grad_()
    targets = torch.randint(0, VOCAB, (TOKENS,))

    def run(loss_fn):
        def step():
            loss_fn().backward()
            hidden.grad = weight.grad = None
        return step

    chunked = run(lambda: linear_cross_entropy(hidden, weight, targets))
    full = run(lambda: F.cross_entropy((hidden @ weight.T).float(), targets))
    report("LM head + CE, fwd + bwd", fastest(chunked, repeats), fastest(full, repeats),
           "chunked", "full logits")


def attention(repeats: int) -> None:
    batch = TOKENS // SEQ
    q = torch.randn(batch, HEADS, SEQ, HEAD_DIM, requires_grad=True)
    k = torch.randn(batch, 1, SEQ, HEAD_DIM, requires_grad=True)
    v = torch.randn(batch, 1, SEQ, HEAD_DIM, requires_grad=True)
    grad = torch.randn(batch, HEADS, SEQ, HEAD_DIM)
    future = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def explicit():
        kk, vv = k.repeat_interleave(HEADS, dim=1), v.repeat_interleave(HEADS, dim=1)
        scores = (q @ kk.transpose(-1, -2) / math.sqrt(HEAD_DIM)).masked_fill(future, -math.inf)
        return scores.softmax(-1) @ vv

    def with_backward(fn):
        def run():
            fn().backward(grad)
            q.grad = k.grad = v.grad = None
        return run

    report("attention, fwd + bwd", fastest(with_backward(sdpa), repeats),
           fastest(with_backward(explicit), repeats), "SDPA gqa", "explicit")


def adamw(repeats: int) -> None:
    def make(**kind):
        params = [torch.nn.Parameter(torch.randn(HIDDEN, INNER)) for _ in range(68)]
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer = torch.optim.AdamW(params, lr=1e-4, **kind)
        return optimizer.step

    fused = fastest(make(fused=True), repeats)
    report("AdamW step, 60 M params", fused, fastest(make(foreach=True), repeats),
           "fused", "foreach")
    report("AdamW step, 60 M params", fused, fastest(make(foreach=False), repeats),
           "fused", "per-tensor")


def matmul_dtypes(repeats: int) -> None:
    """bf16 against fp32 in both layouts the model uses: ``x @ w`` (the grouped expert
    GEMMs, the LM head) and ``F.linear`` (``x @ w.T``, every nn.Linear); oneDNN's AVX2
    emulation of bf16 is far slower in the first."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a16, b16 = a.bfloat16(), b.bfloat16()
    report("1024^2 matmul, x @ w", fastest(lambda: a @ b, repeats),
           fastest(lambda: a16 @ b16, 1), "fp32", "bf16")
    report("1024^2 matmul, F.linear", fastest(lambda: F.linear(a, b), repeats),
           fastest(lambda: F.linear(a16, b16), repeats), "fp32", "bf16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} threads; fastest of {args.repeats}; last column: "
          "how many times slower the plain way is")
    torch.manual_seed(0)
    for bench in (experts, experts_backward, cross_entropy, attention, adamw,
                  matmul_dtypes):
        bench(args.repeats)


if __name__ == "__main__":
    main()
