"""The bf16 step's memory-bound and head operations timed alone, to check the profile.

    python benchmarks/training/bf16_step_ops.py

``profile_step.py --precision bf16`` shows autocast's casts (``aten::copy_``) and the
tied embedding's zeroing (``aten::fill_``) at a third of the step, in a profiled process
that spends much of its CPU in the kernel. Here the same shapes (6-layer base sizes,
batch 8 x 128: vocabulary 49,152, hidden 576, 8 experts of 1536) run alone, one thread,
memory kept as the trainer keeps it, in rounds of every operation in turn (drift stays
out of the comparisons), each the median CPU time over the rounds after a warm-up: the
casts, the zeroing, and the LM head's three bf16 products, the gradients' in other
operand layouts and chunkings too, and the logits' product in fp32 for scale.

Fills BENCHMARKS.md, section "The bf16 training step".
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable

import torch

from deepseek_mini.allocator import keep_freed_memory

VOCAB, HIDDEN, EXPERTS, EXPERT_HIDDEN, ROWS = 49152, 576, 8, 1536, 1024


def cpu_ms(ops: dict[str, Callable[[], object]], rounds: int = 9) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in ops}
    for round_ in range(rounds + 1):  # the first is the warm-up
        for name, op in ops.items():
            start = time.process_time()
            op()
            if round_:
                times[name].append(time.process_time() - start)
    return {name: round(statistics.median(t) * 1e3, 1) for name, t in times.items()}


def main() -> None:
    torch.set_num_threads(1)
    keep_freed_memory()
    bf16 = torch.bfloat16
    head = torch.randn(VOCAB, HIDDEN)
    head16 = head.to(bf16)
    experts = torch.randn(EXPERTS, EXPERT_HIDDEN, HIDDEN).transpose(1, 2)
    grads = torch.randn(ROWS, VOCAB).to(bf16)
    hidden = torch.randn(ROWS, HIDDEN).to(bf16)
    hidden32 = hidden.float()
    ops = {
        "head fp32->bf16": lambda: head.to(bf16),
        "head bf16->fp32": lambda: head16.float(),
        "experts fp32->bf16 [8, 576, 1536] view": lambda: experts.to(bf16),
        "zeros [49152, 576] fp32": lambda: torch.zeros_like(head),
        "logits h @ W.T": lambda: hidden @ head16.T,
        "logits h @ W.T fp32": lambda: hidden32 @ head.T,
        "grad hidden g @ W": lambda: grads @ head16,
        "grad hidden (W.T @ g.T).T": lambda: (head16.T @ grads.T).T,
        "grad hidden per 256-row chunk": lambda: [g @ head16 for g in grads.split(256)],
        "grad weight g.T @ h (used)": lambda: grads.T @ hidden,
        "grad weight (h.T @ g).T": lambda: (hidden.T @ grads).T,
    }
    result: dict[str, object] = {"threads": 1, "load": round(os.getloadavg()[0], 2)}
    result.update({f"{name} ms": ms for name, ms in cpu_ms(ops).items()})
    flops = 2 * ROWS * VOCAB * HIDDEN
    for name in ops:
        if "@" not in name and "chunk" not in name:
            continue
        result[f"{name} GFLOP/s"] = round(flops / result[f"{name} ms"] / 1e6, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
