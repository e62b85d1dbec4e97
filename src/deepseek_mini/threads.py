"""How many CPU threads torch computes with: the user's number, or one chosen by measurement.

torch starts one thread per physical core. Every OpenMP barrier waits for the slowest
thread, and on a machine whose other work keeps the cores busy that thread is often
descheduled. Measured (BENCHMARKS.md, "issue 17"): decoding, a chain of small
matrix-vector products, is faster on one thread even on a quiet machine; evaluation and
training steps gain from every core on a quiet machine and lose on a busy one, where
small models run faster on one thread. So the default is one thread for decoding, every
physical core for evaluation and training, and one thread for them too when the load
average at start-up exceeds the cores and the model is under ``BIG_MODEL_PARAMS``.
``OMP_NUM_THREADS`` in the environment is the user's choice and is kept. Nothing here
prints: commands print ``busy_note``'s line themselves.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

Work = Literal["decode", "eval", "train"]

# Active (per-token) parameters from which a step has work enough per barrier to keep
# every core on a busy machine (the reference model, ~135 M; the tiny one is 6.5 M).
BIG_MODEL_PARAMS = 50_000_000
# torch's start-up count, one per physical core (or OMP_NUM_THREADS), read at import,
# before anything here changes it.
STARTUP_THREADS = torch.get_num_threads()


def default_threads(work: Work, active_params: int, cores: int, load: float) -> int:
    """The thread count measured fastest for ``work`` on a model of ``active_params``
    with ``cores`` physical cores at a 1-minute load average of ``load``."""
    if work == "decode":
        return 1
    if load > cores and active_params < BIG_MODEL_PARAMS:
        return 1
    return cores


def choose_threads(requested: int | None, work: Work, active_params: int) -> int:
    """``requested``, else ``OMP_NUM_THREADS`` when set, else ``default_threads``."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads must be positive, got {requested}")
        return requested
    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        return STARTUP_THREADS
    return default_threads(work, active_params, STARTUP_THREADS, load_average())


def set_threads(requested: int | None, work: Work, active_params: int = 0) -> int:
    """Set torch's intra-op thread count as ``choose_threads`` says; returns it."""
    threads = choose_threads(requested, work, active_params)
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
