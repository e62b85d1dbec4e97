"""Batch-1 decoding against llama.cpp: tokens/s of llama.cpp on our GGUF export (f32 and
q8_0) and of our own ``generate`` (fp32 and bf16), same model, same prompt, same machine,
interleaved round by round in one run so the machine's drift hits every contender alike.

Random weights at the config's sizes (speed does not depend on them). The checkpoint and
its GGUF files are written once into ``--work`` and reused. llama.cpp is node-llama-cpp's
prebuilt CPU binary (benchmarks/helpers/llama_cpp.py), with its default F16 KV cache, as
a user gets it; each of its runs is a fresh process, and its model load is not timed.
Both sides time the steps after the first new token: ``(tokens - 1) / seconds``.

    python benchmarks/interop/llama_cpp_decode.py --config configs/deepseek-v3-mini.yaml --threads 1

``export_for_llama_cpp`` and ``llama_cpp_rate`` are meant for reuse (another benchmark
comparing its own decoding with llama.cpp's q8_0).

Fills BENCHMARKS.md, section "Against llama.cpp".
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import _paths  # noqa: F401 (puts benchmarks/ on sys.path)
import torch
from decode import load_average
from helpers import llama_cpp

from deepseek_mini import Config, DeepSeekMini, generate
from deepseek_mini.checkpoint import weights_checkpoint
from deepseek_mini.data.instruct import instruct_prompt
from deepseek_mini.files import atomic_save
from deepseek_mini.inference.loading import load_for_inference
from deepseek_mini.inference.prompts import prompt_ids
from deepseek_mini.interop.gguf_export import export_gguf
from deepseek_mini.train.precision import DTYPES

PROMPT = instruct_prompt("Daisy's kite gets stuck in a tree, and Ella helps her get it down "
                         "with a stick.", "excited, fly, kite", "Dialogue")


def random_checkpoint(config: str, overrides: list[str], work: Path, seed: int = 0) -> Path:
    """A checkpoint of the config's model with random weights (kept between runs)."""
    path = work / "random.pt"
    if not path.exists():
        cfg = Config.from_yaml(config, overrides)
        torch.manual_seed(seed)
        atomic_save(weights_checkpoint(DeepSeekMini(cfg.model).state_dict(), cfg.to_dict()),
                    path)
    return path


def export_for_llama_cpp(checkpoint: Path, dtype: str, work: Path) -> Path:
    """``checkpoint``'s GGUF at ``dtype`` in ``work`` (exported once, then reused)."""
    out = work / f"{checkpoint.stem}-{dtype}.gguf"
    if not out.exists():
        start = time.perf_counter()
        export_gguf(checkpoint, out, dtype)
        print(f"exported {out} ({out.stat().st_size / 2**30:.2f} GiB) in "
              f"{time.perf_counter() - start:.0f} s")
        gc.collect()
    return out


def llama_cpp_rate(gguf_file: Path, prompt: str, new_tokens: int, threads: int) -> float:
    """llama.cpp's batch-1 decode tokens/s on ``gguf_file``."""
    return llama_cpp.decode_rate(gguf_file, prompt, new_tokens, threads)[1]


def our_rate(model: DeepSeekMini, ids: list[int], new_tokens: int) -> float:
    """Our batch-1 decode tokens/s: ``generate``'s steps after the first, timestamped by
    its streamer (as benchmarks/decoding/decode.py times them)."""
    stamps: list[float] = []
    generate(model, torch.tensor([ids]), max_new_tokens=new_tokens,
             streamer=lambda _: stamps.append(time.perf_counter()))
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/deepseek-v3-mini.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--work", default="runs/llama-cpp-decode",
                        help="folder for the checkpoint and its GGUF files")
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    missing = llama_cpp.missing()
    if missing:
        raise SystemExit(f"error: {missing}")
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = random_checkpoint(args.config, args.set, work)
    files = {dtype: export_for_llama_cpp(checkpoint, dtype, work) for dtype in ("f32", "q8_0")}
    model, tok, _ = load_for_inference(checkpoint)
    ours = {"fp32": model, "bf16": load_for_inference(checkpoint, dtype=DTYPES["bf16"])[0]}
    ids = prompt_ids(tok, [PROMPT])[0]
    contenders = {f"llama.cpp {d}": (lambda f=f: llama_cpp_rate(f, PROMPT, args.new_tokens,
                                                                args.threads))
                  for d, f in files.items()}
    contenders.update({f"deepseek-mini generate {d}": (lambda m=m: our_rate(m, ids,
                                                                           args.new_tokens))
                       for d, m in ours.items()})
    for m in ours.values():
        our_rate(m, ids, 3)  # warm-up: first-call allocations
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    loads: list[float] = []
    for _ in range(args.rounds):
        for name, measure in contenders.items():
            loads.append(load_average())
            rates[name].append(measure())
    base = rates["deepseek-mini generate fp32"]
    print(f"config {args.config} {' '.join(args.set)}; prompt {len(ids)} tokens, "
          f"{args.new_tokens} new; threads {args.threads}; {args.rounds} interleaved rounds; "
          f"load average {min(loads):.1f}-{max(loads):.1f}")
    print("| contender | decode tok/s, median | per round | vs generate fp32, median of "
          "the rounds' ratios |")
    print("|---|---|---|---|")
    for name, values in rates.items():
        ratio = statistics.median(v / b for v, b in zip(values, base, strict=True))
        print(f"| {name} | {statistics.median(values):.2f} | "
              f"{' / '.join(f'{v:.2f}' for v in values)} | {ratio:.2f}x |")

if __name__ == "__main__":
    main()
