"""Model FLOPs utilisation: the share of the hardware's matmul peak that training uses.

The peak is measured, not looked up: a square ``F.linear`` (the kernel the model's
layers call) in the run's compute dtype, timed for half a second at start-up, best run
kept; on a CPU without bf16 instructions ``torch.mm`` in bf16 takes a far slower
path than ``F.linear``, so the product the model actually runs is the one to time. On a
CPU that is the only honest figure (it depends on the core count, the vector units and
how busy the machine is: on a shared machine MFU is against what it gave at start-up);
on a GPU it is the achievable dense peak, somewhat under the datasheet's.
"""

from __future__ import annotations

import math
import time

import torch
from torch.nn import functional as F


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_matmul_peak(device: torch.device, dtype: torch.dtype,
                        seconds: float = 0.5) -> float:
    """FLOP/s of the fastest of ``n × n`` products run back to back for about ``seconds``:
    the best run, not the mean, so a neighbour's burst on a shared machine does not pass
    for the hardware's peak."""
    n = 4096 if device.type == "cuda" else 1024
    # Its own generator: drawing from the global one here, after a resume restored it,
    # would shift every later draw (dropout's masks) against the uninterrupted run.
    generator = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=generator).to(dtype)
    b = torch.randn(n, n, device=device, generator=generator).to(dtype)
    F.linear(a, b)  # warm-up: kernel selection, allocation
    _sync(device)
    best, deadline = math.inf, time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        F.linear(a, b)
        _sync(device)
        end = time.perf_counter()
        best = min(best, end - start)
        if end >= deadline:
            return 2 * n**3 / best


def format_flops(flops: float) -> str:
    for unit, scale in (("TFLOP/s", 1e12), ("GFLOP/s", 1e9)):
        if flops >= scale:
            return f"{flops / scale:.1f} {unit}"
    return f"{flops / 1e6:.1f} MFLOP/s"
