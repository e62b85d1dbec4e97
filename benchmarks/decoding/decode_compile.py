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

import torch
from decode import decode_rate

from deepseek_mini import Config, DeepSeekMini


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/base.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = Config.from_yaml(args.config, args.set)
    torch.manual_seed(0)
    model = DeepSeekMini(cfg.model).eval()
    print(f"config {args.config} {' '.join(args.set)}: {cfg.model.num_layers} layers, "
          f"threads {torch.get_num_threads()}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens")
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
