"""A long prompt's prefill with quantized weights: int8 through the int8 kernel at every
row count, against int8 cast to bf16 per layer for many rows (what ``quantize`` does past
``DEQUANTIZE_ROWS``), bf16 weights and fp32. Random weights, batch 1, one thread; the
variants alternate within each repeat, best of ``--repeats``.

    python benchmarks/decoding/quantized_prefill.py --config configs/base.yaml --lengths 128 512

Fills BENCHMARKS.md, section "int8 and bf16 weights".
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from deepseek_mini import Config, DeepSeekMini, quantize
from deepseek_mini.inference.generate import prefill
from deepseek_mini.model import quantize as quantize_module

VARIANTS = {"fp32": None, "bf16": None, "int8, cast per layer": 16,
            "int8, kernel at every size": 10**9}


def prefill_seconds(model: DeepSeekMini, length: int, dequantize_rows: int | None) -> float:
    if dequantize_rows is not None:
        quantize_module.DEQUANTIZE_ROWS = dequantize_rows
    ids = torch.randint(0, model.config.vocab_size, (1, length),
                        generator=torch.Generator().manual_seed(0))
    positions = torch.arange(length)[None]
    with torch.inference_mode():
        cache = model.new_cache(1, length)
        start = time.perf_counter()
        prefill(model, ids, cache, positions, None)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/base.yaml")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fp32 = DeepSeekMini(Config.from_yaml(args.config).model).eval()
    int8 = quantize(copy.deepcopy(fp32), "int8")
    models = {"fp32": fp32, "bf16": quantize(copy.deepcopy(fp32), "bf16"),
              "int8, cast per layer": int8, "int8, kernel at every size": int8}
    print(f"config {args.config}: threads {torch.get_num_threads()}, batch 1, "
          f"best of {args.repeats}")
    print("| prompt tokens | weights | prefill s | tokens/s | vs fp32 |")
    print("|---|---|---|---|---|")
    for length in args.lengths:
        best = dict.fromkeys(VARIANTS, float("inf"))
        prefill_seconds(fp32, 8, None)
        for _ in range(args.repeats):
            for name, rows in VARIANTS.items():
                best[name] = min(best[name], prefill_seconds(models[name], length, rows))
        for name, seconds in best.items():
            print(f"| {length} | {name} | {seconds:.2f} | {length / seconds:.0f} | "
                  f"{best['fp32'] / seconds:.2f}x |", flush=True)
    quantize_module.DEQUANTIZE_ROWS = 16


if __name__ == "__main__":
    main()
