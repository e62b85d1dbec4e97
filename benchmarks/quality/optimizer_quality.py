"""A short quality comparison of training variants (optimizer, lr, schedule, windows).

    python benchmarks/quality/optimizer_quality.py --data ../shared/data/tinystories/train.txt \\
        --out bench/optimizers --steps 200 \\
        --variant adamw= \\
        --variant 'muon=train.optimizer=muon' \\
        --variant 'muon-1e-2=train.optimizer=muon,train.muon_lr=0.01'

Each variant trains ``--config`` (default the CPU-hour recipe) for ``--steps`` steps on
the file, one thread, as a user would (``deepseek-mini train --set data.source=files
...``), one after the other, each under the machine's CPU lock (``--lock``) and taken
and released per run. The held-out figure is the run's own validation CE at its last
step (``data.val_fraction`` of the documents, the same split for every variant: the
seed and fraction are shared). Written: ``OUT/results.json`` with each variant's final
validation CE, its curve, CPU seconds, wall seconds and the load average around it.

Fills BENCHMARKS.md, section "The levers".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def train_command(args: argparse.Namespace, out: Path, extra: list[str]) -> list[str]:
    sets = ["data.source=files", f"data.files=[{Path(args.data).resolve()}]",
            f"data.val_fraction={args.val_fraction}", f"data.cache_dir={args.out}/cache",
            f"train.max_steps={args.steps}", f"train.eval_interval={args.eval_interval}",
            f"train.save_interval={args.steps}", "train.sample_interval=100000",
            f"train.threads={args.threads}", f"train.out_dir={out}", *extra]
    command = [sys.executable, "-m", "deepseek_mini", "train", "--config", args.config]
    for item in sets:
        command += ["--set", item]
    return (["flock", args.lock] if args.lock else []) + command


def run_variant(args: argparse.Namespace, label: str, extra: list[str]) -> dict:
    out = Path(args.out) / label
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(train_command(args, out, extra), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{label} failed:\n{done.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_ce" in r]
    trains = [r for r in rows if "loss" in r]
    return {"label": label, "overrides": extra, "val_ce": evals[-1]["val_ce"],
            "curve": [{"step": r["step"], "val_ce": r["val_ce"]} for r in evals],
            "train_ce_last": trains[-1]["ce"], "cpu_s": trains[-1]["cpu_s"],
            "wall_s_with_lock_wait": round(wall, 1), "load_before": load_before,
            "load_after": os.getloadavg()[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--config", default="configs/cpu-hour.yaml")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lock", default="/work/locks/cpu.lock", help="'' for none")
    p.add_argument("--variant", action="append", required=True,
                   metavar="LABEL=KEY=V,KEY=V", help="a label and its --set overrides")
    args = p.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results_path = Path(args.out) / "results.json"
    for spec in args.variant:
        label, _, sets = spec.partition("=")
        result = run_variant(args, label, [s for s in sets.split(",") if s])
        results = json.loads(results_path.read_text()) if results_path.exists() else []
        results = [r for r in results if r["label"] != label] + [result]
        results_path.write_text(json.dumps(results, indent=2))
        print(json.dumps({k: v for k, v in result.items() if k != "curve"}), flush=True)


if __name__ == "__main__":
    main()
