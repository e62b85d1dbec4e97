"""Where a decoding step's time goes: torch.profiler over a few batch-1 decode steps.

    python benchmarks/decoding/profile_decode.py --config configs/base.yaml --mode int8 --threads 1

Random weights (fp32, or quantized with ``--mode``), a prompt of ``--prompt-len`` tokens
prefilled, a few steps decoded untimed, then ``--steps`` steps decoded twice: timed
without the profiler, then profiled. Prints the step's wall time, the operators by self
time (with their calls per step), the operators' count per step, and the labelled parts
(attention, router, routed experts, shared expert, norms, LM head), added by wrapping
the modules here, not in the model.

Fills BENCHMARKS.md, section "Cached decoding".
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import _paths  # noqa: F401, E402 (puts benchmarks/ on sys.path)
import torch  # noqa: E402
from helpers.profiling import labelled  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from deepseek_mini import Config, DeepSeekMini, quantize  # noqa: E402
from deepseek_mini.inference.generate import decode_one, prefill  # noqa: E402

PARTS = {"attn": "attention", "moe.experts": "routed experts", "moe.shared": "shared expert",
         "moe.router": "router", "norm": "norms", "lm_head": "LM head", "head": "LM head"}


def label_modules(model: torch.nn.Module) -> None:
    """Wrap the forward of each labelled submodule in a ``record_function`` range (the
    outermost match only, so a norm inside attention counts as attention)."""
    for name, module in model.named_modules():
        last = name.split(".")[-1]
        part = next((label for key, label in PARTS.items()
                     if name.endswith(key) and (last == key.split(".")[-1]
                                                or last.endswith("_norm"))), None)
        if part is not None and ".attn." not in name:
            module.forward = labelled(module.forward, part)
            if getattr(module, "one_token", None) is not None:  # int8 experts, batch 1
                module.one_token = labelled(module.one_token, part)


def ops_by_part(events: list) -> dict[str | None, int]:
    """Operator calls (nested ones included, as the table counts them) by the labelled
    part they ran in (its outermost label), None for those outside every part."""
    counts: dict[str | None, int] = {}
    for event in events:
        if event.name.startswith("part: "):
            continue
        part, parent = None, event.cpu_parent
        while parent is not None:
            if parent.name.startswith("part: "):
                part = parent.name[6:]
            parent = parent.cpu_parent
        counts[part] = counts.get(part, 0) + 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/base.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--mode", default="int8", choices=["fp32", "bf16", "int8"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = Config.from_yaml(args.config, overrides=args.set).model
    torch.manual_seed(0)
    model = DeepSeekMini(cfg).eval()
    if args.mode != "fp32":
        quantize(model, args.mode)
    label_modules(model)
    total = args.prompt_len + 4 + 4 * args.steps
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt_len),
                        generator=torch.Generator().manual_seed(0))
    positions = torch.arange(total).expand(args.batch, total)
    with torch.inference_mode():
        cache = model.new_cache(args.batch, total)
        token = prefill(model, ids, cache, positions[:, :args.prompt_len], None
                        ).argmax(-1, keepdim=True)
        at = args.prompt_len

        def steps(n: int) -> None:
            nonlocal token, at
            for _ in range(n):
                token = decode_one(model, token, cache, positions[:, at:at + 1]
                                   ).argmax(-1, keepdim=True)
                at += 1

        steps(4)  # warm-up
        step_ms = []
        for _ in range(3):  # the best of three windows: a shared machine
            start = time.perf_counter()
            steps(args.steps)
            step_ms.append((time.perf_counter() - start) / args.steps * 1e3)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            steps(args.steps)
    events = prof.key_averages()
    ops = [e for e in events if not e.key.startswith("part: ")]
    part_ops = ops_by_part(prof.events())
    print(f"{args.config} {args.mode}, batch {args.batch}, threads {torch.get_num_threads()}: "
          f"{min(step_ms):.1f} ms a step unprofiled (windows: "
          f"{', '.join(f'{t:.1f}' for t in step_ms)}); "
          f"{sum(e.count for e in ops) / args.steps:.0f} operator calls a step, "
          f"{sum(e.count for e in ops) / args.steps / cfg.num_layers:.0f} a layer")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    profiled = sum(e.self_cpu_time_total for e in events) / 1e3 / args.steps
    print(f"{'part':<20}{'ms/step':>10}{'share':>8}{'ops/step':>10}   (profiled step "
          f"{profiled:.1f} ms; a part's own time outside operators is Python)")
    for e in sorted(events, key=lambda e: -e.cpu_time_total):
        if e.key.startswith("part: "):
            ms = e.cpu_time_total / 1e3 / args.steps
            print(f"{e.key[6:]:<20}{ms:>10.1f}{ms / profiled:>8.1%}"
                  f"{part_ops.get(e.key[6:], 0) / args.steps:>10.0f}")
    print(f"{'(outside parts)':<28}{'':>10}{part_ops.get(None, 0) / args.steps:>10.0f}")


if __name__ == "__main__":
    main()
