"""Batch-1 decoding against llama.cpp on the same model: our int8 (and fp32) weights
against llama.cpp's q8_0 of the same checkpoint exported as GGUF (``deepseek-mini export
--format gguf --dtype q8_0``, DeepSeek-V3's layout, so ``configs/deepseek-v3-mini.yaml``).

llama.cpp runs through ``benchmarks/helpers/llama_cpp.py`` (node-llama-cpp's CPU binary,
as the GGUF tests use); each of its runs is a fresh process whose load time is
left out. Both decode greedily after a prompt of about ``--prompt-len`` tokens, one
thread, and count the steps after the first new token. The contenders alternate within
each repeat, best of ``--repeats``.

    python benchmarks/interop/quantized_vs_llama_cpp.py --checkpoint v3-mini.pt \
        --gguf v3-mini-q8_0.gguf

Fills BENCHMARKS.md, section "Against llama.cpp".
"""

from __future__ import annotations

import argparse

import _paths  # noqa: F401 (puts benchmarks/ on sys.path)
import torch
from helpers.decode_timing import decode_rate, load_average, read_bandwidth

from deepseek_mini import load_for_inference

try:
    from helpers import llama_cpp
except ImportError:  # the GGUF export's helper is not in this tree
    llama_cpp = None

PROMPT = ("Once upon a time there was a little girl named Lily who lived in a small house "
          "near the big green forest with her mother and her dog")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--gguf", required=True, help="the same checkpoint as q8_0 GGUF")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if llama_cpp is None or llama_cpp.missing():
        raise SystemExit("llama.cpp is not available: " + (
            "benchmarks/helpers/llama_cpp.py is missing" if llama_cpp is None
            else llama_cpp.missing()))
    torch.set_num_threads(1)
    ours = {mode: load_for_inference(args.checkpoint, quantize=mode)[0]
            for mode in (None, "int8")}
    bandwidth = read_bandwidth()
    best = {"fp32": 0.0, "int8": 0.0, "llama.cpp q8_0": 0.0}
    loads = []
    for _ in range(args.repeats):
        loads.append(load_average())
        for mode, model in ours.items():
            rate = decode_rate(model, 1, args.prompt_len, args.new_tokens, True)[1]
            best[mode or "fp32"] = max(best[mode or "fp32"], rate)
        rate = llama_cpp.decode_rate(args.gguf, PROMPT, args.new_tokens, threads=1)[1]
        best["llama.cpp q8_0"] = max(best["llama.cpp q8_0"], rate)
    print(f"{args.checkpoint} / {args.gguf}: batch 1, threads 1, {args.new_tokens} new "
          f"tokens, best of {args.repeats}; read bandwidth {bandwidth:.1f} GB/s; load "
          f"{min(loads):.1f}-{max(loads):.1f}")
    print("| decoder | tokens/s | vs llama.cpp q8_0 |")
    print("|---|---|---|")
    for name, rate in best.items():
        print(f"| {name} | {rate:.1f} | {rate / best['llama.cpp q8_0']:.2f}x |")


if __name__ == "__main__":
    main()
