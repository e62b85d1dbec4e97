"""What the int8 model's two batch-1 shortcuts save a decode step: the fp32 weight made
once for widths the int8 kernel cannot take (``Int8Linear.weight32``) and the one-token
expert path (``Int8Experts.one_token``), against the same model with both switched off.

One int8 model of the config's shape (random weights), two caches prefilled with the same
prompt; short windows of ``--steps`` steps alternate between the settings (the order
flipping each window), so each pair of windows sees the same load. Prints the median and
best ms a step, wall and thread CPU time (CPU time is less disturbed by other processes on
a shared machine), and the median of the paired before/after ratios.

    python benchmarks/decoding/quantized_decode_paths.py --config configs/base.yaml --windows 40

Fills BENCHMARKS.md, section "int8 and bf16 weights".
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from deepseek_mini import Config, DeepSeekMini, quantize
from deepseek_mini.inference.generate import decode_one, prefill
from deepseek_mini.model.quantize import Int8Experts, Int8Linear


def switch(model: DeepSeekMini, small: dict, on: bool) -> None:
    """Both shortcuts on, or off (``weight32`` None, ``one_token`` None on the instance)."""
    for module, weight in small.items():
        module.weight32 = weight if on else None
    for module in model.modules():
        if isinstance(module, Int8Experts):
            if on:
                module.__dict__.pop("one_token", None)
            else:
                module.one_token = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/base.yaml")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = Config.from_yaml(args.config).model
    torch.manual_seed(0)
    model = quantize(copy.deepcopy(DeepSeekMini(cfg).eval()), "int8")
    small = {m: m.weight32 for m in model.modules()
             if isinstance(m, Int8Linear) and m.weight32 is not None}
    total = args.prompt_len + (args.windows + 1) * args.steps
    ids = torch.randint(0, cfg.vocab_size, (1, args.prompt_len),
                        generator=torch.Generator().manual_seed(0))
    positions = torch.arange(total)[None]
    settings = {"before": False, "after": True}
    state, times = {}, {name: ([], []) for name in settings}
    with torch.inference_mode():
        for name, on in settings.items():
            switch(model, small, on)
            cache = model.new_cache(1, total)
            token = prefill(model, ids, cache, positions[:, :args.prompt_len], None)
            state[name] = (cache, token.argmax(-1, keepdim=True), args.prompt_len)
        for window in range(args.windows + 1):  # window 0: warm-up
            for name in (settings if window % 2 else list(settings)[::-1]):
                switch(model, small, settings[name])
                cache, token, at = state[name]
                wall, cpu = time.perf_counter(), time.thread_time()
                for _ in range(args.steps):
                    token = decode_one(model, token, cache, positions[:, at:at + 1]
                                       ).argmax(-1, keepdim=True)
                    at += 1
                if window:
                    times[name][0].append((time.perf_counter() - wall) / args.steps * 1e3)
                    times[name][1].append((time.thread_time() - cpu) / args.steps * 1e3)
                state[name] = (cache, token, at)
    print(f"{args.config}: int8, batch 1, threads {torch.get_num_threads()}, "
          f"{args.windows} paired windows of {args.steps} steps, {len(small)} small-width layers")
    print("| clock | before ms/step (median, best) | after ms/step (median, best) | "
          "before/after (median of pairs) |")
    print("|---|---|---|---|")
    for i, clock in enumerate(("wall", "thread CPU")):
        before, after = times["before"][i], times["after"][i]
        ratio = statistics.median(b / a for b, a in zip(before, after, strict=True))
        print(f"| {clock} | {statistics.median(before):.1f}, {min(before):.1f} | "
              f"{statistics.median(after):.1f}, {min(after):.1f} | {ratio:.3f}x |")


if __name__ == "__main__":
    main()
