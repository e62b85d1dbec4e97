"""Training throughput of the real loop (``deepseek_mini.trainer.train``): tokens/s and MFU.

    python benchmarks/training/train_throughput.py --config configs/tiny.yaml --precision fp32 \
        --steps 6

Runs ``--steps`` optimizer steps on the demo corpus (same tokenizer, so any config's
vocabulary fits) with evaluation, sampling and periodic saves pushed out of the way, logs
every step, and reports the median over all steps but the first (which pays for warm-up).
MFU is given twice: against the peak the trainer measured in the run's own dtype, and
against the fp32 matmul peak, the fair yardstick when comparing precisions on one machine.

Fills BENCHMARKS.md, section "The bf16 training step".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from deepseek_mini import Config  # noqa: E402
from deepseek_mini.model.sizes import flops_per_token  # noqa: E402
from deepseek_mini.train.loop import train  # noqa: E402
from deepseek_mini.train.mfu import measure_matmul_peak  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first one is warm-up)")

    with tempfile.TemporaryDirectory() as out:
        cfg = Config.from_yaml(args.config, [
            "data.source=demo", f"train.precision={args.precision}", "train.device=cpu",
            f"train.max_steps={args.steps}", "train.log_interval=1",
            f"train.eval_interval={10 * args.steps}", f"train.sample_interval={10 * args.steps}",
            f"train.save_interval={10 * args.steps}", f"train.out_dir={out}", *args.set])
        train(cfg)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "loss" in r and r["step"] > 1]
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in timed)
    fp32_peak = measure_matmul_peak(torch.device("cpu"), torch.float32, seconds=1.0)
    flops = flops_per_token(cfg.model, cfg.data.seq_len)
    print(json.dumps({
        "config": args.config, "precision": args.precision, "steps": args.steps,
        "batch": f"{cfg.train.batch_size}x{cfg.data.seq_len}", "threads": torch.get_num_threads(),
        "tokens_per_s": round(tokens_per_s, 1),
        "s_per_step": round(cfg.train.batch_size * cfg.data.seq_len / tokens_per_s, 2),
        "mfu_own_dtype_peak": round(statistics.median(r["mfu"] for r in timed), 4),
        "mfu_vs_fp32_peak": round(flops * tokens_per_s / fp32_peak, 4),
        "fp32_peak_gflops": round(fp32_peak / 1e9, 1),
    }))


if __name__ == "__main__":
    main()
