"""Is there a faster accurate int8 weight-only product for one-token decoding than
``torch._weight_int8pack_mm``? Each contender's time on a decode step's own shapes, as a
ratio against that kernel (what ``quantize``'s default ``int8pack`` runs) in the same
process, with the weight bytes it streams per second.

Contenders (int8 weights ``q`` [out, in] with one bf16-rounded scale per output channel):

* ``int8pack``: ``torch._weight_int8pack_mm`` on bf16 activations (the baseline);
* ``inductor sum``: ``torch.compile`` (inductor's C++ backend, ``dynamic=False``) of
  ``(x.unsqueeze(-2) * q.to(x.dtype)).sum(-1) * scale`` in fp32. Inductor fuses the int8
  load and its conversion into one vectorised reduction per output channel, but its AVX2
  code loads an int8 (or int32) vector through a stack buffer, a store-forwarding stall
  per load (fp32 vectors load directly);
* ``inductor words``: the same reduction with the int8 matrix read in place as [out,
  in / 4] 32-bit words handed over as fp32 bit patterns (``words``: loaded directly, then
  bitcast), each byte sign-extended by two shifts and multiplied by its activation, the
  activations de-interleaved to match per call (``columns``); through ``torch.compile``
  (``dynamic=False``), as a model would call it;
* ``words, no dynamo``: the same compiled kernel called without dynamo's per-call frame
  and guards (``torch._inductor.compile`` of its ``make_fx`` graph): the kernel's own
  speed plus inductor's wrapper;
* ``inductor linear``: the gpt-fast form ``F.linear(x, q.to(x.dtype)) * scale`` compiled
  the same way (inductor writes the whole fp32 weight, then calls the GEMM), and ``linear,
  decompose``: with ``decompose_mem_bound_mm`` on;
* ``fbgemm fp16``: FBGEMM's fp16-weight product ``linear_dynamic_fp16`` (fp32
  activations, twice int8's bytes), a comparison point;
* ``fp32``: ``F.linear`` on the dequantized fp32 weight (four times the bytes).

``--megabytes`` of int8 weights per shape in different matrices (far more than the
caches hold), cycled, so every product streams its weights from memory as a decoding
step does; best of ``--passes`` passes, one thread. ``err`` is the largest difference
from the dequantized weight's product in float64, relative to that product's largest
magnitude (fp32 rounding: ~1e-7; bf16 activations: ~3e-3). Each compiled form compiles
once per shape and row count (its first call, printed; inductor's on-disk cache makes a
second run's compiles short).

    python benchmarks/decoding/int8_matvec_compiled.py --rows 1 4

Fills BENCHMARKS.md, section "A compiled one-row int8 kernel for AVX2".
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch._inductor import config as inductor_config
from torch.fx.experimental.proxy_tensor import make_fx
from torch.nn import functional as F

# (out, in) of the int8 products of a batch-1 decode step (``quantize``'s layers):
# deepseek-v3-mini: q and o 576 x 576, kv down 96 x 576, the SwiGLU experts' joined
# gate/up 3072 x 576 and down 576 x 1536, the tied head 49,152 x 576; configs/base.yaml
# adds its 72-row kv down and GELU experts' 1536 x 576 up.
SHAPES = [(576, 576), (96, 576), (72, 576), (3072, 576), (1536, 576), (576, 1536),
          (49152, 576)]


def reduction(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.unsqueeze(-2) * q.to(x.dtype)).sum(-1) * scale


def linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return F.linear(x, q.to(x.dtype)) * scale


def linear_decomposed(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``linear`` under another name, so that its compile (with ``decompose_mem_bound_mm``)
    is not served from ``linear``'s cache."""
    return F.linear(x, q.to(x.dtype)) * scale


def words(q: torch.Tensor) -> torch.Tensor:
    """int8 ``q`` [out, in] (``in`` a multiple of 4) in place as [out, in / 4] fp32 bit
    patterns: word i of a row holds columns 4i..4i+3, byte j column 4i+j."""
    return q.view(torch.float32)


def columns(x: torch.Tensor) -> torch.Tensor:
    """Activations [rows, in] as [rows, 4, in / 4], ``[r, j, i]`` being column 4i+j: byte
    j of every word meets a contiguous run."""
    return x.reshape(x.shape[0], -1, 4).transpose(1, 2).contiguous()


def word_product(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (q * scale).T`` in fp32 from ``columns(x)`` and ``words(q)``."""
    w = w.view(torch.int32)
    acc = None
    for j in range(4):
        term = x[:, None, j, :] * ((w << (24 - 8 * j)) >> 24).to(torch.float32)
        acc = term if acc is None else acc + term
    return acc.sum(-1) * scale


def compiled(fn: Callable, **options: object) -> Callable:
    """``fn`` through ``torch.compile`` with ``options`` patched into inductor's config
    (the first call on each shape compiles, later calls check guards and run)."""
    inner = torch.compile(fn, dynamic=False)

    def run(*args: torch.Tensor) -> torch.Tensor:
        with inductor_config.patch(options):
            return inner(*args)
    return run if options else inner


def without_dynamo(fn: Callable) -> Callable:
    """``fn`` compiled by inductor from its traced graph, once per input shape, and called
    without dynamo (no frame evaluation, no guards)."""
    kernels: dict[tuple, Callable] = {}

    def run(*args: torch.Tensor) -> torch.Tensor:
        key = tuple(a.shape for a in args)
        if key not in kernels:
            kernels[key] = torch._inductor.compile(make_fx(fn)(*args), list(args))
        return kernels[key](*args)
    return run


def contenders() -> dict[str, tuple[Callable, Callable]]:
    """name: (prepare(q, scale) -> weights, product(x, weights) -> [rows, out])."""
    red, wrd, bare = compiled(reduction), compiled(word_product), without_dynamo(word_product)
    lin, dec = compiled(linear), compiled(linear_decomposed, decompose_mem_bound_mm=True)
    same = lambda q, s: (q, s)  # noqa: E731
    return {
        "int8pack": (lambda q, s: (q, s.bfloat16()),
                     lambda x, p: torch._weight_int8pack_mm(x.bfloat16(), *p).float()),
        "inductor sum": (same, lambda x, p: red(x, *p)),
        "inductor words": (lambda q, s: (words(q), s), lambda x, p: wrd(columns(x), *p)),
        "words, no dynamo": (lambda q, s: (words(q), s), lambda x, p: bare(columns(x), *p)),
        "inductor linear": (same, lambda x, p: lin(x, *p)),
        "linear, decompose": (same, lambda x, p: dec(x, *p)),
        "fbgemm fp16": (lambda q, s: torch.ops.quantized.linear_prepack_fp16(
                            q.float() * s[:, None], None),
                        lambda x, p: torch.ops.quantized.linear_dynamic_fp16(x, p)),
        "fp32": (lambda q, s: q.float() * s[:, None], lambda x, p: F.linear(x, p)),
    }


BYTES_PER_WEIGHT = {"fbgemm fp16": 2, "fp32": 4}
COMPILED = ("inductor", "words", "linear")


def best_time(fn: Callable, items: list, passes: int) -> float:
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - start)
    return best


def error(out: torch.Tensor, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> float:
    ref = F.linear(x.double(), q.double() * scale.double()[:, None])
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


def measure(n: int, k: int, rows: list[int], names: list[str], table: dict,
            megabytes: float, passes: int) -> None:
    """One shape's table rows: each contender at each row count, as a ratio to int8pack."""
    count = max(2, int(megabytes * 1e6 / (n * k)))
    qs = [torch.randint(-127, 128, (n, k), dtype=torch.int8) for _ in range(count)]
    # scales rounded to bf16 (quantize's), so every contender multiplies by the same weight
    scales = [(torch.rand(n) * 1e-3).bfloat16().float() for _ in range(count)]
    xs = {m: torch.randn(m, k) for m in rows}
    times: dict[tuple[str, int], float] = {}
    cells: dict[tuple[str, int], str] = {}
    compiles: dict[int, list[str]] = {m: [] for m in rows}
    for name in names:
        prepare, product = table[name]
        packs = [prepare(q, s) for q, s in zip(qs, scales, strict=True)]
        for m, x in xs.items():
            start = time.perf_counter()
            out = product(x, packs[0])
            if name.startswith(COMPILED):
                compiles[m].append(f"{name} {time.perf_counter() - start:.1f} s")
            t = best_time(lambda p, fn=product, x=x: fn(x, p), packs, passes)
            gbs = BYTES_PER_WEIGHT.get(name, 1) * n * k * count / t / 1e9
            times[name, m] = t
            cells[name, m] = f"{gbs:.1f} GB/s, {error(out, x, qs[0], scales[0]):.0e}"
        del packs
    for m in rows:
        base = times.get(("int8pack", m), times[names[0], m])
        print(f"| {n} x {k} | {m} | {1e6 * base / count:.1f} | " + " | ".join(
            f"{base / times[name, m]:.2f}x, {cells[name, m]}" for name in names) + " |",
            flush=True)
        if compiles[m]:
            print(f"  compile: {', '.join(compiles[m])}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--shapes", nargs="+", default=[f"{n}x{k}" for n, k in SHAPES],
                        help="OUTxIN")
    parser.add_argument("--megabytes", type=float, default=96,
                        help="int8 weight bytes per shape, cycled")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--contenders", nargs="+", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    table = contenders()
    names = args.contenders or list(table)
    print(f"threads 1, capability {torch.backends.cpu.get_cpu_capability()}, torch "
          f"{torch.__version__}; each cell: speed-up over int8pack, weight GB/s, err")
    print("| shape (out x in) | rows | int8pack us | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for shape in args.shapes:
        n, k = map(int, shape.split("x"))
        measure(n, k, args.rows, names, table, args.megabytes, args.passes)


if __name__ == "__main__":
    main()
