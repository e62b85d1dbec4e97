"""Decoding speed: tokens/s with the MLA latent cache and without it, per batch size and
weight dtype, and the cache's bytes per token against a K/V cache of the same model.

Random weights (speed does not depend on them). Each run is one ``generate`` call whose
streamer timestamps every step: the first step is the prefill, the rest are decode steps,
so ``decode tok/s = batch * (steps - 1) / (time of the last step - time of the first)``.
Cached and uncached runs alternate within one process, best of ``--repeats``, so their
ratio is fair even on a shared machine whose absolute speed drifts; the ``load`` column
is the 1-minute load average when the reported run started (``--wait-quiet`` waits for a
low one).

    python benchmarks/decoding/decode.py --config configs/base.yaml --batch 1 8

Fills BENCHMARKS.md, section "Cached decoding".
"""

from __future__ import annotations

import argparse

import _paths  # noqa: F401 (puts benchmarks/ on sys.path)
import torch
from helpers.decode_timing import (
    add_decode_args,
    decode_rate,
    describe,
    load_average,
    random_model,
    read_bandwidth,
    wait_for_quiet,
)

from deepseek_mini import DeepSeekMini
from deepseek_mini.model.sizes import matmul_params_per_token
from deepseek_mini.train.precision import DTYPES


def cache_bytes(model: DeepSeekMini, dtype: torch.dtype) -> tuple[int, int]:
    """Bytes per token of the latent cache as allocated, and of a K/V cache of the same
    heads (K and V, ``num_kv_heads * head_dim`` each, per layer)."""
    cache = model.new_cache(1, 1, dtype=dtype)
    cfg = model.config
    latent = cache.latents.numel() * cache.latents.element_size()
    kv = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * cache.latents.element_size()
    return latent, kv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_decode_args(parser, repeats=2)
    parser.add_argument("--uncached-tokens", type=int, default=9,
                        help="decode steps for the slower uncached runs")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--slow-dtype-tokens", type=int, default=3,
                        help="decode steps for dtypes other than fp32 (bf16 is slow on AVX2)")
    parser.add_argument("--wait-quiet", type=float, default=None, metavar="LOAD",
                        help="start each measurement only once the 1-minute load average is "
                             "below LOAD (a shared machine)")
    args = parser.parse_args()
    cfg, model = random_model(args)
    weight_gb = matmul_params_per_token(cfg.model) * 4 / 1e9
    wait_for_quiet(args.wait_quiet)
    bandwidth = read_bandwidth()
    print(f"{describe(args, cfg)} tokens")
    print(f"fp32 weights read per token at batch 1: {weight_gb:.3f} GB; read bandwidth "
          f"{bandwidth:.1f} GB/s -> at most {bandwidth / weight_gb:.1f} tokens/s")
    print("| dtype | batch | cache | prefill s | decode tok/s | cached / uncached | load |")
    print("|---|---|---|---|---|---|---|")
    for name in args.dtypes:
        model.to(DTYPES[name])
        fp32 = name == "fp32"
        cached_steps = args.new_tokens if fp32 else args.slow_dtype_tokens
        uncached_steps = args.uncached_tokens if fp32 else args.slow_dtype_tokens
        for batch in args.batch:
            best = {True: (0.0, 0.0, 0.0), False: (0.0, 0.0, 0.0)}
            decode_rate(model, batch, 4, 2, True)  # warm-up: first-call allocations
            for _ in range(args.repeats if fp32 else 1):
                for use_cache, steps in ((True, cached_steps), (False, uncached_steps)):
                    wait_for_quiet(args.wait_quiet)
                    load = load_average()
                    prefill, rate = decode_rate(model, batch, args.prompt_len, steps, use_cache)
                    best[use_cache] = max(best[use_cache], (prefill, rate, load),
                                          key=lambda r: r[1])
            ratio = f"{best[True][1] / best[False][1]:.1f}x"
            for use_cache in (True, False):
                prefill, rate, load = best[use_cache]
                print(f"| {name} | {batch} | {'latent' if use_cache else 'none'} | "
                      f"{prefill:.2f} | {rate:.1f} | {ratio if use_cache else ''} | {load:.1f} |")
    print()
    for name in args.dtypes:
        latent, kv = cache_bytes(model, DTYPES[name])
        print(f"cache per token, {name}: latent {latent:,} bytes; K/V of the same heads "
              f"{kv:,} bytes ({kv / latent:.1f}x)")


if __name__ == "__main__":
    main()
