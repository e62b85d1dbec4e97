"""The Muon step's extra cost over AdamW's, paired in one process.

    python benchmarks/training/muon_step.py [--config configs/cpu-hour.yaml]
        [--batches 16 32 64] [--ns-steps 5 3 2] [--updates] [--reps 6] [--threads 1]
        [--set K=V]...

Copies of the same model (the config's: by default the CPU-hour recipe, hidden 256,
6 layers, 8 experts of 512, sequences of 128) train on the same random batches, one with
``train.optimizer: adamw`` and one with ``muon`` per ``--ns-steps`` value
(``train.muon_ns_steps``), their steps alternating so load changes hit all alike.
Reported per batch size (medians): the whole training step (``train_step``: forward,
backward, clipping, update), wall and CPU seconds (this process's user + system), and
each Muon variant's CPU seconds over AdamW's. With ``--updates``, also the update alone
(``optimizer.step`` with the trainer's ``found_inf`` flag, on a fresh backward's
gradients; at the first batch size: it does not depend on it) and the share of Muon's
update spent making a non-finite step skippable without a host sync. Last, the
Newton-Schulz iterations alone (torch's own ``_zeropower_via_newtonschulz``, bf16 as
torch.optim.Muon runs them) over the shapes Muon gets, with their FLOPs and the rate
they reach against the bf16 ``F.linear`` peak measured the way training's MFU is, and
their share of each batch size's Muon step and of its extra CPU seconds over AdamW's.

Fills BENCHMARKS.md, section "Muon's step cost".
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
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, _zeropower_via_newtonschulz

from deepseek_mini.allocator import keep_freed_memory
from deepseek_mini.config import Config
from deepseek_mini.model.transformer import DeepSeekMini
from deepseek_mini.train.mfu import measure_matmul_peak
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


def variants(args, batch_size: int) -> dict[str, Config]:
    """AdamW and Muon at each Newton-Schulz count, at ``batch_size`` in one micro batch."""
    common = ["train.device=cpu", *args.set, f"train.batch_size={batch_size}",
              f"train.micro_batch_size={batch_size}"]
    names = {"adamw": ["train.optimizer=adamw"]}
    for steps in args.ns_steps:
        names[f"muon ns={steps}"] = ["train.optimizer=muon", f"train.muon_ns_steps={steps}"]
    return {name: Config.from_yaml(args.config, common + extra) for name, extra in names.items()}


def measure_batch(args, model, batch_size: int, precision, updates: bool) -> dict:
    """Medians of one batch size's paired steps (and updates) per variant."""
    runs = {}
    for name, cfg in variants(args, batch_size).items():
        twin = copy.deepcopy(model)
        runs[name] = (cfg, twin, build_optimizer(twin, cfg.train))
    seq_len, vocab = next(iter(runs.values()))[0].data.seq_len, model.config.vocab_size
    times: dict[str, list[float]] = {}
    gen = torch.Generator().manual_seed(batch_size)
    for rep in range(args.reps + 1):  # the first round warms up and is dropped
        batch = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=gen)
        sample = {}
        for name, (cfg, twin, opt) in runs.items():
            with Clock() as clock:
                train_step(twin, opt, batch, batch_size, cfg.train.grad_clip, precision)
            sample[f"{name} step"], sample[f"{name} step, CPU s"] = clock.wall, clock.cpu
            if updates:
                sample[f"{name} update"] = update_time(twin, opt, batch, cfg, precision, True)
        if updates:
            name = f"muon ns={args.ns_steps[0]}"
            cfg, twin, opt = runs[name]
            sample[f"{name} update, no skip flag"] = update_time(twin, opt, batch, cfg,
                                                                 precision, False)
        if rep:
            for key, value in sample.items():
                times.setdefault(key, []).append(value)
    median = {k: round(statistics.median(v), 4) for k, v in times.items()}
    adamw_cpu = median["adamw step, CPU s"]
    result = {"batch": f"{batch_size} x {seq_len}", "median_s": median,
              "cpu_s_over_adamw": {n: round(median[f"{n} step, CPU s"] / adamw_cpu, 3)
                                   for n in runs if n != "adamw"},
              "extra_cpu_s_per_step": {n: round(median[f"{n} step, CPU s"] - adamw_cpu, 4)
                                       for n in runs if n != "adamw"}}
    if updates:
        name = f"muon ns={args.ns_steps[0]}"
        result["skip_flag_share_of_muon_update"] = round(
            1 - median[f"{name} update, no skip flag"] / median[f"{name} update"], 3)
    return result


def newton_schulz(model, cfg: Config, ns_steps: list[int], reps: int) -> dict:
    """torch's Newton-Schulz over every matrix Muon updates in one step, alone."""
    optimizer = build_optimizer(model, cfg.train)
    shapes = [tuple(p.shape) for g in optimizer.muon.param_groups for p in g["params"]]
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(shape, generator=gen) for shape in shapes]
    coefficients = (DEFAULT_A, DEFAULT_B, DEFAULT_C)
    result = {"matrices": len(shapes), "shapes": sorted({f"{a}x{b}" for a, b in shapes})}
    peak = measure_matmul_peak(torch.device("cpu"), torch.bfloat16)
    result["bf16_linear_peak_gflops"] = round(peak / 1e9, 1)
    for steps in ns_steps:
        flops = steps * sum(4 * min(s) ** 2 * max(s) + 2 * min(s) ** 3 for s in shapes)
        runs = []
        for _ in range(reps + 1):
            with Clock() as clock:
                for x in inputs:
                    _zeropower_via_newtonschulz(x, coefficients, steps, EPS)
            runs.append(clock.cpu)
        seconds = statistics.median(runs[1:])
        result[f"ns={steps}"] = {"gflop": round(flops / 1e9, 1), "cpu_s": round(seconds, 4),
                                 "gflops": round(flops / seconds / 1e9, 1),
                                 "share_of_peak": round(flops / seconds / peak, 3)}
    return result


def with_shares(ns: dict, batches: list[dict]) -> dict:
    """Each count's Newton-Schulz CPU seconds over its Muon step's and over Muon's extra
    CPU seconds per step, at each batch size: how much of the cost the iterations are."""
    for key, row in ns.items():
        if not key.startswith("ns="):
            continue
        name = f"muon {key}"
        row["share_of_muon_step"] = {
            b["batch"]: round(row["cpu_s"] / b["median_s"][f"{name} step, CPU s"], 3)
            for b in batches}
        row["share_of_extra_over_adamw"] = {
            b["batch"]: round(row["cpu_s"] / b["extra_cpu_s_per_step"][name], 3)
            for b in batches}
    return ns


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/cpu-hour.yaml")
    p.add_argument("--batches", type=int, nargs="+", default=[16])
    p.add_argument("--ns-steps", type=int, nargs="+", default=[5])
    p.add_argument("--updates", action="store_true", help="also time the update alone")
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as training does
    base = Config.from_yaml(args.config, ["train.device=cpu", *args.set,
                                          "train.optimizer=muon"])
    precision = setup_precision(base.train)
    torch.manual_seed(0)
    model = DeepSeekMini(base.model)
    load_start = os.getloadavg()[0]
    batches = [measure_batch(args, model, size, precision, args.updates and i == 0)
               for i, size in enumerate(args.batches)]
    print(json.dumps({
        "cpu": cpu(), "threads": args.threads, "precision": precision.name,
        "load_1min_start": load_start, "load_1min_end": os.getloadavg()[0],
        "reps": args.reps,
        "model": f"hidden {base.model.hidden_size}, {base.model.num_layers} layers, "
                 f"{base.model.num_experts} experts of {base.model.expert_hidden}, "
                 f"head_vocab {base.model.head_vocab}",
        "batches": batches,
        "newton_schulz": with_shares(newton_schulz(model, base, args.ns_steps, args.reps),
                                     batches),
    }, indent=2))


if __name__ == "__main__":
    main()
