"""Ways of computing parts of our training step against each other, paired in one process.

    python benchmarks/training/bf16_variants.py --config configs/base.yaml --layers 6 \
        --variants bf16,bf16:loss-per-chunk,fp32 --steps 5

One model and optimizer (the trainer's ``train_step`` and fused AdamW); each variant is a
precision (``bf16`` or ``fp32``) and, after a colon, the pieces swapped for another way
of computing them (``+`` between several): the way the code was before a change, or an
alternative that was tried and dropped (BENCHMARKS.md, "The bf16 training step"). Rounds of
one step of every variant in turn keep a shared machine's drift out of the ratios; each
figure is the median of a variant's steps' process CPU time (user + system), its ratio
against the first variant's. The optimizer moves the weights every step; the timing
does not depend on their values.

Fills BENCHMARKS.md, section "The bf16 training step".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
from collections.abc import Callable, Iterator
from unittest import mock

import _paths  # noqa: F401 (puts benchmarks/ on sys.path)
import torch
from helpers.step_timing import add_step_size_args, fixed_precision, random_ids, step_config

from deepseek_mini import DeepSeekMini
from deepseek_mini.allocator import keep_freed_memory
from deepseek_mini.model import loss
from deepseek_mini.train import step as trainer
from deepseek_mini.train.optim import build_optimizer


def _chunked_per_chunk(hidden, weight, targets, ignore_index, chunk_rows, want_grad,
                       head=None):
    """loss._chunked as it was before its autocast path (commit 8a7d469): under autocast
    every chunk's products cast the fp32 weight (``weight.T`` is a view, which the cast
    cache skips) and the weight's gradient is summed chunk by chunk into fp32."""
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden, dtype=torch.float32) if want_grad else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_grad else None
    low_precision = torch.is_autocast_enabled(hidden.device.type)
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        h, t, keep = hidden[rows], safe_targets[rows, None], valid[rows, None]
        logits = (h @ weight.T if head is None else head(h)).float()
        picked = logits.gather(1, t)
        peak = logits.amax(dim=-1, keepdim=True)
        exp = logits.sub_(peak).exp_()
        norm = exp.sum(dim=-1, keepdim=True)
        total += ((norm.log() + peak - picked) * keep).sum()
        if not want_grad:
            continue
        grad = exp.div_(norm)
        grad.scatter_add_(1, t, torch.full_like(norm, -1.0)).mul_(keep)
        grad = grad.to(weight.dtype)
        grad_hidden[rows] = grad @ weight
        if low_precision:
            grad_weight += grad.T @ h
        else:
            grad_weight.addmm_(grad.T, h)
    return total, valid.sum(), grad_hidden, grad_weight


# name -> the patch that swaps the piece in
SWAPS: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "loss-per-chunk": lambda: mock.patch.object(loss, "_chunked", _chunked_per_chunk),
}


@contextlib.contextmanager
def swapped(names: list[str]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(SWAPS[name]())
        yield


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_size_args(p, "configs/base.yaml", batch=8, seq_len=128)
    p.add_argument("--steps", type=int, default=5, help="timed rounds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", default="bf16,bf16:loss-per-chunk")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    cfg = step_config(args, ["model.expert_activation=swiglu", *args.set])
    torch.manual_seed(0)
    model = DeepSeekMini(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    names = args.variants.split(",")
    ids = random_ids(cfg.model.vocab_size, args.batch, args.seq_len)

    def run(name: str) -> float:
        dtype, _, swaps = name.partition(":")
        precision = fixed_precision(dtype)
        with swapped([s for s in swaps.split("+") if s]):
            start = cpu_seconds()
            trainer.train_step(model, optimizer, ids, args.batch, cfg.train.grad_clip,
                               precision)
            return cpu_seconds() - start

    for name in names:
        run(name)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.steps):
        for name in names:
            times[name].append(run(name))
    base = statistics.median(times[names[0]])
    result = {"threads": args.threads, "load": round(os.getloadavg()[0], 2),
              "batch": f"{args.batch}x{args.seq_len}", "layers": cfg.model.num_layers,
              "hidden": cfg.model.hidden_size, "head_vocab": cfg.model.head_vocab}
    for name in names:
        median = statistics.median(times[name])
        result[name] = {"cpu_s_per_step": round(median, 4),
                        "tokens_per_cpu_s": round(args.batch * args.seq_len / median, 1),
                        f"speed vs {names[0]}": round(base / median, 3)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
