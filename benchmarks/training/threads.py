"""One CPU thread or several: decoding, evaluation and training steps timed at each count.

Random weights (speed does not depend on them). The thread counts alternate within one
process, round after round, and each workload reports the best time of ``--repeats`` per
count, so the ratio is fair on a shared machine whose speed drifts; ``load`` is the
1-minute load average when the workload started. This is the measurement behind
``threads.py``'s defaults. ``--busy N`` starts N processes that spin on a core for the
whole run, standing in for the other work of a shared machine.

    python benchmarks/training/threads.py --threads 1 2 --repeats 3
    python benchmarks/training/threads.py --threads 1 2 --repeats 3 --busy 2

Fills BENCHMARKS.md, section "Threads".
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from collections.abc import Callable

import torch

from deepseek_mini import Config, DeepSeekMini, generate
from deepseek_mini.train.optim import build_optimizer


def decode(cfg: Config, tokens: int) -> Callable[[], None]:
    model = DeepSeekMini(cfg.model).eval()
    prompt = torch.randint(0, cfg.model.vocab_size, (1, 16))

    def run() -> None:
        generate(model, prompt, max_new_tokens=tokens, temperature=0.0)

    return run


def evaluate(cfg: Config, batch: int) -> Callable[[], None]:
    model = DeepSeekMini(cfg.model).eval()
    ids = torch.randint(0, cfg.model.vocab_size, (batch, cfg.data.seq_len + 1))

    @torch.inference_mode()
    def run() -> None:
        model(ids[:, :-1], targets=ids[:, 1:])

    return run


def train_step(cfg: Config, batch: int) -> Callable[[], None]:
    model = DeepSeekMini(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    ids = torch.randint(0, cfg.model.vocab_size, (batch, cfg.data.seq_len + 1))

    def run() -> None:
        model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def best_times(work: Callable[[], None], counts: list[int], repeats: int) -> dict[int, float]:
    work()  # warm-up: allocator, kernels' first calls
    best = {n: float("inf") for n in counts}
    for _ in range(repeats):
        for n in counts:
            torch.set_num_threads(n)
            start = time.perf_counter()
            work()
            best[n] = min(best[n], time.perf_counter() - start)
    return best


def spin() -> None:
    while True:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=50)
    parser.add_argument("--skip-base", action="store_true", help="only the tiny model")
    parser.add_argument("--busy", type=int, default=0, help="spinning processes to start")
    args = parser.parse_args()
    spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.busy)]
    for p in spinners:
        p.start()
    torch.manual_seed(0)
    tiny = Config.from_yaml("configs/tiny.yaml")
    base = Config.from_yaml("configs/base.yaml")
    workloads = [
        ("tiny decode 50 tok", decode(tiny, args.decode_tokens)),
        ("tiny eval fwd 8x128", evaluate(tiny, 8)),
        ("tiny train step 8x128", train_step(tiny, 8)),
    ]
    if not args.skip_base:
        workloads += [
            ("base decode 50 tok", decode(base, args.decode_tokens)),
            ("base train step 1x128", train_step(base, 1)),
        ]
    ref = args.threads[0]
    header = " | ".join(f"{n} thr s" for n in args.threads)
    print(f"busy processes: {args.busy}; cores: {os.cpu_count()}")
    print(f"| workload | load | {header} | " +
          " | ".join(f"{n} vs {ref} speed-up" for n in args.threads[1:]) + " |", flush=True)
    for name, work in workloads:
        load = os.getloadavg()[0]
        best = best_times(work, args.threads, args.repeats)
        times = " | ".join(f"{best[n]:.3f}" for n in args.threads)
        ratios = " | ".join(f"{best[ref] / best[n]:.2f}x" for n in args.threads[1:])
        print(f"| {name} | {load:.1f} | {times} | {ratios} |", flush=True)
    for p in spinners:
        p.terminate()


if __name__ == "__main__":
    main()
