"""The MoE training step against the dense step of the same active width, paired in one
process.

    flock -x /tmp/heavy.lock python benchmarks/training/moe_step.py [--sizes cpu-hour base]
        [--rounds 6] [--steps 2] [--threads 1] [--set K=V]... [--moe-set K=V]...
        [--out moe_step.json] [--quick]

For each size two models are built from the same config: the MoE one (every layer an MoE
layer) and the dense one (every layer a dense MLP of the MoE layer's active width,
``(top_k + num_shared_experts) x expert_hidden``), everything else alike: attention, head,
optimizer, precision, batch. Both take the trainer's own ``train_step`` (forward,
backward, clipping, optimizer step) on the same random batches, in interleaved rounds
whose order alternates, so that load changes hit both alike. Reported per size: the
median wall and CPU (process) seconds per step of each, their ratio (MoE over dense), the
optimizer's share of each step (``optimizer.step`` timed inside the same steps) and the
ratio of the steps without it (forward, backward, clipping: what the MoE layer's dispatch
decides; the optimizer's cost follows the total parameter count, not the active one).

Sizes: ``cpu-hour`` is configs/cpu-hour.yaml (hidden 256, 6 layers, 8 experts of 512 + 1
shared, top-2 against dense 1536; 16 x 128 tokens, Muon); ``base`` is configs/base.yaml at
6 layers (hidden 576, 8 experts of 1536 + 1 shared, top-2 against dense 4608; 8 x 128
tokens, AdamW). ``--moe-set`` changes the MoE model only (a fine-grained shape such as
``model.num_experts=16 model.expert_hidden=256 model.top_k=4 model.num_shared_experts=2``
keeps the active width); the dense width follows the MoE config. ``--quick``: a tiny model,
one round of one step, for the test that runs this script.

Fills BENCHMARKS.md, section "The MoE step against the dense step".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from deepseek_mini import Config, DeepSeekMini
from deepseek_mini.train.optim import build_optimizer
from deepseek_mini.train.precision import setup_precision
from deepseek_mini.train.step import train_step

ROOT = Path(__file__).resolve().parents[2]
SIZES = {
    "cpu-hour": (ROOT / "configs" / "cpu-hour.yaml", []),
    "base": (ROOT / "configs" / "base.yaml", ["model.num_layers=6"]),
    "tiny": (ROOT / "configs" / "tiny.yaml",
             ["model.vocab_size=512", "model.hidden_size=64", "model.expert_hidden=64",
              "data.seq_len=32", "train.batch_size=2", "train.micro_batch_size=2"]),
}


def cpu_name() -> str:
    """The CPU's model name (figures name the machine they were measured on)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def configs(size: str, common: list[str], moe_only: list[str]) -> tuple[Config, Config]:
    """(MoE config, dense config) of one size: every layer MoE, or every layer dense at
    the MoE layer's active width."""
    path, base = SIZES[size]
    moe = Config.from_yaml(path, overrides=[*base, *common, "model.first_k_dense=0",
                                            *moe_only])
    m = moe.model
    active = (m.top_k + m.num_shared_experts) * m.expert_hidden
    dense = Config.from_yaml(path, overrides=[*base, *common,
                                              f"model.first_k_dense={m.num_layers}",
                                              f"model.dense_hidden={active}"])
    return moe, dense


class Contender:
    """One model with its optimizer and the trainer's step, timing its optimizer's share."""

    def __init__(self, name: str, cfg: Config) -> None:
        torch.manual_seed(0)
        self.name, self.cfg = name, cfg
        self.precision = setup_precision(cfg.train)
        self.model = DeepSeekMini(cfg.model).to(self.precision.device)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.optimizer_seconds = 0.0
        step = self.optimizer.step

        def timed_step(*args, **kwargs):
            start = time.perf_counter()
            out = step(*args, **kwargs)
            self.optimizer_seconds += time.perf_counter() - start
            return out

        self.optimizer.step = timed_step
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.optimizer_share: list[float] = []
        self.rest: list[float] = []  # wall seconds per step outside optimizer.step

    def run(self, batches: list[torch.Tensor], record: bool) -> None:
        t = self.cfg.train
        self.optimizer_seconds = 0.0
        wall, cpu = time.perf_counter(), time.process_time()
        for ids in batches:
            losses, _ = train_step(self.model, self.optimizer, ids, t.micro_batch_size,
                                   t.grad_clip, self.precision)
        float(losses[0])  # the step is done (a no-op wait on the CPU)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if record:
            self.wall.append(wall / len(batches))
            self.cpu.append(cpu / len(batches))
            self.optimizer_share.append(self.optimizer_seconds / wall)
            self.rest.append((wall - self.optimizer_seconds) / len(batches))


def measure(size: str, args: argparse.Namespace) -> dict:
    moe_cfg, dense_cfg = configs(size, args.set, args.moe_set)
    pair = [Contender("moe", moe_cfg), Contender("dense", dense_cfg)]
    t, m = moe_cfg.train, moe_cfg.model
    gen = torch.Generator().manual_seed(1)

    def batches() -> list[torch.Tensor]:
        return [torch.randint(0, m.vocab_size, (t.batch_size, moe_cfg.data.seq_len + 1),
                              generator=gen) for _ in range(args.steps)]

    for c in pair:  # warm-up: first-touch allocations, optimizer state
        c.run(batches(), record=False)
    for r in range(args.rounds):
        drawn = batches()
        for c in (pair if r % 2 == 0 else pair[::-1]):
            c.run(drawn, record=True)
    moe, dense = pair
    result = {
        "size": size,
        "moe": {"experts": m.num_experts, "expert_hidden": m.expert_hidden, "top_k": m.top_k,
                "shared": m.num_shared_experts, "activation": m.expert_activation},
        "dense_hidden": dense_cfg.model.dense_hidden, "hidden": m.hidden_size,
        "layers": m.num_layers, "batch": [t.batch_size, moe_cfg.data.seq_len],
        "optimizer": t.optimizer, "precision": moe.precision.describe(),
    }
    for c in pair:
        result[c.name + "_step_s"] = {"wall": statistics.median(c.wall),
                                      "cpu": statistics.median(c.cpu),
                                      "without_optimizer": statistics.median(c.rest)}
        result[c.name + "_optimizer_share"] = statistics.median(c.optimizer_share)
    result["ratio"] = {kind: statistics.median(
        a / b for a, b in zip(getattr(moe, kind), getattr(dense, kind), strict=True))
        for kind in ("wall", "cpu", "rest")}
    result["ratio"]["without_optimizer"] = result["ratio"].pop("rest")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["cpu-hour", "base"], choices=SIZES)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=2, help="steps per contender per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], help="both models: K=V")
    parser.add_argument("--moe-set", action="append", default=[], help="MoE model only")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.rounds, args.steps = ["tiny"], 1, 1
    torch.set_num_threads(args.threads)
    report = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
              "load_before": os.getloadavg(), "sizes": []}
    for size in args.sizes:
        result = measure(size, args)
        report["sizes"].append(result)
        print(f"{size}: MoE {result['moe_step_s']['wall'] * 1e3:.0f} ms/step "
              f"(optimizer {result['moe_optimizer_share']:.0%}), dense "
              f"{result['dense_step_s']['wall'] * 1e3:.0f} ms/step "
              f"(optimizer {result['dense_optimizer_share']:.0%}): MoE/dense "
              f"{result['ratio']['wall']:.2f}x wall, {result['ratio']['cpu']:.2f}x CPU, "
              f"{result['ratio']['without_optimizer']:.2f}x wall without the optimizer",
              flush=True)
    report["load_after"] = os.getloadavg()
    print(f"{report['cpu']}, {args.threads} thread(s), load average "
          f"{report['load_before'][0]:.2f} before, {report['load_after'][0]:.2f} after")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
