"""allocator.keep_freed_memory: a training step's freed buffers are reused at the next
step instead of page-faulting fresh ones from the kernel (the system time a CPU step
lost, BENCHMARKS.md issue 21)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, resource, sys
import torch
from deepseek_mini import Config, DeepSeekMini
from deepseek_mini.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
cfg = Config.from_yaml("configs/tiny.yaml", ["model.num_layers=1"])
model = DeepSeekMini(cfg.model)
ids = torch.randint(0, cfg.model.vocab_size, (4, 65))
def step():
    model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
    model.zero_grad(set_to_none=True)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
print(json.dumps({"kept": kept, "faults": faults}))
"""


def probe(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                          check=True, cwd=ROOT)
    return json.loads(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux's")
def test_a_training_step_reuses_freed_buffers():
    default, kept = probe("default"), probe("keep")
    assert kept["kept"] is True
    # 4x fewer when quiet; memory compaction under load adds some faults to both
    assert kept["faults"] < 0.6 * default["faults"], (default, kept)
