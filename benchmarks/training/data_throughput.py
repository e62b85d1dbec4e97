"""How fast text becomes training tokens, and how fast batches are cut from them.

Preparation: ``prepare_data`` on a real TinyStories file (``data.source: files``) with
1 and 2 worker processes, into a fresh cache each time; reported as input MB/s and
tokens/s of wall time, plus the CPU seconds of the parent and the workers (the machine
is shared, so wall time alone would mislead). Then the same call again, which only
checks and memory-maps the cache. Batches: ``BatchSampler.next_batch`` on the
memory-mapped train split, in tokens per second, for the sizes training uses.

    python benchmarks/training/data_throughput.py ../shared/data/tinystories/train.txt

Fills BENCHMARKS.md, section "Data preparation".
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from deepseek_mini import Config  # noqa: E402
from deepseek_mini.data.tokenizer import load_tokenizer  # noqa: E402
from deepseek_mini.data.tokens import BatchSampler, prepare_data, val_batches  # noqa: E402


def cpu_seconds() -> tuple[float, float]:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def bench_prepare(path: Path, workers: int, tokenizer: str) -> Path:
    mb = path.stat().st_size / 1e6
    with tempfile.TemporaryDirectory() as cache:
        cfg = Config.from_yaml(None, ["data.source=files", f"data.files=[{path}]",
                                      f"data.cache_dir={cache}", f"data.tokenizer={tokenizer}",
                                      f"data.num_workers={workers}"])
        cpu0, wall0 = cpu_seconds(), time.perf_counter()
        data = prepare_data(cfg.data, cfg.train.seed, cfg.model.vocab_size, progress=False)
        wall, cpu1 = time.perf_counter() - wall0, cpu_seconds()
        tokens = data.meta["tokens"]["train"] + data.meta["tokens"]["val"]
        docs = data.meta["documents"]["train"] + data.meta["documents"]["val"]
        cpu = (cpu1[0] - cpu0[0]) + (cpu1[1] - cpu0[1])
        print(f"prepare  workers={workers}: {mb:.2f} MB, {docs:,} docs, {tokens:,} tokens in "
              f"{wall:.2f} s wall -> {mb / wall:.2f} MB/s, {tokens / wall / 1e6:.2f} M tokens/s; "
              f"{cpu:.1f} CPU s (parent {cpu1[0] - cpu0[0]:.1f}, workers "
              f"{cpu1[1] - cpu0[1]:.1f}) -> {mb / cpu:.2f} MB per CPU s, "
              f"{tokens / cpu / 1e6:.2f} M tokens per CPU s")
        wall0 = time.perf_counter()
        prepare_data(cfg.data, cfg.train.seed, cfg.model.vocab_size, progress=False)
        print(f"  reuse of the cache: {time.perf_counter() - wall0:.3f} s")
    return path


def bench_batches(train, seq_len: int, batch_size: int, steps: int) -> None:
    sampler = BatchSampler(train, seq_len, batch_size, seed=0)
    sampler.next_batch()
    t0 = time.perf_counter()
    for _ in range(steps):
        sampler.next_batch()
    wall = time.perf_counter() - t0
    tokens = steps * batch_size * (seq_len + 1)
    print(f"batches  seq_len={seq_len} batch={batch_size}: {tokens / wall / 1e6:.1f} M tokens/s "
          f"({wall / steps * 1e6:.0f} us per batch)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="a TinyStories .txt file")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    tokenizer = str(load_tokenizer("smollm2").path)
    for workers in args.workers:
        bench_prepare(args.data, workers, tokenizer)
    with tempfile.TemporaryDirectory() as cache:
        cfg = Config.from_yaml(None, ["data.source=files", f"data.files=[{args.data}]",
                                      f"data.cache_dir={cache}", f"data.tokenizer={tokenizer}"])
        train = prepare_data(cfg.data, cfg.train.seed, cfg.model.vocab_size, progress=False).train
        for seq_len, batch_size in ((128, 8), (128, 64), (512, 32), (2048, 8)):
            bench_batches(train, seq_len, batch_size, args.steps)
        val_batches(train, 128, 64, 20)
        t0 = time.perf_counter()
        val_batches(train, 128, 64, 20)
        print(f"val_batches 20 x 64 x 129: {(time.perf_counter() - t0) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
