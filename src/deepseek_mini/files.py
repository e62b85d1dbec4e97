"""Files a run writes, and the one way they are written: atomically.

A temporary file is written beside the target, fsynced, then renamed over it (and the
folder fsynced), so a crash at any moment leaves either the old file or the new one,
whole. Checkpoints, configs, tokenizers, token-cache metadata, metrics and plots all go
through ``atomic_write``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

# The files of a run folder (``train.out_dir``).
LATEST = "latest.pt"
BEST = "best.pt"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"
CONFIG_FILE = "config.yaml"


def atomic_write(path: str | Path, write: Callable[[IO], Any], binary: bool = True) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, then make it ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w",
                       **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(text: str, path: str | Path) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` atomically (torch is imported only by callers that save tensors)."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
