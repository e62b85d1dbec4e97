"""Labelled ranges for torch.profiler, shared by the step and decode profiles."""

from __future__ import annotations

from collections.abc import Callable

from torch.profiler import record_function


def labelled(fn: Callable, part: str) -> Callable:
    """``fn`` run inside a ``part: <part>`` range, so the profile sums its time."""
    def run(*args, **kwargs):
        with record_function(f"part: {part}"):
            return fn(*args, **kwargs)
    return run
