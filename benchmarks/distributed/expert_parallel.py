"""Expert parallelism against DDP on this CPU: step time, bytes sent and memory per rank.

    torchrun --standalone --nproc_per_node 2 benchmarks/distributed/expert_parallel.py [--steps 10]
        [--set model.num_experts=8 ...]

Both layouts live in the same two processes, built from the same seed, and take the same
global batches (``--batch`` sequences of ``data.seq_len`` random tokens, micro batches of
``--micro`` rows per rank), one step each in turn, so machine noise falls on both alike.
Each step is timed between barriers; the first ``--warmup`` of each are not counted.

Bytes: DDP all-reduces every gradient once per step (a ring sends 2·(W−1)/W of the
payload per rank); EP all-reduces the dense gradients only and moves tokens: the rows each
all-to-all sends to the other rank, counted from the split sizes of every MoE forward,
forward and backward (the backward all-to-alls carry as many rows as the forward ones).
Memory: fp32 weights, gradients and AdamW's two moments held per rank (16 bytes a
parameter), not activations.

Fills BENCHMARKS.md, section "Distributed".
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from deepseek_mini import Config, DeepSeekMini
from deepseek_mini.train.distributed import Parallel, Ranks
from deepseek_mini.train.expert_parallel import ExpertParallelExperts
from deepseek_mini.train.optim import build_optimizer
from deepseek_mini.train.precision import setup_precision
from deepseek_mini.train.step import train_step

DEFAULTS = ["model.vocab_size=8192", "model.hidden_size=256", "model.num_layers=4",
            "model.num_heads=4", "model.kv_latent_dim=64", "model.num_experts=8",
            "model.expert_hidden=512", "model.max_position=256", "data.seq_len=128",
            "train.device=cpu", "train.precision=fp32"]


class Sampler:
    """Global batches of random tokens, the same on every rank."""

    def __init__(self, batch: int, seq_len: int, vocab: int) -> None:
        self.batch, self.seq_len, self.vocab = batch, seq_len, vocab
        self.generator = torch.Generator().manual_seed(0)
        self.current: torch.Tensor | None = None

    def draw(self) -> None:
        self.current = torch.randint(0, self.vocab, (self.batch, self.seq_len + 1),
                                     generator=self.generator)

    def next_batch(self, rank: int, world: int) -> torch.Tensor:
        share = self.batch // world
        return self.current[rank * share:(rank + 1) * share]


class Layout:
    """One way of spreading the model, with its optimizer and its byte counters."""

    def __init__(self, name: str, model: DeepSeekMini, parallel: Parallel, cfg: Config) -> None:
        self.name, self.parallel, self.model = name, parallel, model
        self.train_model = parallel.wrap(model, setup_precision(cfg.train))
        self.optimizer = build_optimizer(model, cfg.train)
        self.times: list[float] = []
        self.rows_sent = 0
        for module in model.modules():
            if isinstance(module, ExpertParallelExperts):
                module.register_forward_hook(self._count)

    def _count(self, module: ExpertParallelExperts, inputs, output) -> None:
        sent, received = module.last_splits
        me = module.mesh.index
        self.rows_sent += sum(sent) - sent[me] + sum(received) - received[me]

    def held_params(self) -> tuple[int, int]:
        """(parameters on this rank, of which the dense all-reduced ones)."""
        experts = self.parallel.experts
        held = sum(p.numel() for p in self.model.parameters())
        dense = sum(p.numel() for p in self.model.parameters()
                    if experts is None or not experts.holds(p))
        return held, dense


def step(layout: Layout, sampler: Sampler, micro: int, precision) -> None:
    dist.barrier()
    start = time.perf_counter()
    batch = layout.parallel.batch(sampler, micro)
    train_step(layout.train_model, layout.optimizer, batch, micro, 1.0, precision,
               layout.parallel)
    dist.barrier()
    layout.times.append(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--batch", type=int, default=8, help="global batch, sequences")
    parser.add_argument("--micro", type=int, default=2, help="rows per micro batch per rank")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ranks = Ranks(rank, world, rank)
    cfg = Config.from_yaml(args.config, [*DEFAULTS, *args.set])
    precision = setup_precision(cfg.train)
    torch.manual_seed(cfg.train.seed)
    model = DeepSeekMini(cfg.model)
    layouts = [Layout("ddp", copy.deepcopy(model), Parallel("ddp", ranks), cfg),
               Layout(f"ep{world}+ddp", model, Parallel("ddp", ranks, None, world), cfg)]
    sampler = Sampler(args.batch, cfg.data.seq_len, cfg.model.vocab_size)
    for i in range(args.warmup + args.steps):
        sampler.draw()
        for layout in layouts:
            if i == args.warmup:
                layout.times.clear()
                layout.rows_sent = 0
            step(layout, sampler, args.micro, precision)
    report(layouts, cfg, args, world)
    dist.destroy_process_group()


def report(layouts: list[Layout], cfg: Config, args: argparse.Namespace, world: int) -> None:
    results = {}
    for layout in layouts:
        held, dense = layout.held_params()
        reduce_bytes = 2 * (world - 1) / world * 4 * dense
        # forward rows counted by the hook; the backward all-to-alls carry as many
        a2a_bytes = 2 * layout.rows_sent * cfg.model.hidden_size * 4 / args.steps
        results[layout.name] = {
            "median_step_s": round(statistics.median(layout.times), 4),
            "params_on_rank": held, "state_mib_per_rank": round(16 * held / 2 ** 20, 1),
            "all_reduce_mib_per_step": round(reduce_bytes / 2 ** 20, 2),
            "all_to_all_mib_per_step": round(a2a_bytes / 2 ** 20, 2)}
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        ddp, ep = (results[layout.name]["median_step_s"] for layout in layouts)
        print(json.dumps({"ranks": gathered, "ep_over_ddp_step_time": round(ep / ddp, 3),
                          "batch": f"{args.batch}x{cfg.data.seq_len}", "micro": args.micro,
                          "steps": args.steps, "threads_per_rank": torch.get_num_threads(),
                          "model": {k: v for k, v in cfg.to_dict()["model"].items()
                                    if k in ("hidden_size", "num_layers", "num_experts",
                                             "top_k", "expert_hidden", "vocab_size")}},
                         indent=1))


if __name__ == "__main__":
    main()
