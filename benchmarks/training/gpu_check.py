"""The stages of scripts/gpu_check.sh, one subcommand each: on whatever device is here,
the device test subset, training throughput against transformers' DeepseekV3, a timed
real training run scored on held-out text, and decoding speed. Each writes one JSON file
into ``--out`` and rewrites it after every measurement, so a stage stopped at its time
limit keeps what it finished. ``summary`` folds them into summary.json and summary.txt.

    python benchmarks/training/gpu_check.py tests --out DIR --seconds 90
    python benchmarks/training/gpu_check.py throughput --out DIR --seconds 180 [--small]
    python benchmarks/training/gpu_check.py train --out DIR --work W --seconds 150 --data D
    python benchmarks/training/gpu_check.py decode --out DIR --work W --seconds 60
    python benchmarks/training/gpu_check.py summary --out DIR

Run it through scripts/gpu_check.sh, which sets the budgets, isolates the stages and
stages the data; ``--small`` is the CPU-sized version CI runs.

Fills BENCHMARKS.md, section "GPU".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import _paths  # noqa: F401, E402 (puts benchmarks/ on sys.path)
import torch  # noqa: E402

from deepseek_mini import Config  # noqa: E402
from deepseek_mini.train.mfu import measure_matmul_peak  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {"base": ROOT / "configs" / "base.yaml",
           "deepseek-v3-mini": ROOT / "configs" / "deepseek-v3-mini.yaml"}
STAGES = ("tests", "throughput", "train", "decode")
SEED_BATCH, SEQ_LEN = 8, 128  # the seed's batch; --small: 4 x 64 (set in main)
# --small: the same two layouts at a CPU's size (seconds, not minutes, per stage)
SMALL = ["model.vocab_size=512", "model.hidden_size=64", "model.num_layers=2",
         "model.num_heads=4", "model.expert_hidden=128", "model.max_position=256"]
SMALL_V3 = ["model.kv_latent_dim=32", "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8",
            "model.v_head_dim=16"]
TAKES_DEVICE = re.compile(r"^def \w+\([^)]*\bdevice\b", re.M)  # a test or fixture
SMALL_TESTS = "grouped_matmul and fp32 or one_token_decoding"  # a few seconds' worth
SMALL_PLAN = {"base/ours/eager/seed", "deepseek-v3-mini/ours/eager/seed",
              "deepseek-v3-mini/hf/eager/seed", "base/ours/eager/fill",
              "deepseek-v3-mini/ours/compiled/seed"}
TRAIN_CONFIG = "deepseek-v3-mini"  # with one MTP module, so decode can speculate


# ----------------------------------------------------------------------------- shared


class Report:
    """One stage's JSON file, written again after every change."""

    def __init__(self, out: Path, stage: str) -> None:
        self.path = out / f"{stage}.json"
        self.data: dict = {"stage": stage, "device": device_name(), "complete": False}
        self.save()

    def __setitem__(self, key: str, value) -> None:
        self.data[key] = value
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1, default=str) + "\n")


class Budget:
    """Seconds left of a stage's share; each measurement asks before it starts."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def train_dtype(dev: torch.device) -> str:
    """bf16 where the GPU has it (what ``train.precision=auto`` picks there), else fp32."""
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def matmul_peak(dev: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of the best of five bursts of ten 8192^3 products (CUDA; timed between
    syncs, so launch gaps do not count), or the trainer's own CPU measurement."""
    if dev.type != "cuda":
        return measure_matmul_peak(dev, dtype, seconds=0.5)
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=dtype)  # random data: zeros run faster
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    best = math.inf
    for _ in range(5):
        sync(dev)
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        sync(dev)
        best = min(best, (time.perf_counter() - start) / 10)
    return 2 * n**3 / best


def config(name: str, small: bool, *extra: str) -> Config:
    overrides = [f"train.device={device().type}", f"train.precision={train_dtype(device())}",
                 f"train.batch_size={SEED_BATCH}", f"train.micro_batch_size={SEED_BATCH}",
                 f"data.seq_len={SEQ_LEN}"]
    if small:
        overrides += SMALL + (SMALL_V3 if name != "base" else [])
    return Config.from_yaml(CONFIGS[name], overrides=[*overrides, *extra])


def attempt(report: Report, key: str, budget: Budget, need: float,
            measure: Callable[[], dict]) -> None:
    """Run one measurement into ``report[key]``: skipped when fewer than ``need`` seconds
    are left, its error recorded (and the stage going on) when it fails."""
    if budget.left() < need:
        report[key] = {"skipped": f"out of time ({budget.left():.0f} s left, {need:.0f} "
                                  "needed)"}
        return
    start = time.monotonic()
    try:
        result = measure()
    except Exception as exc:  # noqa: BLE001  (recorded; the other measurements go on)
        result = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
    if device().type == "cuda":
        torch.cuda.empty_cache()  # after an out-of-memory error, before the next one
    result["wall_s"] = round(time.monotonic() - start, 1)
    report[key] = result
    print(f"{key}: {json.dumps(result, default=str)}", flush=True)


# ----------------------------------------------------------------------------- tests


def stage_tests(args: argparse.Namespace) -> None:
    """``pytest -m device`` over the files that hold such tests (collecting only those
    keeps optional packages the GPU machine lacks, gguf or fastapi, out of the way)."""
    report = Report(args.out, "tests")
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if TAKES_DEVICE.search(p.read_text(encoding="utf-8")))
    junit = args.work / "tests.xml"
    command = [sys.executable, "-m", "pytest", "-m", "device", "-v", "-p", "no:cacheprovider",
               f"--junitxml={junit}", *files]
    if args.small:  # a few tests of one file: the mechanism, not the subset (CI runs that)
        command = [*command[:-len(files)], "tests/test_fast_paths.py", "-k", SMALL_TESTS]
    report["command"] = " ".join(command[1:])
    start, log = time.monotonic(), args.work / "tests.log"
    with open(log, "w") as sink:
        try:
            report["exit_code"] = subprocess.run(command, cwd=ROOT, timeout=max(args.seconds, 1),
                                                 stdout=sink, stderr=subprocess.STDOUT
                                                 ).returncode
        except subprocess.TimeoutExpired:
            report["exit_code"] = "timeout"
    lines = log.read_text(errors="replace").splitlines()
    report["pytest_tail"] = lines[-3:]
    report["wall_s"] = round(time.monotonic() - start, 1)
    # junit is written at the end; a run stopped at its limit leaves pytest's -v lines
    report.data.update(junit_counts(junit) if junit.is_file() else verbose_counts(lines))
    report["complete"] = True


VERBOSE = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|XFAIL|XPASS|ERROR)")


def verbose_counts(lines: list[str]) -> dict:
    """Counts from ``pytest -v`` lines, for a run that never wrote its junit file."""
    outcome = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors",
               "SKIPPED": "skipped", "XFAIL": "xfailed"}
    counts = dict.fromkeys(("passed", "failed", "skipped", "xfailed", "errors"), 0)
    failures = []
    for line in lines:
        match = VERBOSE.match(line)
        if match:
            counts[outcome[match[2]]] += 1
            if match[2] in ("FAILED", "ERROR"):
                failures.append({"test": match[1], "message": "(see log.txt)"})
    return {**counts, "failures": failures, "skips": [], "from": "pytest -v lines (no junit)"}


def junit_counts(path: Path) -> dict:
    """Counts per outcome and each failure's test id and first message line."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "xfailed": 0, "errors": 0}
    failures, skips = [], []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "errors"
                failures.append({"test": name, "message": (child.get("message") or "")[:300]})
            elif child.tag == "skipped":
                xfail = (child.get("type") or "").endswith("xfail")
                outcome = "xfailed" if xfail else "skipped"
                skips.append({"test": name, "reason": (child.get("message") or "")[:200]})
        counts[outcome] += 1
    return {**counts, "failures": failures, "skips": skips}


# ----------------------------------------------------------------------------- throughput


def time_steps(step: Callable[[], object], dev: torch.device, seconds: float,
               warm_up: int = 3) -> float:
    """Seconds per step: ``warm_up`` steps (compilation, the optimizer's state), then
    steps for about ``seconds`` (at least two)."""
    for _ in range(warm_up):
        step()
    sync(dev)
    times = []
    while len(times) < 2 or sum(times) < seconds:
        start = time.perf_counter()
        step()
        sync(dev)
        times.append(time.perf_counter() - start)
        if len(times) >= 200:
            break
    times.sort()
    return times[len(times) // 2]  # the median


def throughput_of(cfg: Config, batch: int, contender: str, compiled: bool, small: bool,
                  peak: float, seconds: float) -> dict:
    from helpers.contenders import build_hf, build_ours

    dev = device()
    cfg.train.batch_size = cfg.train.micro_batch_size = batch
    cfg.train.compile = compiled
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    torch.manual_seed(0)
    options = {"backend": "eager"} if small and dev.type == "cpu" else {}
    who = build_ours(cfg, compile_options=options) if contender == "ours" else build_hf(cfg)
    ids = torch.randint(0, cfg.model.vocab_size, (batch, cfg.data.seq_len + 1), device=dev)
    try:
        step = who.train_step
        step_s = time_steps(lambda: step(ids), dev, seconds, 1 if small else 3)
        tokens_per_s = batch * cfg.data.seq_len / step_s
        result = {"batch": f"{batch}x{cfg.data.seq_len}", "step_ms": round(step_s * 1e3, 2),
                  "tokens_per_s": round(tokens_per_s), "flops_per_token": who.train_flops_per_token,
                  "mfu": round(who.train_flops_per_token * tokens_per_s / peak, 4),
                  "notes": who.notes}
        if dev.type == "cuda":
            result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(dev) / 1e9, 2)
        return result
    finally:
        who = step = None  # the model and optimizer go before the next measurement
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def fill_batch(cfg: Config, small: bool, cap: int) -> dict:
    """The batch that fills the device: peak memory of one step at 8 and 16 rows gives the
    fixed part and the part per row; the largest power of two under 60% of the GPU's
    memory, at most ``cap`` rows. The CPU has no such limit that matters here: ``cap``."""
    from helpers.contenders import build_ours

    dev = device()
    if dev.type != "cuda":
        return {"batch": cap, "how": "the cap (CPU)"}
    peaks = {}
    for rows in (SEED_BATCH, 2 * SEED_BATCH):
        cfg.train.batch_size = cfg.train.micro_batch_size = rows
        cfg.train.compile = False
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        who = build_ours(cfg)
        ids = torch.randint(0, cfg.model.vocab_size, (rows, cfg.data.seq_len + 1), device=dev)
        for _ in range(2):
            who.train_step(ids)
        sync(dev)
        peaks[rows] = torch.cuda.max_memory_allocated(dev)
        del who
    per_row = max((peaks[2 * SEED_BATCH] - peaks[SEED_BATCH]) / SEED_BATCH, 1.0)
    fixed = peaks[SEED_BATCH] - SEED_BATCH * per_row
    total = torch.cuda.get_device_properties(dev).total_memory
    rows = max(SEED_BATCH, int((0.6 * total - fixed) / per_row))
    batch = min(cap, 2 ** int(math.log2(rows)))
    return {"batch": batch, "how": "largest power of two under 60% of the memory, capped",
            "fixed_gb": round(fixed / 1e9, 2), "per_row_mb": round(per_row / 1e6, 1),
            "rows_at_60pct": rows, "cap": cap}


def stage_throughput(args: argparse.Namespace) -> None:
    budget = Budget(args.seconds)
    report = Report(args.out, "throughput")
    dev = device()
    precision = train_dtype(dev)
    peak = matmul_peak(dev, {"bf16": torch.bfloat16, "fp16": torch.float16,
                             "fp32": torch.float32}[precision])
    report["precision"] = precision
    report["matmul_peak_tflops"] = round(peak / 1e12, 2)
    report["batch_seconds"] = args.step_seconds
    fills = {}
    for name in CONFIGS:
        key = f"{name}/fill"
        attempt(report, key, budget, 10,
                lambda n=name: fill_batch(config(n, args.small), args.small, args.fill_cap))
        fills[name] = report.data[key].get("batch")
    # Most important first: eager at the seed's batch with the transformers contender,
    # then the filling batch, then compiled (which spends most of its time compiling).
    plan = []
    for batch_kind in ("seed", "fill"):
        for name in CONFIGS:
            plan.append((name, batch_kind, "ours", False))
            if name == "deepseek-v3-mini":  # DeepseekV3 is exactly this layout
                plan.append((name, batch_kind, "hf", False))
    for batch_kind in ("seed", "fill"):
        for name in CONFIGS:
            plan.append((name, batch_kind, "ours", True))
    for name, batch_kind, contender, compiled in plan:
        batch = SEED_BATCH if batch_kind == "seed" else fills[name]
        key = f"{name}/{contender}/{'compiled' if compiled else 'eager'}/{batch_kind}"
        if args.small and key not in SMALL_PLAN:
            report[key] = {"skipped": "--small measures each path once"}
            continue
        if batch is None:
            report[key] = {"skipped": "no filling batch (see its /fill entry)"}
            continue
        need = (60 if compiled and not args.small else 8) + args.step_seconds
        attempt(report, key, budget, need, lambda n=name, b=batch, c=contender, k=compiled:
                throughput_of(config(n, args.small), b, c, k, args.small, peak,
                              args.step_seconds))
    report["complete"] = True


# ----------------------------------------------------------------------------- train


def stage_train(args: argparse.Namespace) -> None:
    """The project's ``train`` on the staged text for ``--seconds`` (minus the scoring),
    stopped by SIGTERM (the trainer finishes the step and saves) if the step count taken
    from the throughput stage's measurement runs long; then ``eval`` on held-out text."""
    budget = Budget(args.seconds)
    report = Report(args.out, "train")
    run_dir, held_out = args.work / "run", args.work / "heldout.txt"
    sets = [f"train.out_dir={run_dir}", f"data.cache_dir={args.work / 'cache'}",
            f"train.device={device().type}", f"train.precision={train_dtype(device())}",
            "model.mtp_depth=1", "train.sample_interval=1000000", "data.num_workers=1"]
    if args.small:
        sets += [*SMALL, *SMALL_V3, "model.vocab_size=49152", "data.source=demo",
                 "data.demo_stories=300", f"data.seq_len={SEQ_LEN}", "train.eval_batches=2",
                 f"train.batch_size={SEED_BATCH}", f"train.micro_batch_size={SEED_BATCH}"]
        from deepseek_mini.data.demo_corpus import demo_stories

        held_out.write_text("\n<|endoftext|>\n".join(demo_stories(40, 99)) + "\n")
    else:
        data = Path(args.data).resolve() if args.data else None
        if data is None or not (data / "train.txt").is_file():
            report["skipped"] = (f"no training text at {data}: build the stage here "
                                 "(scripts/gpu_check.sh --stage) and carry .gpu-stage")
            report["complete"] = True
            return
        held_out = data / "heldout.txt"
        sets += ["data.source=files", f"data.files=[{data / 'train.txt'}]",
                 f"data.tokenizer={data.parent / 'tokenizer' / 'tokenizer.json'}"]
    run_seconds = max(budget.left() - args.score_seconds, 5)
    steps = planned_steps(args, run_seconds)
    # Two validations (one in --small); latest.pt (weights and AdamW state, 9 GB for the
    # 769M-parameter v3 layout) only at the end or the SIGTERM, best.pt (3 GB) when the
    # validation improves: saves cost seconds each out of a two-minute run.
    every = steps if args.small else max(steps // 2, 1)
    sets += [f"train.max_steps={steps}", f"train.log_interval={max(steps // 50, 1)}",
             f"train.eval_interval={every}", "train.save_interval=1000000000"]
    command = [sys.executable, "-m", "deepseek_mini", "train", "--config",
               str(CONFIGS[TRAIN_CONFIG])] + [a for s in sets for a in ("--set", s)]
    report.data.update(config=TRAIN_CONFIG, overrides=sets, planned_steps=steps,
                       run_seconds_budget=round(run_seconds))
    report["command"] = " ".join(command[1:])
    start = time.monotonic()
    code = run_until(command, run_seconds)
    report["train_exit_code"] = code  # 130: stopped by the time limit, saved
    report["train_wall_s"] = round(time.monotonic() - start, 1)
    rows = read_metrics(run_dir / "metrics.jsonl")
    trained = [r for r in rows if "loss" in r]
    if trained:
        last = trained[-1]
        tail = trained[len(trained) // 2:]
        report["steps_done"] = last["step"]
        report["last_train_loss"] = last["loss"]
        report["tokens_per_s_median_second_half"] = sorted(
            r.get("tokens_per_s", 0) for r in tail)[len(tail) // 2]
    vals = [r for r in rows if "val_loss" in r or "val_ce" in r]
    report["validation"] = [{k: v for k, v in r.items() if k.startswith(("step", "val"))}
                            for r in vals]
    ckpt = next((p for p in (run_dir / "best.pt", run_dir / "latest.pt") if p.is_file()), None)
    if ckpt is None:
        report["error"] = "the run saved no checkpoint"
        return
    report["checkpoint"] = str(ckpt)
    score = [sys.executable, "-m", "deepseek_mini", "eval", "--checkpoint", str(ckpt),
             "--data", str(held_out), "--json", "--batch-size", "32"]
    done = subprocess.run(score, cwd=ROOT, env=package_env(), capture_output=True, text=True,
                          timeout=max(budget.left(), 30))
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    report["held_out"] = json.loads(lines[-1]) if lines else {
        "error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    report["held_out_file"] = str(held_out)
    report["complete"] = True


def planned_steps(args: argparse.Namespace, seconds: float) -> int:
    """Steps that fit ``seconds`` at the eager seed-batch speed the throughput stage
    measured for this config (less a fifth for evaluation, saving and start-up); without
    that measurement, as many as SIGTERM allows."""
    if args.small:
        return 6
    try:
        measured = json.loads((args.out / "throughput.json").read_text())
        tokens_per_s = measured[f"{TRAIN_CONFIG}/ours/eager/seed"]["tokens_per_s"]
    except (OSError, KeyError, ValueError, TypeError):
        return 1_000_000
    return max(int(0.8 * seconds * tokens_per_s / (SEED_BATCH * SEQ_LEN)), 20)


def package_env() -> dict[str, str]:
    """The environment with src/ on the path, for ``python -m deepseek_mini``."""
    return {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}"
            f"{os.environ.get('PYTHONPATH', '')}"}


def run_until(command: list[str], seconds: float) -> int:
    """Run ``command``; after ``seconds`` send SIGTERM (the trainer saves and exits 130),
    and SIGKILL 60 s later."""
    with subprocess.Popen(command, cwd=ROOT, env=package_env()) as proc:
        try:
            return proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                return proc.wait()


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


# ----------------------------------------------------------------------------- decode


def stage_decode(args: argparse.Namespace) -> None:
    """Greedy ``generate`` tokens/s at batch 1, 8 and 64 (16-bit weights on a GPU), and
    speculative (the MTP module drafting) against plain at batch 1, on the train stage's
    checkpoint when there is one (its drafter is trained), else a fresh model."""
    from deepseek_mini import DeepSeekMini
    from deepseek_mini.inference.loading import load_for_inference

    budget = Budget(args.seconds)
    report = Report(args.out, "decode")
    dev = device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    ckpt = next((p for p in (args.work / "run" / "best.pt", args.work / "run" / "latest.pt")
                 if p.is_file()), None)
    prompt_text = None
    if ckpt is not None:
        model, tok, _ = load_for_inference(ckpt, dev, dtype)
        report["model"] = f"trained checkpoint {ckpt.name}"
        prompt_text = tok.encode("Once upon a time, there was a little girl named Lily. "
                                 "One day, she")
    else:
        cfg = config(TRAIN_CONFIG, args.small, "model.mtp_depth=1")
        torch.manual_seed(0)
        model = DeepSeekMini(cfg.model).to(dev, dtype).eval()
        report["model"] = f"fresh {TRAIN_CONFIG} (no checkpoint from the train stage)"
    report["dtype"] = str(dtype).removeprefix("torch.")
    new_tokens = args.new_tokens
    for batch in (1, 8, 64):
        attempt(report, f"greedy/batch{batch}", budget, 5,
                lambda b=batch: decode_speed(model, b, new_tokens, dev, args.repeats))
    prompt = (torch.tensor([prompt_text], device=dev) if prompt_text is not None
              else torch.randint(0, model.config.vocab_size, (1, 16), device=dev))
    attempt(report, "speculative/batch1", budget, 5,
            lambda: speculative_speed(model, prompt, new_tokens, dev, args.repeats))
    report["complete"] = True


def decode_speed(model, batch: int, new_tokens: int, dev: torch.device,
                 repeats: int) -> dict:
    from deepseek_mini.inference.generate import generate

    prompt = torch.randint(0, model.config.vocab_size, (batch, 16), device=dev)
    generate(model, prompt, max_new_tokens=4)  # warm-up
    seconds = []
    for _ in range(repeats):
        sync(dev)
        start = time.perf_counter()
        out = generate(model, prompt, max_new_tokens=new_tokens)
        sync(dev)
        seconds.append(time.perf_counter() - start)
    made = out.shape[1] - prompt.shape[1]
    best = min(seconds)
    return {"batch": batch, "new_tokens": made, "tokens_per_s": round(batch * made / best, 1),
            "ms_per_step": round(best / made * 1e3, 2)}


def speculative_speed(model, prompt: torch.Tensor, new_tokens: int, dev: torch.device,
                      repeats: int) -> dict:
    from deepseek_mini.inference.generate import generate
    from deepseek_mini.inference.speculative import SpeculativeStats

    runs = {}
    for speculative in (False, True):
        generate(model, prompt, max_new_tokens=4, speculative=speculative)
        best, stats = math.inf, SpeculativeStats()
        for _ in range(repeats):
            stats = SpeculativeStats()
            sync(dev)
            start = time.perf_counter()
            out = generate(model, prompt, max_new_tokens=new_tokens, speculative=speculative,
                           stats=stats if speculative else None)
            sync(dev)
            best = min(best, time.perf_counter() - start)
        runs[speculative] = (out, best, stats)
    (plain, plain_s, _), (spec, spec_s, stats) = runs[False], runs[True]
    made = plain.shape[1] - prompt.shape[1]
    return {"new_tokens": made, "plain_tokens_per_s": round(made / plain_s, 1),
            "speculative_tokens_per_s": round(made / spec_s, 1),
            "speedup": round(plain_s / spec_s, 3),
            "same_tokens": bool(torch.equal(plain, spec)),
            "accepted_per_round": round(stats.accepted_per_round, 3),
            "rounds": stats.rounds}


# ----------------------------------------------------------------------------- summary


def stage_summary(args: argparse.Namespace) -> None:
    """summary.json (every stage's file, its exit status and time) and summary.txt (the
    lines a person reads first)."""
    status = {}
    status_file = args.work / "status.jsonl"
    if status_file.is_file():
        for line in status_file.read_text().splitlines():
            row = json.loads(line)
            status[row["stage"]] = row
    stages = {}
    for stage in STAGES:
        path = args.out / f"{stage}.json"
        data = json.loads(path.read_text()) if path.is_file() else {}
        data["status"] = status.get(stage, {"exit_code": None, "note": "not run"})
        stages[stage] = data
    summary = {"device": device_name(), "torch": torch.__version__,
               "cuda": torch.version.cuda, "python": platform.python_version(),
               "small": args.small, "stages": stages}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    text = "\n".join(summary_lines(summary)) + "\n"
    (args.out / "summary.txt").write_text(text)
    print(text, end="")


def summary_lines(summary: dict) -> list[str]:
    s = summary["stages"]
    lines = [f"gpu_check on {summary['device']}, torch {summary['torch']} "
             f"(CUDA {summary['cuda']}){', --small' if summary['small'] else ''}"]
    for stage in STAGES:
        st = s[stage]["status"]
        lines.append(f"  stage {stage}: exit {st.get('exit_code')}, {st.get('seconds', '?')} s"
                     + ("" if s[stage].get("complete") else " (incomplete)"))
    t = s["tests"]
    if "passed" in t:
        lines.append(f"tests -m device: {t['passed']} passed, {t['failed']} failed, "
                     f"{t['errors']} errors, {t['skipped']} skipped, {t['xfailed']} xfailed")
        lines += [f"  FAILED {f['test']}: {f['message'][:120]}" for f in t["failures"][:10]]
    th = s["throughput"]
    if "matmul_peak_tflops" in th:
        lines.append(f"training throughput ({th['precision']}, matmul peak "
                     f"{th['matmul_peak_tflops']} TFLOP/s measured here):")
    for key, value in th.items():
        if key.count("/") == 3 and isinstance(value, dict):
            if "tokens_per_s" in value:
                lines.append(f"  {key:42s} {value['batch']:>9s} {value['tokens_per_s']:>10,} "
                             f"tok/s  MFU {value['mfu']:.1%}")
            else:
                lines.append(f"  {key:42s} {value.get('error') or value.get('skipped')}")
    tr = s["train"]
    if "held_out" in tr:
        ce = tr["held_out"].get("ce", tr["held_out"].get("loss", tr["held_out"]))
        lines.append(f"train {tr.get('config')}: {tr.get('steps_done')} steps in "
                     f"{tr.get('train_wall_s')} s, held-out CE {ce}")
    elif tr.get("skipped") or tr.get("error"):
        lines.append(f"train: {tr.get('skipped') or tr.get('error')}")
    de = s["decode"]
    for key, value in de.items():
        if key.startswith(("greedy/", "speculative/")) and isinstance(value, dict):
            if "tokens_per_s" in value:
                lines.append(f"  decode {key}: {value['tokens_per_s']} tok/s")
            elif "speedup" in value:
                lines.append(f"  decode {key}: {value['speculative_tokens_per_s']} against "
                             f"{value['plain_tokens_per_s']} tok/s plain (x{value['speedup']}, "
                             f"{value['accepted_per_round']} accepted a round, same tokens: "
                             f"{value['same_tokens']})")
            else:
                lines.append(f"  decode {key}: {value.get('error') or value.get('skipped')}")
    return lines


# ----------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=[*STAGES, "summary"])
    p.add_argument("--out", type=Path, required=True, help="folder of the JSON reports")
    p.add_argument("--work", type=Path, default=None,
                   help="scratch folder (run, caches, junit); default: --out")
    p.add_argument("--seconds", type=float, default=120.0, help="this stage's time budget")
    p.add_argument("--small", action="store_true", help="CPU-sized models (CI)")
    p.add_argument("--data", default=None, help="folder with train.txt and heldout.txt")
    p.add_argument("--step-seconds", type=float, default=2.0,
                   help="timed seconds per throughput measurement")
    p.add_argument("--fill-cap", type=int, default=512, help="largest batch tried as 'fill'")
    p.add_argument("--score-seconds", type=float, default=40.0,
                   help="train: seconds kept for start-up and the held-out scoring")
    p.add_argument("--new-tokens", type=int, default=64, help="decode: tokens per generation")
    p.add_argument("--repeats", type=int, default=3, help="decode: timed runs (the best)")
    args = p.parse_args()
    args.work = args.work or args.out
    if args.small:
        global SEED_BATCH, SEQ_LEN
        SEED_BATCH, SEQ_LEN = 4, 64
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    {"tests": stage_tests, "throughput": stage_throughput, "train": stage_train,
     "decode": stage_decode, "summary": stage_summary}[args.stage](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

