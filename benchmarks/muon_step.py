"""The Muon step's extra time over AdamW's, paired in one process.

    flock /work/locks/cpu.lock python benchmarks/muon_step.py [--config configs/cpu-hour.yaml]
        [--reps 6] [--threads 1] [--set K=V]...

Two copies of the same model (the config's: by default the CPU-hour recipe, hidden 256,
6 layers, 8 experts of 512, batch 16 x 128) train on the same random batches, one with
``train.optimizer: adamw``, one with ``muon``, their steps alternating so load changes
hit both alike. Reported (medians, seconds): the whole training step (``train_step``:
forward, backward, clipping, update; wall and CPU seconds), and the update alone
(``optimizer.step`` with the trainer's ``found_inf`` flag, on the gradients of a fresh
backward), and for Muon the
share of the update spent making a non-finite step skippable without a host sync
(the same update without the flag).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import time

import torch

from deepseek_mini.allocator import keep_freed_memory
from deepseek_mini.config import Config
from deepseek_mini.model.transformer import DeepSeekMini
from deepseek_mini.train.optim import build_optimizer
from deepseek_mini.train.precision import setup_precision
from deepseek_mini.train.step import accumulate_gradients, train_step


def cpu() -> str:
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    return (f"{fields.get('Model name', '?').strip()}, "
            f"{'avx512_bf16' if 'avx512_bf16' in flags else 'no avx512_bf16'}")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Clock:
    """Wall and CPU seconds (this process's user + system) of what runs inside it."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def update_time(model, optimizer, batch, cfg, precision, flag: bool) -> float:
    """``optimizer.step`` alone, on a fresh backward's gradients (the weights move: the
    next call sees a slightly different model, which is what training does)."""
    accumulate_gradients(model, batch, cfg.train.micro_batch_size, precision)
    if flag:
        optimizer.found_inf = torch.zeros(())
    seconds = timed(optimizer.step)
    optimizer.__dict__.pop("found_inf", None)
    optimizer.zero_grad(set_to_none=True)
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/cpu-hour.yaml")
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as training does
    base = Config.from_yaml(args.config, ["train.device=cpu", *args.set])
    precision = setup_precision(base.train)
    torch.manual_seed(0)
    model = DeepSeekMini(base.model)
    runs = {}
    for name in ("adamw", "muon"):
        cfg = Config.from_yaml(args.config, ["train.device=cpu", *args.set,
                                             f"train.optimizer={name}"])
        twin = copy.deepcopy(model)
        runs[name] = (cfg, twin, build_optimizer(twin, cfg.train))
    rows = base.train.batch_size
    times: dict[str, list[float]] = {}
    gen = torch.Generator().manual_seed(1)
    for rep in range(args.reps + 1):  # the first round warms up and is dropped
        batch = torch.randint(0, base.model.vocab_size, (rows, base.data.seq_len + 1),
                              generator=gen)
        sample = {}
        for name, (cfg, twin, opt) in runs.items():
            with Clock() as clock:
                train_step(twin, opt, batch, cfg.train.micro_batch_size, cfg.train.grad_clip,
                           precision)
            sample[f"{name} step"], sample[f"{name} step, CPU s"] = clock.wall, clock.cpu
            sample[f"{name} update"] = update_time(twin, opt, batch, cfg, precision, True)
        cfg, twin, opt = runs["muon"]
        sample["muon update, no skip flag"] = update_time(twin, opt, batch, cfg, precision,
                                                          False)
        if rep:
            for key, value in sample.items():
                times.setdefault(key, []).append(value)
    median = {k: round(statistics.median(v), 4) for k, v in times.items()}
    print(json.dumps({
        "cpu": cpu(), "threads": args.threads, "precision": precision.name,
        "load_1min_end": os.getloadavg()[0], "reps": args.reps,
        "model": f"hidden {base.model.hidden_size}, {base.model.num_layers} layers, "
                 f"{base.model.num_experts} experts of {base.model.expert_hidden}",
        "batch": f"{rows} x {base.data.seq_len}",
        "median_s": median,
        "muon_step_over_adamw": round(median["muon step"] / median["adamw step"], 3),
        "muon_step_over_adamw_cpu": round(median["muon step, CPU s"]
                                          / median["adamw step, CPU s"], 3),
        "skip_flag_share_of_muon_update": round(
            1 - median["muon update, no skip flag"] / median["muon update"], 3),
    }, indent=2))


if __name__ == "__main__":
    main()
