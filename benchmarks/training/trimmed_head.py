"""The trimmed LM head (``model.head_vocab``): what it buys in speed, what it keeps of a corpus.

``step``: training step time (tokens/s) of the full head against head_vocab N, every
variant of a size and precision built from the same seed and timed in turn, interleaved
round by round (so the machine's noise falls on all alike); also the head's gather
(forward + backward of the kept rows) alone, as a share of the step. ``decode``: one
cached decoding step (batch 1) the same way. ``coverage``: the share of the training
split's and of the held-out split's tokens whose id a head of N keeps (the training
split's N most frequent ids; "all" = every id that occurs in it).

    python benchmarks/training/trimmed_head.py step --threads 1
    python benchmarks/training/trimmed_head.py decode --threads 1
    python benchmarks/training/trimmed_head.py coverage --config configs/tiny.yaml \\
        --set data.source=files --set 'data.files=[PATH]' --set data.val_fraction=0.05

Fills BENCHMARKS.md, section "Trimmed head".
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from deepseek_mini import Config, DeepSeekMini
from deepseek_mini.data.frequent_ids import most_frequent_ids, token_counts
from deepseek_mini.data.tokens import prepare_data
from deepseek_mini.train.optim import build_optimizer
from deepseek_mini.train.precision import setup_precision
from deepseek_mini.train.step import train_step

SIZES = {
    "tiny": [],  # configs/tiny.yaml as it is: hidden 128, 2 layers, batch 8 x 128
    "small": ["model.hidden_size=256", "model.num_layers=6", "model.num_heads=4",
              "model.kv_latent_dim=64", "model.num_experts=8", "model.expert_hidden=512",
              "model.top_k=2", "data.seq_len=128", "train.batch_size=16",
              "train.micro_batch_size=16"],
}


def config(size: str, precision: str, kept: int) -> Config:
    return Config.from_yaml("configs/tiny.yaml", [*SIZES[size], f"train.precision={precision}",
                                                  "train.device=cpu", f"model.head_vocab={kept}"])


def interleaved(work: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each piece of work, all run once per round, in turn."""
    times: dict[str, list[float]] = {name: [] for name in work}
    for _ in range(rounds):
        for name, fn in work.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def step_work(cfg: Config) -> tuple[Callable[[], object], Callable[[], object]]:
    """One training step of ``cfg``'s model on a random batch, and its head's gather alone."""
    torch.manual_seed(0)
    model = DeepSeekMini(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    precision = setup_precision(cfg.train)
    batch = torch.randint(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.data.seq_len + 1),
                          generator=torch.Generator().manual_seed(1))

    def step():
        stats, _ = train_step(model, optimizer, batch, cfg.train.micro_batch_size, 1.0,
                              precision)
        return stats[0].item()

    def gather():
        if model.head is None:
            return None
        rows = model.head.weight(model.lm_head.weight)
        rows.backward(torch.ones_like(rows))
        model.zero_grad(set_to_none=True)
        return None

    step()  # warm-up: first-call allocations
    return step, gather


def run_step(args: argparse.Namespace) -> list[dict]:
    results = []
    for size in args.sizes:
        for precision in args.precisions:
            variants = {kept: config(size, precision, kept) for kept in [0, *args.kept]}
            work = {kept: step_work(cfg) for kept, cfg in variants.items()}
            timed = interleaved({k: w[0] for k, w in work.items()}, args.rounds)
            gathers = interleaved({k: w[1] for k, w in work.items() if k}, args.rounds)
            cfg = variants[0]
            tokens = cfg.train.batch_size * cfg.data.seq_len
            for kept, seconds in timed.items():
                row = {"bench": "step", "size": size, "precision": precision,
                       "head_vocab": kept, "tokens": tokens, "s_per_step": round(seconds, 4),
                       "tokens_per_s": round(tokens / seconds, 1),
                       "speedup_vs_full": round(timed[0] / seconds, 3)}
                if kept:
                    row["gather_ms"] = round(gathers[kept] * 1e3, 2)
                    row["gather_share_of_step"] = round(gathers[kept] / seconds, 4)
                results.append(row)
                print(json.dumps(row), flush=True)
    return results


def decode_work(cfg: Config, prompt_len: int, steps: int,
                regather: bool = False) -> Callable[[], object]:
    """``steps`` cached single-token decoding steps after a ``prompt_len`` prefill; with
    ``regather`` a trimmed head gathers its rows at every step instead of once."""
    torch.manual_seed(0)
    model = DeepSeekMini(cfg.model).eval()
    prompt = torch.randint(0, cfg.model.vocab_size, (1, prompt_len))
    precision = setup_precision(cfg.train)

    @torch.inference_mode()
    def decode():
        with precision.autocast():
            cache = model.new_cache(1, prompt_len + steps)
            token = model(prompt, cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1)
            started = time.perf_counter()
            for _ in range(steps):
                if regather:
                    cache.head_rows = None
                token = model(token[:, None], cache=cache).logits[:, -1].argmax(-1)
            return time.perf_counter() - started

    decode()
    return decode


def run_decode(args: argparse.Namespace) -> list[dict]:
    results = []
    for size in args.sizes:
        for precision in args.precisions:
            work = {(kept, False): decode_work(config(size, precision, kept), 32,
                                               args.decode_steps)
                    for kept in [0, *args.kept]}
            work.update({(kept, True): decode_work(config(size, precision, kept), 32,
                                                   args.decode_steps, regather=True)
                         for kept in args.kept})
            times: dict[tuple[int, bool], list[float]] = {k: [] for k in work}
            for _ in range(args.rounds):
                for kept, fn in work.items():
                    times[kept].append(fn() / args.decode_steps)
            full = statistics.median(times[0, False])
            for (kept, regather), t in times.items():
                row = {"bench": "decode", "size": size, "precision": precision,
                       "head_vocab": kept, "gathered": "every step" if regather else "once",
                       "ms_per_token": round(statistics.median(t) * 1e3, 3),
                       "speedup_vs_full": round(full / statistics.median(t), 3)}
                results.append(row)
                print(json.dumps(row), flush=True)
    return results


def run_coverage(args: argparse.Namespace) -> list[dict]:
    cfg = Config.from_yaml(args.config, args.set)
    data = prepare_data(cfg.data, cfg.train.seed, cfg.model.vocab_size, cfg.model.max_position)
    vocab = cfg.model.vocab_size
    train_counts = token_counts(data.train, vocab)
    val_counts = token_counts(data.val, vocab)
    occurring = int((train_counts > 0).sum())
    results = []
    for kept in [*args.kept, occurring]:
        ids = most_frequent_ids(data.train, kept, vocab).numpy()
        row = {"bench": "coverage", "head_vocab": kept, "all_train_ids": kept == occurring,
               "train_tokens": int(len(data.train)), "val_tokens": int(len(data.val)),
               "train_coverage": round(float(train_counts[ids].sum() / len(data.train)), 5),
               "val_coverage": round(float(val_counts[ids].sum() / len(data.val)), 5),
               "val_ids_unseen_in_train": int(((val_counts > 0) & (train_counts == 0)).sum()),
               "other_log_share": round(float(np.log(vocab - kept)), 3) if kept < vocab else 0}
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", choices=["step", "decode", "coverage"])
    parser.add_argument("--kept", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--sizes", nargs="+", default=["small", "tiny"], choices=list(SIZES))
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp32"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = {"step": run_step, "decode": run_decode, "coverage": run_coverage}[args.bench](args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
