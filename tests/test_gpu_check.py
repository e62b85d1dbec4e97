"""scripts/gpu_check.sh, the GPU run's one command, run here at its CPU size (``--small``)
so the script cannot rot between the rare runs on a GPU: every stage runs, writes its
JSON, and the summary reads them all."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
FILES = {"tests.json", "throughput.json", "train.json", "decode.json", "summary.json",
         "summary.txt", "log.txt"}  # at most 8: what the GPU machine's $OUT sends back
STAGES = ("tests", "throughput", "train", "decode")


def run_script(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, timeout=timeout,
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gpu-check")
    done = run_script("--small", "--minutes", "3", "--out", str(root / "out"),
                      "--work", str(root / "work"))
    assert done.returncode == 0, done.stderr[-2000:]
    return root / "out"


def load(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


def test_every_stage_runs_and_writes_its_json(small_run):
    assert {p.name for p in small_run.iterdir()} == FILES
    summary = load(small_run, "summary.json")
    assert summary["small"] is True and summary["torch"]
    for stage in STAGES:
        assert summary["stages"][stage]["status"]["exit_code"] == 0, stage
        assert load(small_run, f"{stage}.json")["stage"] == stage


def test_the_device_tests_ran_and_passed(small_run):
    tests = load(small_run, "tests.json")
    assert tests["exit_code"] == 0 and tests["passed"] >= 1
    assert tests["failed"] == tests["errors"] == 0
    assert "-m device" in tests["command"]


def test_throughput_has_mfu_and_the_transformers_contender(small_run):
    report = load(small_run, "throughput.json")
    assert report["matmul_peak_tflops"] > 0
    for key in ("base/ours/eager/seed", "deepseek-v3-mini/ours/eager/seed",
                "deepseek-v3-mini/hf/eager/seed"):
        row = report[key]
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1, key
    planned = {f"{n}/{who}/{mode}/{b}" for n in ("base", "deepseek-v3-mini")
               for who, mode in (("ours", "eager"), ("ours", "compiled")) for b in ("seed", "fill")}
    planned |= {f"deepseek-v3-mini/hf/eager/{b}" for b in ("seed", "fill")}
    for key in planned:  # each measured, or its failure or lack of time recorded
        assert {"tokens_per_s", "error", "skipped"} & set(report[key]), key


def test_the_training_run_is_scored_on_held_out_text(small_run):
    report = load(small_run, "train.json")
    assert " train --config " in report["command"]
    if "held_out" in report:  # else the loaded machine left it no time: recorded
        assert math.isfinite(report["held_out"]["ce"])
        assert report["steps_done"] >= 1
    else:
        assert "train_exit_code" in report


def test_decoding_speeds_and_the_summary_text(small_run):
    report = load(small_run, "decode.json")
    assert report["greedy/batch1"]["tokens_per_s"] > 0
    spec = report["speculative/batch1"]
    assert spec.get("same_tokens", True) is True  # greedy speculative == greedy plain
    text = (small_run / "summary.txt").read_text()
    assert text.startswith("gpu_check on ") and "tests -m device:" in text
    assert "training throughput" in text


def test_help_lists_the_options_and_a_bad_option_is_one_line():
    done = run_script("--help", timeout=30)
    assert done.returncode == 0
    for option in ("--out", "--small", "--minutes", "--stage", "--data", "--work"):
        assert option in done.stdout
    done = run_script("--bogus", timeout=30)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--bogus" in done.stderr
    done = run_script("--small", timeout=30)
    assert done.returncode == 2 and "--out" in done.stderr
