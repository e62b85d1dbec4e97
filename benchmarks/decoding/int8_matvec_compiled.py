"""Is there a faster accurate int8 weight-only product for one-token decoding than
``torch._weight_int8pack_mm``? Each contender's time on a decode step's own shapes, as a
ratio against that kernel (what ``quantize``'s default ``int8pack`` runs) in the same
process, with the weight bytes it streams per second.

Contenders (int8 weights ``q`` [out, in] with one scale per output channel):

* ``int8pack``: ``torch._weight_int8pack_mm`` on bf16 activations (the baseline);
* ``inductor sum``: ``torch.compile`` (inductor's C++ backend, ``dynamic=False``) of
  ``(x.unsqueeze(-2) * q.to(x.dtype)).sum(-1) * scale`` in fp32: inductor fuses the int8
  load and its conversion into one vectorised reduction per output channel, so only the
  int8 bytes are read;
* ``inductor words``: what ``quantize``'s ``inductor`` kernel runs (``quantize.matvec``):
  the int8 matrix read in place as 32-bit words, handed to the compiled kernel as fp32 bit
  patterns (inductor's AVX2 code loads int8 and int32 vectors through a stack buffer, a
  store-forwarding stall per load, fp32 ones directly), each byte sign-extended by two
  shifts and multiplied by its activation, the activations de-interleaved per call;
* ``inductor linear``: the gpt-fast form ``F.linear(x, q.to(x.dtype)) * scale`` compiled
  the same way (inductor writes the whole fp32 weight, then calls the GEMM);
* ``inductor linear, decompose``: the same with ``decompose_mem_bound_mm`` on;
* ``fbgemm fp16``: FBGEMM's fp16-weight product ``linear_dynamic_fp16`` (fp32
  activations, half fp32's bytes), a comparison point;
* ``fp32``: ``F.linear`` on the dequantized fp32 weight (four times the bytes).

``--megabytes`` of int8 weights per shape in different matrices (far more than the
caches hold), cycled, so every product streams its weights from memory as a decoding
step does; best of ``--passes`` passes, one thread. ``err`` is the largest difference
from the dequantized weight's product in float64, relative to that product's largest
magnitude (fp32 rounding is ~1e-7; bf16 activations ~4e-3). The first call of each
compiled form on each shape is its compile time, printed.

    python benchmarks/decoding/int8_matvec_compiled.py --rows 1 4
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch._inductor import config as inductor_config
from torch.nn import functional as F

from deepseek_mini.model.quantize import compiled_matvec, matvec

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


def compiled(fn: Callable, **options: object) -> Callable:
    """``fn`` through inductor with ``options`` patched into its config while it compiles
    (the first call on each shape compiles, later calls only check guards)."""
    inner = torch.compile(fn, dynamic=False)

    def run(*args: torch.Tensor) -> torch.Tensor:
        with inductor_config.patch(options):
            return inner(*args)
    return run if options else inner


def contenders() -> dict[str, tuple[Callable, Callable]]:
    """name: (prepare(q, scale) -> weights, product(x, weights) -> [rows, out])."""
    red = compiled(reduction)
    lin = compiled(linear)
    dec = compiled(linear_decomposed, decompose_mem_bound_mm=True)
    return {
        "int8pack": (lambda q, s: (q, s.bfloat16()),
                     lambda x, p: torch._weight_int8pack_mm(x.bfloat16(), *p).float()),
        "inductor sum": (lambda q, s: (q, s), lambda x, p: red(x, *p)),
        "inductor words": (lambda q, s: (q, s.bfloat16()), lambda x, p: matvec(x, *p)),
        "inductor linear": (lambda q, s: (q, s), lambda x, p: lin(x, *p)),
        "inductor linear, decompose": (lambda q, s: (q, s), lambda x, p: dec(x, *p)),
        "fbgemm fp16": (lambda q, s: torch.ops.quantized.linear_prepack_fp16(
                            q.float() * s[:, None], None),
                        lambda x, p: torch.ops.quantized.linear_dynamic_fp16(x, p)),
        "fp32": (lambda q, s: q.float() * s[:, None], lambda x, p: F.linear(x, p)),
    }


BYTES_PER_WEIGHT = {"fbgemm fp16": 2, "fp32": 4}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--shapes", nargs="+", default=[f"{n}x{k}" for n, k in SHAPES],
                        help="OUTxIN")
    parser.add_argument("--megabytes", type=float, default=128,
                        help="int8 weight bytes per shape, cycled")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--contenders", nargs="+", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    start = time.perf_counter()
    assert compiled_matvec() is not None, "inductor cannot compile here"
    print(f"inductor words: compiled once for every shape in {time.perf_counter() - start:.1f} s")
    table = contenders()
    names = args.contenders or list(table)
    print(f"threads 1, capability {torch.backends.cpu.get_cpu_capability()}, torch "
          f"{torch.__version__}; each cell: ratio to int8pack's time, weight GB/s, err")
    print("| shape (out x in) | rows | int8pack us | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for shape in args.shapes:
        n, k = map(int, shape.split("x"))
        count = max(2, int(args.megabytes * 1e6 / (n * k)))
        qs = [torch.randint(-127, 128, (n, k), dtype=torch.int8) for _ in range(count)]
        # scales in bf16 (quantize's), so every contender multiplies by the same weight
        scales = [(torch.rand(n) * 1e-3).bfloat16().float() for _ in range(count)]
        for m in args.rows:
            x = torch.randn(m, k)
            times, cells, compiles = {}, {}, []
            for name in names:
                prepare, product = table[name]
                packs = [prepare(q, s) for q, s in zip(qs, scales, strict=True)]
                start = time.perf_counter()
                out = product(x, packs[0])
                if name.startswith("inductor") and name != "inductor words":
                    compiles.append(f"{name} {time.perf_counter() - start:.1f} s")
                times[name] = best_time(lambda p, fn=product, x=x: fn(x, p), packs, args.passes)
                gbs = BYTES_PER_WEIGHT.get(name, 1) * n * k * count / times[name] / 1e9
                cells[name] = (gbs, error(out, x, qs[0], scales[0]))
                del packs
            base = times.get("int8pack", times[names[0]])
            print(f"| {n} x {k} | {m} | {1e6 * base / count:.1f} | " + " | ".join(
                f"{base / times[name]:.2f}x, {cells[name][0]:.1f} GB/s, {cells[name][1]:.0e}"
                for name in names) + " |", flush=True)
            if compiles:
                print(f"  compile: {', '.join(compiles)}", flush=True)


if __name__ == "__main__":
    main()
