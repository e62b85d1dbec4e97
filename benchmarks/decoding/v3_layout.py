"""Decoding speed of the seed's layout against DeepSeek-V3's (deepseek-v3-mini: decoupled
RoPE, absorbed decoding over a latent + rope-key cache), same sizes, random weights, in
one process: the runs alternate, best of ``--repeats``, so the ratio is fair on a shared
machine. Also each layout's KV-cache bytes per token (16-bit).

    python benchmarks/decoding/v3_layout.py --batch 1 8

Fills BENCHMARKS.md, section "DeepSeek-V3's layout, decoding".
"""

from __future__ import annotations

import argparse

import _paths  # noqa: F401 (puts benchmarks/ on sys.path)
import torch
from helpers.decode_timing import decode_rate

from deepseek_mini import Config, DeepSeekMini
from deepseek_mini.model.sizes import kv_cache_bytes_per_token

# name -> (config, overrides): the seed's layout as shipped (GELU experts), with
# DeepSeek-V3's SwiGLU experts (the like-for-like comparison), and deepseek-v3-mini
LAYOUTS = {
    "seed (configs/base.yaml, GELU experts)": ("configs/base.yaml", []),
    "seed, SwiGLU experts": ("configs/base.yaml", ["model.expert_activation=swiglu"]),
    "v3-mini absorbed (configs/deepseek-v3-mini.yaml)": ("configs/deepseek-v3-mini.yaml", []),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {}
    for name, (path, overrides) in LAYOUTS.items():
        torch.manual_seed(0)
        models[name] = DeepSeekMini(Config.from_yaml(path, overrides).model).eval()
    for batch in args.batch:
        best = dict.fromkeys(models, 0.0)
        for _ in range(args.repeats):
            for name, model in models.items():
                _, rate = decode_rate(model, batch, args.prompt_len, args.new_tokens, True)
                best[name] = max(best[name], rate)
        seed_rate = next(iter(best.values()))
        for name, rate in best.items():
            print(f"batch {batch:2d}  {name:50s} {rate:8.1f} tok/s  {rate / seed_rate:5.2f}x  "
                  f"cache {kv_cache_bytes_per_token(models[name].config)} B/token", flush=True)


if __name__ == "__main__":
    main()
