"""Load on a real server over HTTP on 127.0.0.1: requests/s and tokens/s for 1, 4 and 16
concurrent clients against the same prompts sent one at a time, on a random-weight model
of a config's shape (speed does not depend on the weights). The server runs as
``deepseek-mini serve`` in a subprocess; every request is greedy with a fixed
``max_tokens`` and no end of text can cut it short (the eos logit is pushed down), so each
setting decodes the same number of tokens. Bounded: ``--requests`` per setting.

    python benchmarks/decoding/serve_load.py --config configs/tiny.yaml --requests 16 \
        --max-tokens 32
    python benchmarks/decoding/serve_load.py --config configs/base.yaml --quantize fp32 int8

Fills BENCHMARKS.md, section "Serving".
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from deepseek_mini import Config, DeepSeekMini
from deepseek_mini.files import atomic_save
from deepseek_mini.model.quantize import KERNELS

PROMPTS = ["Once upon a time", "Tom had a red ball", "The little cat", "Lily went to the park",
           "One day, a big dog", "Sam and his mom"]


def checkpoint(config: str, folder: Path, sets: list[str]) -> Path:
    cfg = Config.from_yaml(config, overrides=sets)
    torch.manual_seed(0)
    model = DeepSeekMini(cfg.model)
    with torch.no_grad():  # no end of text: every request runs its full budget
        model.lm_head.weight[0].zero_()  # SmolLM2's end of text is id 0
    path = folder / "model.pt"
    atomic_save({"model": model.state_dict(), "config": cfg.to_dict()}, path)
    return path


def one(client: httpx.Client, url: str, i: int, max_tokens: int) -> int:
    body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0}
    reply = client.post(f"{url}/v1/completions", json=body, timeout=600)
    reply.raise_for_status()
    return reply.json()["usage"]["completion_tokens"]


def load(url: str, clients: int, requests: int, max_tokens: int) -> tuple[float, float]:
    """(requests/s, tokens/s) with ``clients`` requests in flight at once."""
    with httpx.Client() as client, ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        tokens = sum(pool.map(lambda i: one(client, url, i, max_tokens), range(requests)))
        seconds = time.perf_counter() - start
    return requests / seconds, tokens / seconds


def serve_and_load(path: Path, args: argparse.Namespace, quantize: str) -> list[tuple]:
    """(clients, req/s, tok/s) for 1, 4 and 16 clients against one server."""
    mode, _, kernel = quantize.partition("-")  # int8-KERNEL: that int8 kernel
    extra = [] if mode == "fp32" else ["--quantize", mode]
    env = {**os.environ, "DEEPSEEK_MINI_INT8_KERNEL": kernel} if kernel else None
    server = subprocess.Popen(
        [sys.executable, "-m", "deepseek_mini", "serve", "--checkpoint", str(path),
         "--port", "0", "--max-batch", "16", "--threads", str(args.threads), *extra],
        stdout=subprocess.PIPE, text=True, env=env)
    try:
        url = server.stdout.readline().split()[3]
        load(url, 1, 2, 4)  # warm-up
        return [(clients, *load(url, clients, args.requests, args.max_tokens))
                for clients in (1, 4, 16)]
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quantize", nargs="+", default=["fp32"],
                        choices=["fp32", "bf16", "int8", *(f"int8-{k}" for k in KERNELS)],
                        help="weights of each server, run one after the other (fp32: none; "
                             "int8-KERNEL: int8 through that kernel)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = checkpoint(args.config, Path(folder), args.set)
        rows = {mode: serve_and_load(path, args, mode) for mode in args.quantize}
    print(f"{args.config} {' '.join(args.set)}: {args.requests} requests x "
          f"{args.max_tokens} tokens, threads {args.threads}")
    print("| weights | clients | req/s | tok/s | vs one at a time | vs first weights |")
    print("|---|---|---|---|---|---|")
    first = rows[args.quantize[0]]
    for mode, results in rows.items():
        for (clients, rps, tps), (_, _, first_tps) in zip(results, first, strict=True):
            print(f"| {mode} | {clients} | {rps:.2f} | {tps:.1f} | {tps / results[0][2]:.2f}x "
                  f"| {tps / first_tps:.2f}x |")


if __name__ == "__main__":
    main()
