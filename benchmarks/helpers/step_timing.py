"""Timing one training step and naming the CPU, shared by the step benchmarks, with the
options, config, batch and fixed precision every paired step benchmark starts from."""

from __future__ import annotations

import argparse
import platform
import re
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch

from deepseek_mini import Config
from deepseek_mini.allocator import keep_freed_memory
from deepseek_mini.train.precision import Precision

# ``--quick``: a config small enough that a step benchmark's run takes seconds (its tests)
QUICK = ["model.vocab_size=512", "model.hidden_size=32", "model.num_layers=2",
         "model.num_heads=2", "model.kv_latent_dim=16", "model.expert_hidden=32",
         "model.num_experts=4", "model.head_vocab=0", "model.expert_activation=swiglu"]


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


def add_step_size_args(p: argparse.ArgumentParser, config: str, batch: int | None = None,
                       seq_len: int | None = None) -> None:
    """The config and the sizes every paired step benchmark takes, spelled once; a batch or
    sequence length left at None means the config's."""
    p.add_argument("--config", default=config)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--batch", type=int, default=batch,
                   help=None if batch else "default: the config's")
    p.add_argument("--seq-len", type=int, default=seq_len,
                   help=None if seq_len else "default: the config's")


def step_config(args: argparse.Namespace, overrides: list[str]) -> Config:
    """``args.config`` with ``overrides`` and, on top, ``--layers`` if given (appended to
    ``overrides``, which the caller reports)."""
    if args.layers:
        overrides.append(f"model.num_layers={args.layers}")
    return Config.from_yaml(args.config, overrides=overrides)


def quick_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides of ``--set``; with ``--quick``, the tiny config under ``QUICK`` and a
    batch of 2 x 16 unless the options name others."""
    if not args.quick:
        return list(args.set)
    args.config = "configs/tiny.yaml"
    args.batch, args.seq_len = args.batch or 2, args.seq_len or 16
    return QUICK + list(args.set)


def sized_config(args: argparse.Namespace, overrides: list[str],
                 extra: tuple[str, ...] = ()) -> tuple[Config, list[str], int, int]:
    """(config, its overrides, batch, seq_len): the batch and sequence length of the
    options, else the config's, written into the config as overrides (the whole batch in
    one micro batch), then ``extra``."""
    overrides = list(overrides)
    cfg = step_config(args, overrides)
    batch, seq_len = args.batch or cfg.train.batch_size, args.seq_len or cfg.data.seq_len
    overrides += [f"data.seq_len={seq_len}", f"train.batch_size={batch}",
                  f"train.micro_batch_size={batch}", *extra]
    return Config.from_yaml(args.config, overrides=overrides), overrides, batch, seq_len


def step_run(args: argparse.Namespace,
             extra: tuple[str, ...] = ()) -> tuple[Config, list[str], int, int]:
    """What a paired step run with ``--quick`` starts from: the overrides of
    ``quick_overrides``, ``--threads`` torch threads, freed memory kept as the trainer
    keeps it, and ``sized_config``'s (config, overrides, batch, seq_len)."""
    overrides = quick_overrides(args)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the trainer does
    return sized_config(args, overrides, extra)


def random_ids(vocab_size: int, batch: int, seq_len: int) -> torch.Tensor:
    """One training batch of ``seq_len + 1`` tokens per row (inputs and shifted targets),
    the same in every run: a step's time does not depend on the tokens."""
    return torch.randint(0, vocab_size, (batch, seq_len + 1),
                         generator=torch.Generator().manual_seed(0))


def fixed_precision(dtype: str, device: torch.device | str = "cpu") -> Precision:
    """``dtype`` (fp32: none; bf16: autocast over fp32 weights) on ``device`` with the
    loss scaler off, for benchmarks that pair precisions on one model."""
    device = torch.device(device)
    return Precision(device, dtype, torch.amp.GradScaler(device.type, enabled=False))
