"""Decoding speed of fp32, bf16 and int8 weights (``quantize``), against the roofline.

One model of the config's shape (random weights: speed does not depend on them) and its
bf16 and int8 copies decode the same greedy prompt in one process, the modes alternating
within each repeat (best of ``--repeats``), so their ratios are fair on a shared machine.
Each row gives the weight bytes a decode step reads per token and the read bandwidth
measured in the same run (the best of three ``sum``s over 500 MB, before each batch
size): ``roofline = bandwidth / bytes per token`` is the most tokens/s that reading the
weights allows, and ``share`` is the measured rate's fraction of it.

Bytes read per step: every tensor a step uses once (attention, router, shared experts,
norms, the LM head, which with a tied head is the embedding table), plus the routed
experts a step touches: ``E · (1 − (1 − k/E)^B)`` of the E experts per layer for B rows
routed uniformly (k of E each), their int8 scales included. The embedding rows looked
up, the latent cache and the MTP modules (not run) are left out.

    python benchmarks/decoding/quantized_decode.py --config configs/base.yaml --batch 1 8 \
        --threads 1
    python benchmarks/decoding/quantized_decode.py --config configs/base.yaml --batch 1 8 --compile

Fills BENCHMARKS.md, section "int8 and bf16 weights".
"""

from __future__ import annotations

import argparse
import copy
import time

import _paths  # noqa: F401 (puts benchmarks/ on sys.path)
import torch
from helpers.decode_timing import decode_rate, load_average, read_bandwidth
from torch import nn

from deepseek_mini import Config, DeepSeekMini, quantize
from deepseek_mini.model.moe import RoutedExperts
from deepseek_mini.model.quantize import (
    KERNELS,
    Bf16Experts,
    Int8Experts,
    QuantizedEmbedding,
)

EXPERTS = (RoutedExperts, Int8Experts, Bf16Experts)


def bytes_per_step(model: DeepSeekMini, batch: int) -> float:
    """Weight bytes one decode step of ``batch`` rows reads (module docstring)."""
    cfg = model.config
    touched = 1 - (1 - cfg.top_k / cfg.num_experts) ** batch
    seen: set[int] = set()
    total = 0.0
    for name, module in model.named_modules():
        if name.startswith("mtp") or isinstance(module, (nn.Embedding, QuantizedEmbedding)):
            continue
        share = touched if isinstance(module, EXPERTS) else 1.0
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if tensor.data_ptr() in seen or name == "" and tensor.dim() == 2:
                continue  # shared, or the model's own rope tables
            seen.add(tensor.data_ptr())
            total += share * tensor.numel() * tensor.element_size()
    return total


def models(cfg: Config, modes: list[str]) -> dict[str, DeepSeekMini]:
    torch.manual_seed(0)
    fp32 = DeepSeekMini(cfg.model).eval()
    out = {}
    for mode in modes:
        if mode == "int8-bf16act":  # --dtype bf16 --quantize int8
            out[mode] = quantize(copy.deepcopy(fp32).to(torch.bfloat16), "int8")
        elif mode.startswith("int8-"):  # another int8 kernel than this CPU's default
            out[mode] = quantize(copy.deepcopy(fp32), "int8", mode.removeprefix("int8-"))
        else:
            out[mode] = fp32 if mode == "fp32" else quantize(copy.deepcopy(fp32), mode)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/base.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--modes", nargs="+", default=["fp32", "bf16", "int8"],
                        choices=["fp32", "bf16", "int8", "int8-bf16act",
                                 *(f"int8-{k}" for k in KERNELS)],
                        help="int8-bf16act: int8 weights with bf16 activations "
                             "(--dtype bf16 --quantize int8); int8-KERNEL: that int8 "
                             "kernel instead of this CPU's default")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true",
                        help="also decode with generate(..., compile=True), compiled untimed "
                             "first")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = Config.from_yaml(args.config, args.set)
    built = models(cfg, args.modes)
    ways = [False, True] if args.compile else [False]
    print(f"config {args.config} {' '.join(args.set)}: threads {torch.get_num_threads()}, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, best of {args.repeats}")
    print("| weights | step | batch | decode tok/s | vs fp32 | MB read / token | "
          "bandwidth GB/s | roofline tok/s | share | compile s | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for batch in args.batch:
        bandwidth = read_bandwidth()
        shape = (batch, args.prompt_len, args.new_tokens, True)
        compile_s = {}
        for mode, model in built.items():
            decode_rate(model, batch, 4, 2, True)  # first-call allocations
            for compiled in ways[1:]:
                start = time.perf_counter()
                decode_rate(model, *shape, compile=compiled)
                compile_s[mode] = time.perf_counter() - start
        best: dict[tuple[str, bool], tuple[float, float]] = {}
        for _ in range(args.repeats):
            for mode, model in built.items():
                for compiled in ways:
                    load = load_average()
                    rate = decode_rate(model, *shape, compile=compiled)[1]
                    if rate > best.get((mode, compiled), (0.0, 0.0))[0]:
                        best[(mode, compiled)] = (rate, load)
        for compiled in ways:
            base = best.get(("fp32", compiled), (float("nan"), 0.0))[0]
            for mode, model in built.items():
                rate, load = best[(mode, compiled)]
                per_token = bytes_per_step(model, batch) / batch
                roof = bandwidth * 1e9 / per_token
                print(f"| {mode} | {'compiled' if compiled else 'eager'} | {batch} | "
                      f"{rate:.1f} | {rate / base:.2f}x | {per_token / 1e6:.0f} | "
                      f"{bandwidth:.1f} | {roof:.0f} | {100 * rate / roof:.0f}% | "
                      f"{compile_s.get(mode, 0) if compiled else 0:.0f} | {load:.1f} |",
                      flush=True)


if __name__ == "__main__":
    main()
