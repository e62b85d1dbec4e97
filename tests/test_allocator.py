"""allocator.keep_freed_memory: a training step's freed buffers are reused at the next
step instead of page-faulting fresh ones from the kernel (the system time a CPU step
lost, BENCHMARKS.md "Keeping freed memory")."""

from __future__ import annotations

import json
import sys

import pytest
from child_process import run_ok

PROBE = """
import json, resource, statistics, sys
import torch
from deepseek_mini import Config, DeepSeekMini
from deepseek_mini.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
# one freed 64 MiB buffer, then others of the same size, written in full; the fewest
# faults of three, since torch's aligned allocation asks malloc for a little more than an
# exactly-sized freed chunk holds, and reuses it only when it merged into the heap's top
torch.empty(1 << 24).fill_(1.0)
buffer_faults = []
for _ in range(3):
    before = faults()
    torch.empty(1 << 24).fill_(1.0)
    buffer_faults.append(faults() - before)
buffer_faults = min(buffer_faults)
cfg = Config.from_yaml("configs/tiny.yaml", ["model.num_layers=1"])
model = DeepSeekMini(cfg.model)
ids = torch.randint(0, cfg.model.vocab_size, (4, 65))
def step():
    model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
    model.zero_grad(set_to_none=True)
for _ in range(3):
    step()
per_step = []
for _ in range(5):
    before = faults()
    step()
    per_step.append(faults() - before)
print(json.dumps({"kept": kept, "buffer": buffer_faults, "step": statistics.median(per_step)}))
"""


def probe(mode: str) -> dict:
    done = run_ok("-c", PROBE, mode)
    return json.loads(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux's")
def test_a_training_step_reuses_freed_buffers():
    default, kept = probe("default"), probe("keep")
    assert kept["kept"] is True
    # glibc's default maps a 64 MiB buffer afresh and faults in every page of it; kept,
    # the freed one is reused (4 KiB pages: 16,384 faults against a handful)
    assert default["buffer"] > 0 and kept["buffer"] < 0.1 * default["buffer"], (default, kept)
    # a whole step: 4x fewer when quiet; the median step, since memory compaction under
    # load adds bursts of faults to both
    assert kept["step"] < 0.6 * default["step"], (default, kept)
