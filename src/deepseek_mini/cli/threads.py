"""``--threads`` for the commands that compute on a CPU (train, generate, eval, serve):
the count set, and the busy-machine note, which a command prints on stderr once its
arguments and files have been checked (a user error stays one line)."""

from __future__ import annotations

import sys

import torch

from ..allocator import keep_freed_memory
from ..threads import Work, busy_note, set_threads, user_chose_threads


def use_threads(threads: int | None, work: Work, device: torch.device) -> str | None:
    """Set ``--threads`` (None: the measured default for ``work``); returns the note a
    busy machine gets when the count is not the user's, for ``print_note`` when the work
    starts. On a CPU, freed buffers stay in the process too (allocator.py)."""
    set_threads(threads, work)
    if device.type == "cpu":
        keep_freed_memory()
    if device.type != "cpu" or user_chose_threads(threads):
        return None
    return busy_note("--threads N")


def print_note(note: str | None) -> None:
    if note:
        print(note, file=sys.stderr)
