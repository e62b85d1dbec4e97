"""Batch-1 decoding against llama.cpp: tokens/s of llama.cpp on our GGUF export (``--llama``:
f32, q8_0) and of our own ``generate`` (``--ours``: fp32, bf16, int8 with this CPU's
kernel, int8-KERNEL), same model, same prompt, same machine, interleaved round by round
in one run so the machine's drift hits every contender alike.

Random weights at the config's sizes (speed does not depend on them), or ``--checkpoint``.
The checkpoint and its GGUF files are written once into ``--work`` and reused. Each
contender's share of the memory roofline: the weight bytes a step reads per token (ours:
benchmarks/decoding/quantized_decode.py's count; llama.cpp's: the same tensors at its type, f32 4
bytes and q8_0 34 per 32 values) over the read bandwidth measured in the same run.
``--json`` writes every figure, the CPU and the load averages. llama.cpp is node-llama-cpp's
prebuilt CPU binary (benchmarks/helpers/llama_cpp.py), with its default F16 KV cache, as
a user gets it; each of its runs is a fresh process, and its model load is not timed.
Both sides time the steps after the first new token: ``(tokens - 1) / seconds``.

    python benchmarks/interop/llama_cpp_decode.py --config configs/deepseek-v3-mini.yaml --threads 1
    python benchmarks/interop/llama_cpp_decode.py --config configs/deepseek-v3-mini.yaml \
        --ours fp32 int8 int8-fbgemm --llama q8_0 --rounds 2 --json out.json

``export_for_llama_cpp`` and ``llama_cpp_rate`` are meant for reuse (another benchmark
comparing its own decoding with llama.cpp's q8_0).

Fills BENCHMARKS.md, section "Against llama.cpp".
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import _paths  # noqa: F401 (puts benchmarks/ on sys.path)
import torch
from helpers import llama_cpp
from helpers.decode_timing import load_average, read_bandwidth
from quantized_decode import bytes_per_step

from deepseek_mini import Config, DeepSeekMini, generate
from deepseek_mini.checkpoint import weights_checkpoint
from deepseek_mini.data.instruct import instruct_prompt
from deepseek_mini.files import atomic_save
from deepseek_mini.inference.loading import load_for_inference
from deepseek_mini.inference.prompts import prompt_ids
from deepseek_mini.interop.gguf_export import export_gguf
from deepseek_mini.model.quantize import KERNELS, quantize
from deepseek_mini.train.precision import DTYPES

OURS = ["fp32", "bf16", "int8", *(f"int8-{k}" for k in KERNELS)]
LLAMA_BYTES = {"f32": 1.0, "q8_0": 34 / 32 / 4}  # of fp32's weight bytes

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


def ours_model(checkpoint: Path, mode: str) -> DeepSeekMini:
    """Our model of ``checkpoint`` as ``mode`` (module docstring)."""
    if mode == "bf16":
        return load_for_inference(checkpoint, dtype=DTYPES["bf16"])[0]
    model = load_for_inference(checkpoint)[0]
    if mode.startswith("int8"):
        kernel = mode.removeprefix("int8").removeprefix("-") or None
        quantize(model, "int8", kernel)
    return model


def cpu_name() -> str:
    """The CPU's model name and its widest vector extensions, for the record."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), "unknown")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines()
                      if line.startswith("flags")), []))
    wide = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
            if f in flags]
    return f"{name} ({', '.join(wide) or 'no AVX2'}; torch {torch.__version__})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/deepseek-v3-mini.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--work", default="runs/llama-cpp-decode",
                        help="folder for the checkpoint and its GGUF files")
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint", help="this checkpoint instead of random weights")
    parser.add_argument("--ours", nargs="+", default=["fp32", "bf16"], choices=OURS)
    parser.add_argument("--llama", nargs="+", default=["f32", "q8_0"], choices=list(LLAMA_BYTES))
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    missing = llama_cpp.missing()
    if missing:
        raise SystemExit(f"error: {missing}")
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = (Path(args.checkpoint) if args.checkpoint
                  else random_checkpoint(args.config, args.set, work))
    files = {dtype: export_for_llama_cpp(checkpoint, dtype, work) for dtype in args.llama}
    tok = load_for_inference(checkpoint)[1]
    ours = {mode: ours_model(checkpoint, mode) for mode in args.ours}
    fp32_bytes = bytes_per_step(ours_model(checkpoint, "fp32"), 1)
    read = {f"llama.cpp {d}": fp32_bytes * LLAMA_BYTES[d] for d in files}
    read.update({f"deepseek-mini generate {d}": bytes_per_step(m, 1) for d, m in ours.items()})
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
    bandwidths: list[float] = []
    for _ in range(args.rounds):
        bandwidths.append(read_bandwidth())
        for name, measure in contenders.items():
            loads.append(load_average())
            rates[name].append(measure())
    bandwidth = statistics.median(bandwidths)
    base_name = next((n for n in rates if "llama.cpp q8_0" in n), next(iter(rates)))
    base = rates[base_name]
    print(f"{cpu_name()}; config {args.config} {' '.join(args.set)}; prompt {len(ids)} "
          f"tokens, {args.new_tokens} new; threads {args.threads}; {args.rounds} interleaved "
          f"rounds; read bandwidth {bandwidth:.1f} GB/s (median of the rounds'); load "
          f"average {min(loads):.1f}-{max(loads):.1f}")
    print(f"| contender | decode tok/s, median | per round | vs {base_name}, median of the "
          "rounds' ratios | MB read / token | share of roofline |")
    print("|---|---|---|---|---|---|")
    table = {}
    for name, values in rates.items():
        ratio = statistics.median(v / b for v, b in zip(values, base, strict=True))
        rate = statistics.median(values)
        share = rate * read[name] / (bandwidth * 1e9)
        table[name] = {"tok_s": rate, "rounds": values, "ratio": ratio,
                       "mb_per_token": read[name] / 1e6, "roofline_share": share}
        print(f"| {name} | {rate:.2f} | {' / '.join(f'{v:.2f}' for v in values)} | "
              f"{ratio:.2f}x | {read[name] / 1e6:.0f} | {100 * share:.0f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "cpu": cpu_name(), "config": args.config, "set": args.set,
            "checkpoint": str(checkpoint), "threads": args.threads,
            "prompt_tokens": len(ids), "new_tokens": args.new_tokens,
            "bandwidth_gb_s": bandwidths, "load_average": loads, "baseline": base_name,
            "contenders": table}, indent=1))

if __name__ == "__main__":
    main()
