"""One MoE layer's forward + backward against the dense MLP of its active width, and a
fine-grained MoE of the same active width, paired in one process.

    flock -x /tmp/heavy.lock python benchmarks/training/moe_layer.py [--size cpu-hour|base]
        [--rounds 6] [--threads 1]

The layers of moe_step.py's sizes (2,048 tokens of hidden 256 for cpu-hour,
1,024 of hidden 576 for base), weights normal(0, 0.02), fp32, one forward and backward
against a fixed output gradient; rounds of 3 passes each, interleaved in alternating
order. Prints the median milliseconds of each and their ratios to the dense MLP.

Fills BENCHMARKS.md, section "The MoE step against the dense step".
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from moe_step import configs, cpu_name

from deepseek_mini.model.moe import FeedForward, MoE

FINE = {"cpu-hour": "256", "base": "768"}  # expert_hidden of 16 experts, top-4, 2 shared


def pass_of(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor):
    def run() -> None:
        for p in layer.parameters():
            p.grad = None
        out = layer(x)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad)
    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="cpu-hour", choices=list(FINE))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    moe_cfg, dense_cfg = configs(args.size, [], [])
    fine_cfg, _ = configs(args.size, [], ["model.num_experts=16", "model.top_k=4",
                                          "model.num_shared_experts=2",
                                          f"model.expert_hidden={FINE[args.size]}"])
    torch.manual_seed(0)
    m = moe_cfg.model
    layers = {"moe": MoE(m), "dense": FeedForward(m.hidden_size, dense_cfg.model.dense_hidden,
                                                  m.expert_activation),
              "fine": MoE(fine_cfg.model)}
    for layer in layers.values():
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.02)
    tokens = moe_cfg.train.batch_size * moe_cfg.data.seq_len
    x = torch.randn(tokens, m.hidden_size)
    grad = torch.randn(tokens, m.hidden_size)
    runs = {name: pass_of(layer, x, grad) for name, layer in layers.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.rounds):
        for name in (list(runs) if r % 2 else list(runs)[::-1]):
            runs[name]()
            start = time.perf_counter()
            for _ in range(3):
                runs[name]()
            times[name].append((time.perf_counter() - start) / 3)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"{args.size}: " + ", ".join(f"{n} {t * 1e3:.1f} ms" for n, t in med.items())
          + f"; MoE/dense {med['moe'] / med['dense']:.3f}, fine-grained/dense "
          f"{med['fine'] / med['dense']:.3f} ({cpu_name()}, {args.threads} thread(s), "
          f"load {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
