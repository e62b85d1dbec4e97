"""Load on a real server over HTTP on 127.0.0.1: requests/s and tokens/s for 1, 4 and 16
concurrent clients against the same prompts sent one at a time, on a random-weight model
of a config's shape (speed does not depend on the weights). The server runs as
``deepseek-mini serve`` in a subprocess; every request is greedy with a fixed
``max_tokens`` and no end of text can cut it short (the eos logit is pushed down), so each
setting decodes the same number of tokens. Bounded: ``--requests`` per setting.

    python benchmarks/serve_load.py --config configs/tiny.yaml --requests 16 --max-tokens 32
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = checkpoint(args.config, Path(folder), args.set)
        server = subprocess.Popen(
            [sys.executable, "-m", "deepseek_mini", "serve", "--checkpoint", str(path),
             "--port", "0", "--max-batch", "16", "--threads", str(args.threads)],
            stdout=subprocess.PIPE, text=True)
        try:
            url = server.stdout.readline().split()[3]
            load(url, 1, 2, 4)  # warm-up
            base = load(url, 1, args.requests, args.max_tokens)
            print(f"{args.config}: {args.requests} requests x {args.max_tokens} tokens")
            print(f"{'clients':>8} {'req/s':>8} {'tok/s':>9} {'vs one at a time':>17}")
            print(f"{1:>8} {base[0]:8.2f} {base[1]:9.1f} {1.0:16.2f}x")
            for clients in (4, 16):
                rps, tps = load(url, clients, args.requests, args.max_tokens)
                print(f"{clients:>8} {rps:8.2f} {tps:9.1f} {tps / base[1]:16.2f}x")
        finally:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    main()
