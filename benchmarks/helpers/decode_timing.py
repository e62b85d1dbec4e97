"""Timing greedy decoding on a shared machine, shared by the decoding benchmarks: one
generation's prefill seconds and decode tokens/s, the read bandwidth that bounds them,
the load average to record next to a figure, and the options and random-weight model
every "decode this config at these batch sizes" script starts from."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from deepseek_mini import Config, DeepSeekMini, generate


def decode_rate(model: DeepSeekMini, batch: int, prompt_len: int, new_tokens: int,
                use_cache: bool, compile: bool = False) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) of one greedy generation: the streamer stamps
    every step, the first is the prefill and the rest decode steps."""
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len),
                           generator=torch.Generator().manual_seed(0))
    stamps: list[float] = []
    start = time.perf_counter()
    generate(model, prompt, max_new_tokens=new_tokens, use_cache=use_cache, compile=compile,
             streamer=lambda _: stamps.append(time.perf_counter()))
    return stamps[0] - start, batch * (len(stamps) - 1) / (stamps[-1] - stamps[0])


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


def add_decode_args(parser: argparse.ArgumentParser, repeats: int) -> None:
    """The config, batch sizes, prompt and generation lengths, threads and repeats of a
    script that decodes one config's random-weight model, spelled once."""
    parser.add_argument("--config", default="configs/base.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=repeats)


def random_model(args: argparse.Namespace) -> tuple[Config, DeepSeekMini]:
    """The config of ``add_decode_args``' options and its model in eval mode, seeded
    (speed does not depend on the weights), after setting ``--threads`` if given."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = Config.from_yaml(args.config, args.set)
    torch.manual_seed(0)
    return cfg, DeepSeekMini(cfg.model).eval()


def describe(args: argparse.Namespace, cfg: Config) -> str:
    """The first line of a decoding table: the config, its overrides, layers, threads and
    prompt length."""
    return (f"config {args.config} {' '.join(args.set)}: {cfg.model.num_layers} layers, "
            f"threads {torch.get_num_threads()}, prompt {args.prompt_len}")
