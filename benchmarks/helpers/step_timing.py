"""Timing one training step and naming the CPU, shared by the step benchmarks."""

from __future__ import annotations

import argparse
import platform
import re
import resource
import time
from collections.abc import Callable
from pathlib import Path


def timed(step: Callable[..., object], *args: object) -> tuple[float, float, float, int]:
    """(wall seconds, process CPU seconds, of which system, minor page faults) of one
    ``step(*args)``: the system share is mostly the kernel handing fresh pages to the
    allocator."""
    wall, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    step(*args)
    after = resource.getrusage(resource.RUSAGE_SELF)
    system = after.ru_stime - before.ru_stime
    return (time.perf_counter() - wall, after.ru_utime - before.ru_utime + system, system,
            after.ru_minflt - before.ru_minflt)


def cpu_name() -> str:
    """The CPU's model name and whether it has native bf16 (AVX-512-BF16, AMX)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.*)", info)
    found = re.search(r"flags\s*:\s*(.*)", info)
    flags = set(found.group(1).split()) if found else set()
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    name = model.group(1) if model else platform.machine()
    return f"{name} ({', '.join(native) or 'no native bf16'})"


def add_step_size_args(p: argparse.ArgumentParser, config: str) -> None:
    """The config and the sizes every paired step benchmark takes, spelled once."""
    p.add_argument("--config", default=config)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="default: the config's")
    p.add_argument("--seq-len", type=int, default=None, help="default: the config's")
