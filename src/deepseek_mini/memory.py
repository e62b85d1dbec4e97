"""Whether a model or a training run can fit the machine, asked before allocating.

A config with absurd sizes (``model.hidden_size: 1e7``, ``max_position: 1e10``, a micro
batch of a million sequences) would otherwise fail deep in an allocation, with a
traceback, or spend minutes filling memory first. The callers estimate a lower bound of
what they need (model/sizes.py); it is compared with what the device has in all (RAM
and swap, within a cgroup limit; a GPU's memory), so only a run that cannot fit is
refused, never one that might.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from .errors import UserError

_CGROUP_LIMIT = Path("/sys/fs/cgroup/memory.max")


class OutOfMemoryError(UserError):
    """A model or run larger than the device's memory, refused before allocating."""


def check_fits(needs: dict[str, int], device: torch.device | str, what: str) -> None:
    """Raise OutOfMemoryError when the parts of ``needs`` (bytes, by what they are for)
    add up to more than ``device`` has; ``what`` names the job in the message."""
    device = torch.device(device)
    if device.type == "meta":
        return
    have = device_bytes(device)
    total = sum(needs.values())
    if have is None or total <= have:
        return
    largest = max(needs, key=lambda part: needs[part])
    whose = ("this machine's" if device.type == "cpu" else f"the {device.type} device's")
    raise OutOfMemoryError(f"{what} needs at least {_gb(total)} of memory, more than "
                           f"{whose} {_gb(have)}: {largest} alone take {_gb(needs[largest])}")


def device_bytes(device: torch.device) -> int | None:
    """All the memory ``device`` has (None where it cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        return machine_bytes()
    return None


@functools.cache
def machine_bytes() -> int | None:
    """RAM plus swap, capped by this process's cgroup memory limit where it has one."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    total += _swap_bytes()
    try:
        limit = _CGROUP_LIMIT.read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def _swap_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("SwapTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _gb(n: int) -> str:
    return f"{n / 1e9:,.1f} GB"
