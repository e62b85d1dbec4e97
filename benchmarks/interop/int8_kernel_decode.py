"""Batch-1 decoding of one int8 model through each int8 kernel that shares its weights
(``int8pack``, ``inductor``), against llama.cpp q8_0 on the same model's GGUF, rounds
interleaved: llama_cpp_decode.py's measurement with one checkpoint load and one
quantization (the kernels read the same int8 tensors, so the model switches kernel
between rounds), short enough for an exclusive slot on a slow machine.

``--wait-for FILE`` loads and warms everything first, then waits until FILE exists
before timing, so the slow load can run before the machine is quiet:

    python benchmarks/interop/int8_kernel_decode.py --checkpoint random.pt \\
        --gguf random-q8_0.gguf --wait-for /tmp/go &
    touch /tmp/go   # once nothing else runs; /tmp/go.done appears when timing ends

Fills BENCHMARKS.md, section "A compiled one-row int8 kernel for AVX2".
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import _paths  # noqa: F401 (puts benchmarks/ on sys.path)
import torch
from helpers.decode_timing import load_average
from llama_cpp_decode import PROMPT, cpu_name, llama_cpp_rate, our_rate

from deepseek_mini.inference.loading import load_for_inference
from deepseek_mini.inference.prompts import prompt_ids
from deepseek_mini.model.quantize import COMPUTE, Int8Experts, Int8Linear, quantize

KERNELS = ("int8pack", "inductor")


def use_kernel(model: torch.nn.Module, kernel: str) -> None:
    """Switch every int8 layer of ``model`` to ``kernel`` (one of ``KERNELS``, which keep
    the same tensors; only the experts' activation dtype differs)."""
    for module in model.modules():
        if isinstance(module, Int8Linear | Int8Experts):
            module.kernel = kernel
        if isinstance(module, Int8Experts):
            module.compute = COMPUTE if kernel == "int8pack" else torch.float32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--gguf", help="its q8_0 GGUF, for llama.cpp (omit: ours only)")
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--wait-for", help="time only once this file exists")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tok = load_for_inference(Path(args.checkpoint))[:2]
    quantize(model, "int8", "inductor")
    ids = prompt_ids(tok, [PROMPT])[0]
    for kernel in KERNELS:  # warm-up: allocations, and the inductor kernel's compiles
        use_kernel(model, kernel)
        our_rate(model, ids, 3)
    contenders = {f"ours int8, {k}": (lambda k=k: (use_kernel(model, k),
                                                   our_rate(model, ids, args.new_tokens))[1])
                  for k in KERNELS}
    if args.gguf:
        contenders["llama.cpp q8_0"] = lambda: llama_cpp_rate(Path(args.gguf), PROMPT,
                                                              args.new_tokens, 1)
    if args.wait_for:
        print("ready", flush=True)
        while not Path(args.wait_for).exists():
            time.sleep(0.2)
    loads, rates = [], {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, measure in contenders.items():
            loads.append(load_average())
            rates[name].append(measure())
    base = rates.get("llama.cpp q8_0", rates["ours int8, int8pack"])
    print(f"{cpu_name()}; {args.checkpoint}; prompt {len(ids)} tokens, {args.new_tokens} new;"
          f" 1 thread; {args.rounds} interleaved rounds; load average "
          f"{min(loads):.1f}-{max(loads):.1f}")
    print("| contender | decode tok/s, median | per round | vs int8pack | vs llama.cpp q8_0 |")
    print("|---|---|---|---|---|")
    for name, values in rates.items():
        vs_pack = statistics.median(v / b for v, b in
                                    zip(values, rates["ours int8, int8pack"], strict=True))
        vs_base = statistics.median(v / b for v, b in zip(values, base, strict=True))
        print(f"| {name} | {statistics.median(values):.2f} | "
              f"{' / '.join(f'{v:.2f}' for v in values)} | {vs_pack:.2f}x | "
              f"{vs_base:.2f}x |", flush=True)
    if args.wait_for:
        Path(args.wait_for + ".done").touch()


if __name__ == "__main__":
    main()
