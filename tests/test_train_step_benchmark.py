"""benchmarks/training/train_step.py --quick: every figure it promises, tiny config, seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_step_benchmark_quick_reports_rates_peak_share_and_moe_ratio(tmp_path):
    out = tmp_path / "step.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "benchmarks/training/train_step.py", "--quick",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["peak_gflops"]["fp32"]["gflops"] > 0
    assert set(result["contenders"]) == {"ours-dense-fp32", "ours-moe-fp32"}
    for row in result["contenders"].values():
        assert row["tokens_per_s"] > 0 and row["tokens_per_cpu_s"] > 0
        assert row["share_of_peak"] > 0 and row["model_gflops_per_cpu_s"] > 0
    assert result["ratios"]["ours-moe-fp32 / dense"] > 0
