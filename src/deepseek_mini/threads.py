"""How many CPU threads torch computes with: the user's number, or one chosen by measurement.

torch starts one thread per physical core. Every OpenMP barrier waits for the slowest
thread, and on a machine whose other work keeps the cores busy that thread is often
descheduled. Measured on a 2-core CPU (BENCHMARKS.md, "Threads"): decoding, a chain of
small matrix-vector products, is faster on one thread even on a quiet machine;
evaluation and training steps are faster on every core of a quiet machine, and on a busy
one (load average above the core count) one thread wins, by far. So the default is
one thread for decoding, and for evaluation and training every physical core unless the
load average at start-up exceeds the cores, then one. ``OMP_NUM_THREADS`` in the
environment is the user's choice and is kept. Nothing here prints: commands print
``busy_note``'s line themselves.

A count above the machine's logical CPUs is refused: more threads than CPUs can only be
slower, and an absurd count (``--threads 99999``) crashes OpenMP itself (a segfault, or
libgomp's "Thread creation failed" and exit 1) before any error of ours could be printed.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from .errors import UserError

Work = Literal["decode", "eval", "train"]

# torch's start-up count, one per physical core (or OMP_NUM_THREADS), read at import,
# before anything here changes it.
STARTUP_THREADS = torch.get_num_threads()


class ThreadCountError(UserError, ValueError):
    """A thread count that is not a positive number at most the machine's CPUs: a
    UserError for the command line, a ValueError for Python callers."""


def max_threads() -> int:
    """The most threads a command may ask for: the machine's logical CPUs."""
    return os.cpu_count() or 1


def check_threads(requested: int, option: str = "--threads") -> int:
    """``requested`` when it is between 1 and ``max_threads()``; else ThreadCountError
    naming ``option``."""
    if requested < 1:
        raise ThreadCountError(f"{option} must be a positive number of threads, got "
                               f"{requested}")
    if requested > max_threads():
        raise ThreadCountError(f"{option} {requested} is more threads than this machine's "
                               f"{max_threads()} CPUs: use at most {max_threads()}")
    return requested


def default_threads(work: Work, cores: int, load: float) -> int:
    """The thread count measured fastest for ``work`` with ``cores`` physical cores at a
    1-minute load average of ``load``."""
    if work == "decode" or load > cores:
        return 1
    return cores


def user_chose_threads(requested: int | None) -> bool:
    """Whether the thread count is the user's (``requested``, or ``OMP_NUM_THREADS``),
    so that no note should tell them how to set it."""
    return requested is not None or os.environ.get("OMP_NUM_THREADS", "").strip().isdigit()


def choose_threads(requested: int | None, work: Work, option: str = "--threads") -> int:
    """``requested`` (checked, ``check_threads``), else ``OMP_NUM_THREADS`` when set,
    else ``default_threads``."""
    if requested is not None:
        return check_threads(requested, option)
    if user_chose_threads(None):
        return STARTUP_THREADS
    return default_threads(work, STARTUP_THREADS, load_average())


def set_threads(requested: int | None, work: Work, option: str = "--threads") -> int:
    """Set torch's intra-op thread count as ``choose_threads`` says; returns it."""
    threads = choose_threads(requested, work, option)
    torch.set_num_threads(threads)
    return threads


def load_average() -> float:
    """The 1-minute load average (0 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def busy_note(option: str, load: float | None = None, cores: int | None = None) -> str | None:
    """One line when the 1-minute load average exceeds the core count, saying how to set
    the threads (``option``: e.g. ``--threads N``); else None."""
    load = load_average() if load is None else load
    cores = cores or os.cpu_count() or 1
    if load <= cores:
        return None
    return (f"note: the load average ({load:.1f}) exceeds the {cores} CPU cores, so other "
            f"work competes for them; {torch.get_num_threads()} thread(s) in use, set "
            f"another count with {option}")
