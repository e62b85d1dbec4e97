"""Eager against compiled decoding: ``generate(..., compile=True)`` runs ``decode_one``
through ``torch.compile`` over a static cache (the whole buffer under a mask); eager
decodes over the filled prefix of the cache. Random weights, greedy, per batch size.

Eager and compiled runs alternate within one process, best of ``--repeats``, so their
ratio is fair on a shared machine; compilation happens in an untimed warm-up of the same
shapes, and its seconds are reported apart.

    python benchmarks/decoding/decode_compile.py --config configs/base.yaml --batch 1 8

Fills BENCHMARKS.md, section "Compiled decoding".
"""

from __future__ import annotations

import argparse
import time

import _paths  # noqa: F401 (puts benchmarks/ on sys.path)
from helpers.decode_timing import add_decode_args, decode_rate, describe, random_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_decode_args(parser, repeats=3)
    args = parser.parse_args()
    cfg, model = random_model(args)
    print(f"{describe(args, cfg)}, {args.new_tokens} new tokens")
    print("| batch | eager tok/s | compiled tok/s | compiled / eager | compile s |")
    print("|---|---|---|---|---|")
    for batch in args.batch:
        shape = (batch, args.prompt_len, args.new_tokens, True)
        start = time.perf_counter()
        decode_rate(model, *shape, compile=True)  # compiles these shapes
        compile_s = time.perf_counter() - start
        decode_rate(model, *shape)
        best = {False: 0.0, True: 0.0}
        for _ in range(args.repeats):
            for compiled in (False, True):
                best[compiled] = max(best[compiled],
                                     decode_rate(model, *shape, compile=compiled)[1])
        print(f"| {batch} | {best[False]:.1f} | {best[True]:.1f} | "
              f"{best[True] / best[False]:.2f}x | {compile_s:.0f} |", flush=True)


if __name__ == "__main__":
    main()
