"""What keeping freed memory in the process (``allocator.keep_freed_memory``) saves a
CPU training step: user and system CPU seconds and minor page faults per step, with and
without glibc's raised mmap/trim thresholds.

    python benchmarks/training/allocator.py [--config configs/cpu-hour.yaml] [--steps 6]
        [--rounds 2] [--threads 1] [--set K=V]...

The setting is process-wide and cannot be undone, so each side runs in a child process
of its own (the same model, seed and random batches, the trainer's ``train_step``),
the children alternating ``rounds`` times so load changes hit both alike. Reported:
medians over the children of the per-step figures, each child's first step (the
warm-up) left out.

Fills BENCHMARKS.md, section "Keeping freed memory".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def child(args: argparse.Namespace) -> None:
    """One side: ``steps`` training steps, per-step rusage deltas as JSON on stdout."""
    import torch

    from deepseek_mini import Config, DeepSeekMini
    from deepseek_mini.allocator import keep_freed_memory
    from deepseek_mini.train import step as trainer
    from deepseek_mini.train.optim import build_optimizer
    from deepseek_mini.train.precision import setup_precision

    if args.child == "keep":
        keep_freed_memory()
    torch.set_num_threads(args.threads)
    cfg = Config.from_yaml(args.config, overrides=args.set)
    torch.manual_seed(0)
    model = DeepSeekMini(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    precision = setup_precision(cfg.train)  # the trainer's: bf16 where the CPU has it
    batch = cfg.train.batch_size
    ids = torch.randint(0, cfg.model.vocab_size, (batch, cfg.data.seq_len + 1),
                        generator=torch.Generator().manual_seed(0))
    rows = []
    for _ in range(args.steps + 1):
        before = resource.getrusage(resource.RUSAGE_SELF)
        trainer.train_step(model, optimizer, ids, batch, cfg.train.grad_clip, precision)
        after = resource.getrusage(resource.RUSAGE_SELF)
        rows.append({"user_s": after.ru_utime - before.ru_utime,
                     "sys_s": after.ru_stime - before.ru_stime,
                     "minor_faults": after.ru_minflt - before.ru_minflt})
    print(json.dumps(rows[1:]))


def side(args: argparse.Namespace, name: str) -> list[dict]:
    argv = [sys.executable, __file__, "--child", name, "--config", args.config,
            "--steps", str(args.steps), "--threads", str(args.threads)]
    for item in args.set:
        argv += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/cpu-hour.yaml")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", choices=("keep", "default"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    rows: dict[str, list[dict]] = {"default": [], "keep": []}
    for _ in range(args.rounds):
        for name in rows:
            rows[name] += side(args, name)
    result = {"threads": args.threads, "load": round(os.getloadavg()[0], 2),
              "config": args.config, "overrides": args.set}
    for name, steps in rows.items():
        result[name] = {key: round(statistics.median(r[key] for r in steps), 3)
                        for key in ("user_s", "sys_s", "minor_faults")}
        result[name]["cpu_s"] = round(statistics.median(r["user_s"] + r["sys_s"]
                                                        for r in steps), 3)
    result["cpu_saving"] = round(result["default"]["cpu_s"] / result["keep"]["cpu_s"], 3)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
