"""Where a training step's time goes: torch.profiler over a few full steps of deepseek-mini.

    python benchmarks/training/profile_step.py --config configs/base.yaml --layers 4 --steps 3
    python benchmarks/training/profile_step.py --layers 6 --threads 1 --precision bf16 --shapes

The step is the trainer's (forward with targets, backward, gradient clipping, the
config's optimizer from ``optim.build_optimizer``) with ``record_function`` labels around
its phases and around the forward of the model's parts (attention, router, routed
experts, shared expert, LM head + cross-entropy), added here by wrapping, not in the
model. Prints the operators by self time (CPU or CUDA; ``--shapes`` splits them by input
shape), then the labelled ranges. ``--precision bf16`` runs the forward under bf16
autocast, as the trainer does.

Fills BENCHMARKS.md, section "Where the time goes".
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import _paths  # noqa: F401, E402 (puts benchmarks/ on sys.path)
import torch  # noqa: E402
from helpers.profiling import labelled  # noqa: E402
from helpers.step_timing import add_step_size_args, fixed_precision, step_config  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from deepseek_mini import DeepSeekMini  # noqa: E402
from deepseek_mini.allocator import keep_freed_memory  # noqa: E402
from deepseek_mini.model import transformer as model_module  # noqa: E402
from deepseek_mini.train.optim import build_optimizer  # noqa: E402

PARTS = {"attn": "attention", "moe.experts": "routed experts", "moe.shared": "shared expert",
         "moe.router": "router"}


def label_modules(model: torch.nn.Module) -> None:
    """Wrap the forward of each labelled submodule, and the LM head's cross-entropy, in a
    ``record_function`` range."""
    model_module.linear_cross_entropy = labelled(model_module.linear_cross_entropy,
                                                 "LM head + cross-entropy")
    for name, module in model.named_modules():
        part = next((label for key, label in PARTS.items() if name.endswith(key)), None)
        if part is None:
            continue
        module.forward = labelled(module.forward, part)


@contextmanager
def step_range(name: str) -> Iterator[None]:
    with record_function(f"phase: {name}"):
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_size_args(parser, "configs/base.yaml", batch=8, seq_len=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--shapes", action="store_true", help="operators by input shape")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads; 1 makes self CPU time the work itself")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the trainer does: no page faults inside the profiled ops
    config = step_config(args, list(args.set))
    cfg = config.model
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = DeepSeekMini(cfg).to(device)
    label_modules(model)
    optimizer = build_optimizer(model, config.train)  # the config's own (Muon for cpu-hour)
    precision = fixed_precision(args.precision, device)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), device=device)
    x, y = ids[:, :-1], ids[:, 1:]

    def step() -> None:
        with step_range("forward"), precision.autocast():
            loss = model(x, targets=y).loss
        with step_range("backward"):
            loss.backward()
        with step_range("optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocations, optimizer state
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities, record_shapes=args.shapes) as prof:
        for _ in range(args.steps):
            step()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages(group_by_input_shape=args.shapes)
    print(events.table(sort_by=sort, row_limit=args.rows))
    total = sum(e.self_cpu_time_total for e in events)
    print(f"{'range':<40}{'total ms/step':>14}{'share':>8}")
    backward = "autograd::engine::evaluate_function: "
    for e in sorted(events, key=lambda e: -e.cpu_time_total):
        if e.key.startswith(("phase: ", "part: ")) or (
                e.key.startswith(backward) and e.cpu_time_total > 0.01 * total):
            ms = e.cpu_time_total / 1e3 / args.steps
            name = e.key.replace(backward, "backward: ")
            print(f"{name:<40}{ms:>14.1f}{e.cpu_time_total / total:>8.1%}")


if __name__ == "__main__":
    main()
