"""Training and decoding throughput of deepseek-mini against a plain implementation of the
same model and transformers' DeepseekV3 at the same sizes, in one run.

    python benchmarks/training/throughput.py --config configs/base.yaml --layers 4

Each contender (see contenders.py) runs in its own child process, one after the other, on
the same random tokens: a warm-up step, then ``--steps`` timed training steps (forward,
backward, clipping, AdamW) at ``--batch`` × ``--seq-len``, then greedy decoding of
``--new-tokens`` after a ``--prompt-len`` prompt at each ``--decode-batches`` size. A child
per contender keeps their memory apart (the peak RSS is the child's own high-water mark)
and lets the base config's 30 layers fit in RAM one model at a time. The parent measures
the fp32 and bf16 matmul peaks for MFU in the same run and prints the table.

``--layers`` shortens the model for a quick run: every layer costs the same, so the
ratios between contenders carry over (the embedding / LM head share grows as layers drop).

Fills BENCHMARKS.md, section "Against a plain implementation and transformers".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import _paths  # noqa: F401, E402 (puts benchmarks/ on sys.path)
import torch  # noqa: E402

from deepseek_mini import Config  # noqa: E402
from deepseek_mini.train.mfu import format_flops, measure_matmul_peak  # noqa: E402
from deepseek_mini.train.precision import resolve_device  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# contender -> the config overrides that make it, on top of the run's own
VARIANTS: dict[str, list[str]] = {
    "ours": [],
    "ours-gelu": ["model.expert_activation=gelu"],
    "ours-compile": ["train.compile=true"],
    "ours-bf16": ["train.precision=bf16"],
    "plain": [],
    "hf": [],
}
DEFAULT_CONTENDERS = "ours,ours-gelu,plain,hf"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "base.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override, as for deepseek-mini train (repeatable)")
    p.add_argument("--activation", default="swiglu", choices=["swiglu", "gelu"],
                   help="expert activation of the comparison (DeepseekV3 is swiglu)")
    p.add_argument("--layers", type=int, default=None, help="override model.num_layers")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed training steps per contender")
    p.add_argument("--contenders", default=DEFAULT_CONTENDERS,
                   help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--no-train", action="store_true", help="skip the training steps")
    p.add_argument("--decode-batches", default="1,8", help="comma-separated; '' for none")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--decode-repeats", type=int, default=2,
                   help="decodes per batch size; the fastest counts")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in each contender's process (default: torch's)")
    p.add_argument("--peak-seconds", type=float, default=0.5,
                   help="how long each matmul peak is measured")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = [c for c in args.contenders.split(",") if c not in VARIANTS]
    if unknown:
        p.error(f"unknown contender {unknown[0]!r} (known: {', '.join(VARIANTS)})")
    return args


def config_for(args: argparse.Namespace, name: str) -> Config:
    overrides = [f"model.expert_activation={args.activation}",
                 f"data.seq_len={args.seq_len}", f"train.batch_size={args.batch}",
                 f"train.micro_batch_size={args.batch}", "train.precision=fp32", *args.set]
    if args.layers:
        overrides.append(f"model.num_layers={args.layers}")
    return Config.from_yaml(args.config, overrides=overrides + VARIANTS[name])


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of ``fn()``. With one thread the CPU time is the
    work itself, whatever else the shared machine is running."""
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu


def run_worker(args: argparse.Namespace) -> dict:
    """Build one contender, time it, and report; runs in its own process."""
    from helpers.contenders import build_hf, build_ours, build_plain

    name = args.worker
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_for(args, name)
    device = resolve_device(cfg.train.device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq_len + 1), generator=gen)
    prompts = torch.randint(0, cfg.model.vocab_size, (8, args.prompt_len), generator=gen)
    rss_before = rss_bytes()
    torch.manual_seed(0)
    builder = {"plain": build_plain, "hf": build_hf}.get(name)
    contender = builder(cfg) if builder else build_ours(cfg, name)
    params = sum(p.numel() for p in contender.model.parameters())
    result = {"name": name, "notes": contender.notes, "params": params,
              "train_flops_per_token": contender.train_flops_per_token,
              "layers": cfg.model.num_layers, "device": device.type,
              "threads": torch.get_num_threads()}
    ids = ids.to(device)
    decode_batches = [int(b) for b in args.decode_batches.split(",") if b]
    if decode_batches:
        contender.model.eval()
        contender.decode(prompts[:1].to(device), 2)  # warm-up
        result["decode_s"], result["decode_cpu_s"] = {}, {}
        for b in decode_batches:
            prompt = prompts[:b].to(device)
            runs = [timed(lambda p=prompt: contender.decode(p, args.new_tokens), device)
                    for _ in range(args.decode_repeats)]
            result["decode_s"][b] = min(wall for wall, _ in runs)
            result["decode_cpu_s"][b] = min(cpu for _, cpu in runs)
        contender.model.train()
    if not args.no_train:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        result["first_step_s"] = timed(lambda: contender.train_step(ids), device)[0]
        runs = [timed(lambda: contender.train_step(ids), device) for _ in range(args.steps)]
        result["step_s"] = [wall for wall, _ in runs]
        result["step_cpu_s"] = [cpu for _, cpu in runs]
        if device.type == "cuda":
            result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    result["rss_before_model"] = rss_before
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def spawn(args: argparse.Namespace, name: str, argv: list[str]) -> dict:
    print(f"[{name}] running ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, *argv, "--worker", name],
                          stdout=subprocess.PIPE, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"name": name, "error": f"worker exited with status {proc.returncode}"}
    print(f"[{name}] done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return json.loads(lines[-1][len("RESULT "):])


def summarise(args: argparse.Namespace, results: list[dict], peaks: dict[str, float]) -> None:
    tokens = args.batch * args.seq_len
    print(f"\ntraining: batch {args.batch} x {args.seq_len} tokens; decoding: "
          f"{args.new_tokens} new tokens after a {args.prompt_len}-token prompt, greedy")
    print("matmul peaks measured in this run: "
          + ", ".join(f"{k} {format_flops(v)}" for k, v in peaks.items()))
    for r in results:
        if "error" in r:
            print(f"{r['name']:<13} {r['error']}")
            continue
        if "step_s" in r:
            step = statistics.median(r["step_s"])
            r["train_tokens_per_s"] = tokens / step
            r["train_tokens_per_cpu_s"] = tokens / statistics.median(r["step_cpu_s"])
            flops = r["train_flops_per_token"] * r["train_tokens_per_s"]
            r["mfu"] = {k: flops / v for k, v in peaks.items()}
        r["decode_tokens_per_s"] = {int(b): int(b) * args.new_tokens / s
                                    for b, s in r.get("decode_s", {}).items()}
        r["decode_tokens_per_cpu_s"] = {int(b): int(b) * args.new_tokens / s
                                        for b, s in r.get("decode_cpu_s", {}).items()}
    header = f"{'contender':<13}{'params':>13}{'train tok/s':>13}{'tok/CPU-s':>11}"
    header += "".join(f"{'MFU ' + k:>10}" for k in peaks)
    header += "".join(f"{f'dec b{b} tok/s':>15}" for b in _decode_sizes(results))
    header += f"{'peak mem':>11}"
    print(header)
    for r in results:
        if "error" in r:
            continue
        row = f"{r['name']:<13}{r['params']:>13,}"
        row += (f"{r['train_tokens_per_s']:>13.1f}{r['train_tokens_per_cpu_s']:>11.1f}"
                if "train_tokens_per_s" in r else f"{'-':>13}{'-':>11}")
        row += "".join(f"{100 * r['mfu'][k]:>9.1f}%" if "mfu" in r else f"{'-':>10}"
                       for k in peaks)
        row += "".join(f"{r['decode_tokens_per_s'].get(b, float('nan')):>15.2f}"
                       for b in _decode_sizes(results))
        memory = r.get("peak_cuda_bytes", r["peak_rss"])
        row += f"{memory / 1e9:>9.2f} GB"
        print(row)
    for r in results:
        if "error" not in r:
            print(f"  {r['name']}: {r['notes']}; step times "
                  + ", ".join(f"{s:.2f}" for s in r.get("step_s", [])) + " s")
    _print_ratios(results)


def _decode_sizes(results: list[dict]) -> list[int]:
    return sorted({int(b) for r in results for b in r.get("decode_s", {})})


def _print_ratios(results: list[dict]) -> None:
    """ours ÷ each other contender, by wall clock and (in brackets) by CPU time."""
    by_name = {r["name"]: r for r in results if "error" not in r}
    ours = by_name.get("ours")
    if ours is None:
        return
    for other in ("plain", "hf"):
        theirs = by_name.get(other)
        if theirs is None:
            continue
        parts = []
        if "train_tokens_per_s" in ours and "train_tokens_per_s" in theirs:
            parts.append("training " + _ratio(ours, theirs, "train_tokens_per_s",
                                              "train_tokens_per_cpu_s"))
        for b in ours["decode_tokens_per_s"]:
            if b in theirs["decode_tokens_per_s"]:
                parts.append(f"decode b{b} " + _ratio(
                    ours, theirs, "decode_tokens_per_s", "decode_tokens_per_cpu_s", b))
        print(f"ours / {other}: " + ", ".join(parts))


def _ratio(ours: dict, theirs: dict, wall: str, cpu: str, key: int | None = None) -> str:
    def get(r: dict, name: str) -> float:
        return r[name] if key is None else r[name][key]

    return (f"{get(ours, wall) / get(theirs, wall):.2f}x "
            f"({get(ours, cpu) / get(theirs, cpu):.2f}x by CPU time)")


def main() -> None:
    args = parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_worker(args)), flush=True)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(config_for(args, "ours").train.device)
    peaks = {name: measure_matmul_peak(device, dtype, args.peak_seconds)
             for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    argv = [a for a in sys.argv[1:]]
    results = [spawn(args, name, argv) for name in args.contenders.split(",")]
    summarise(args, results, peaks)
    if args.json:
        args.json.write_text(json.dumps({"argv": sys.argv[1:], "peaks": peaks,
                                         "results": results}, indent=1))


if __name__ == "__main__":
    main()
