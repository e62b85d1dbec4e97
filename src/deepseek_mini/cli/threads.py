"""``--threads`` for the commands that compute on a CPU (train, generate, eval, serve):
the count set, and the busy-machine note printed on stderr."""

from __future__ import annotations

import sys

import torch

from ..threads import Work, busy_note, set_threads


def use_threads(threads: int | None, work: Work, device: torch.device) -> int:
    """Set ``--threads`` (None: the measured default for ``work``) and print the note a
    busy machine gets; returns the count."""
    count = set_threads(threads, work)
    note = busy_note("--threads N") if device.type == "cpu" else None
    if note:
        print(note, file=sys.stderr)
    return count
