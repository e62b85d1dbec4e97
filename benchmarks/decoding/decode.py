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
import time
from pathlib import Path

import torch

from deepseek_mini import Config, DeepSeekMini, generate
from deepseek_mini.model.sizes import matmul_params_per_token
from deepseek_mini.train.precision import DTYPES


def decode_rate(model: DeepSeekMini, batch: int, prompt_len: int, new_tokens: int,
                use_cache: bool, compile: bool = False) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) of one greedy generation."""
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len),
                           generator=torch.Generator().manual_seed(0))
    stamps: list[float] = []
    start = time.perf_counter()
    generate(model, prompt, max_new_tokens=new_tokens, use_cache=use_cache, compile=compile,
             streamer=lambda _: stamps.append(time.perf_counter()))
    return stamps[0] - start, batch * (len(stamps) - 1) / (stamps[-1] - stamps[0])


def cache_bytes(model: DeepSeekMini, dtype: torch.dtype) -> tuple[int, int]:
    """Bytes per token of the latent cache as allocated, and of a K/V cache of the same
    heads (K and V, ``num_kv_heads * head_dim`` each, per layer)."""
    cache = model.new_cache(1, 1, dtype=dtype)
    cfg = model.config
    latent = cache.latents.numel() * cache.latents.element_size()
    kv = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * cache.latents.element_size()
    return latent, kv


def read_bandwidth(gigabytes: float = 0.5) -> float:
    """GB/s of the best of three sums over a buffer far larger than the caches: what a
    decode step, which reads each active weight once, can hope for."""
    buffer = torch.ones(int(gigabytes * 1e9 / 4))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return gigabytes / best


def load_average() -> float:
    """The 1-minute load average (0 where /proc is missing)."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def wait_for_quiet(threshold: float | None, give_up_s: float = 3600) -> None:
    """On a shared machine, hold each measurement until the load average drops below
    ``threshold`` (other jobs idle), or ``give_up_s`` has passed."""
    deadline = time.monotonic() + give_up_s
    while threshold is not None and load_average() >= threshold and time.monotonic() < deadline:
        time.sleep(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/base.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--uncached-tokens", type=int, default=9,
                        help="decode steps for the slower uncached runs")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--slow-dtype-tokens", type=int, default=3,
                        help="decode steps for dtypes other than fp32 (bf16 is slow on AVX2)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--wait-quiet", type=float, default=None, metavar="LOAD",
                        help="start each measurement only once the 1-minute load average is "
                             "below LOAD (a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = Config.from_yaml(args.config, args.set)
    torch.manual_seed(0)
    model = DeepSeekMini(cfg.model).eval()
    weight_gb = matmul_params_per_token(cfg.model) * 4 / 1e9
    wait_for_quiet(args.wait_quiet)
    bandwidth = read_bandwidth()
    print(f"config {args.config} {' '.join(args.set)}: {cfg.model.num_layers} layers, "
          f"threads {torch.get_num_threads()}, prompt {args.prompt_len} tokens")
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
