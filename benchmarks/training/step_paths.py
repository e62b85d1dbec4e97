"""The training step with each of its CPU fast paths swapped back for the code it replaced,
interleaved in one process: what each one buys, measured against the others' drift.

    python benchmarks/training/step_paths.py --config configs/base.yaml --layers 6 \\
        --set model.expert_activation=swiglu --batch 8 --hf
    python benchmarks/training/step_paths.py --config configs/cpu-hour.yaml \\
        --set model.first_k_dense=0 --variants now,per-shape-ns
    python benchmarks/training/step_paths.py --quick        # a tiny config, seconds

One model and optimizer (the trainer's ``train_step``, as helpers/contenders.py builds
it) run every variant in turn, round after round; a variant is a set of patches applied
around its step only:

- ``row-major-head``: the LM head's fp32 cross-entropy as it was (loss.py's per-chunk
  ``h @ W.T``, the layout bf16_variants.py keeps as ``_chunked_per_chunk``);
- ``two-embedding-grads``: the tied embedding's lookup through ``nn.Embedding``, whose
  gradient autograd builds as a second dense tensor (tied_embedding.py);
- ``per-shape-ns``: fp32 Muon's Newton-Schulz batched by exact shape, a tall matrix not
  joined with the wide ones of its transposed shape (train/muon.py);
- ``plain-ns``: fp32 Newton-Schulz iterating on every matrix itself, no wide one in
  Gram form (train/muon.py);
- ``256-row-head``: the fp32 head's cross-entropy in chunks of 256 rows whatever its
  size, not the larger chunks a trimmed head takes (model/loss.py);
- ``before``: all five.

``--hf`` adds transformers' DeepseekV3 (its own model, fused AdamW) for the ratio the
project's goal is stated in. Each figure is the median over rounds of one step's process
CPU time (the work itself with one torch thread); ``--json PATH`` writes them.

Fills BENCHMARKS.md, section "Where the time goes".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
from collections.abc import Callable, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import _paths  # noqa: F401, E402 (puts benchmarks/ on sys.path)
import torch  # noqa: E402
from bf16_variants import _chunked_per_chunk  # noqa: E402
from helpers.contenders import build_hf, build_ours  # noqa: E402
from helpers.step_timing import add_step_size_args, cpu_name, random_ids, step_run, timed  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from deepseek_mini.model import loss, transformer  # noqa: E402
from deepseek_mini.train import muon  # noqa: E402


def _plain_lookup(weight: torch.Tensor, ids: torch.Tensor):
    return F.embedding(ids, weight), None


def _by_exact_shape(params: list[torch.Tensor]) -> dict[tuple[int, ...], list[int]]:
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(tuple(p.shape), []).append(i)
    return groups


PATCHES = {
    "row-major-head": [(loss, "_chunked", _chunked_per_chunk)],
    "two-embedding-grads": [(transformer, "tied_lookup", _plain_lookup)],
    "per-shape-ns": [(muon, "_by_gram_shape", _by_exact_shape)],
    "plain-ns": [(muon, "gram_pays", lambda rows, cols, steps: False)],
    "256-row-head": [(loss, "CHUNK_LOGITS", 0)],
}
PATCHES["before"] = [p for name in list(PATCHES) for p in PATCHES[name]]


@contextlib.contextmanager
def patched(variant: str) -> Iterator[None]:
    """The module attributes of ``variant`` swapped in for the duration."""
    saved = [(module, name, getattr(module, name)) for module, name, _ in PATCHES.get(variant, [])]
    for module, name, value in PATCHES.get(variant, []):
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def run(args: argparse.Namespace) -> dict:
    if args.quick:
        args.rounds = 1
    cfg, overrides, batch, seq_len = step_run(args, ("train.device=cpu", "train.precision=fp32"))
    torch.manual_seed(0)
    ours = build_ours(cfg)
    steps: dict[str, Callable] = {}
    for variant in args.variants.split(","):
        if variant != "now" and variant not in PATCHES:
            raise SystemExit(f"unknown variant {variant!r}: now, {', '.join(PATCHES)}")

        def step(ids: torch.Tensor, variant: str = variant) -> None:
            with patched(variant):
                ours.train_step(ids)
        steps[variant] = step
    if args.hf:
        torch.manual_seed(0)
        steps["hf"] = build_hf(cfg).train_step
    ids = random_ids(cfg.model.vocab_size, batch, seq_len)
    for step in steps.values():
        step(ids)  # warm-up: allocations, optimizer state
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            cpu[name].append(timed(step, ids)[1])
    tokens = batch * seq_len
    seconds = {name: statistics.median(times) for name, times in cpu.items()}
    result = {
        "cpu": cpu_name(), "threads": args.threads,
        "load": [round(x, 2) for x in os.getloadavg()], "config": args.config,
        "overrides": overrides, "rounds": args.rounds,
        "cpu_s_per_step": {n: round(s, 3) for n, s in seconds.items()},
        "cpu_s_rounds": {n: [round(s, 3) for s in times] for n, times in cpu.items()},
        "tokens_per_cpu_s": {n: round(tokens / s, 1) for n, s in seconds.items()},
        "now_speedup_over": {n: round(s / seconds["now"], 3) for n, s in seconds.items()
                             if n != "now"} if "now" in seconds else {},
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_size_args(p, "configs/base.yaml")
    p.add_argument("--variants", default="now,before,row-major-head,two-embedding-grads")
    p.add_argument("--hf", action="store_true", help="add transformers' DeepseekV3")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a tiny config, one round")
    p.add_argument("--json", default=None, help="write the result here")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
