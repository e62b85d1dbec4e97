"""Files a run writes, and the one way they are written: atomically.

A temporary file is written beside the target, fsynced, then renamed over it (and the
folder fsynced), so a crash at any moment leaves either the old file or the new one,
whole. Checkpoints, configs, tokenizers, token-cache metadata, metrics and plots all go
through ``atomic_write``. The new file keeps the mode of the one it replaces (or the
umask's), and a full disk is a ``DiskFullError`` naming the file, with the old file kept.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .errors import UserError

# The files of a run folder (``train.out_dir``).
LATEST = "latest.pt"
BEST = "best.pt"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"
CONFIG_FILE = "config.yaml"
DIVERGED = "diverged.pt"  # a diverged run's last state, written beside the good latest.pt
RUN_FILES = (LATEST, BEST, METRICS_FILE, LOG_FILE, CONFIG_FILE, DIVERGED)
LOCK_FILE = ".lock"
EXIT_DISK_FULL = 28  # the command's exit status on a full disk (ENOSPC's number)
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


class DiskFullError(UserError):
    """No room left for a file: the user's disk, not our bug, and worth its own exit code."""

    exit_code = EXIT_DISK_FULL


def temporary_name_prefix(name: str) -> str:
    """The prefix of ``atomic_write``'s temporary files for a target called ``name``."""
    return f".{name}."


def atomic_write(path: str | Path, write: Callable[[IO], Any], binary: bool = True) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, then make it ``path``."""
    path = Path(path)
    ensure_dir(path.parent)
    fd, tmp = _mkstemp(path)
    try:
        os.fchmod(fd, _mode_for(path))
        with os.fdopen(fd, "wb" if binary else "w",
                       **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(exc):
            kept = ("the previous file is kept" if path.exists()
                    else "nothing is left half-written")
            raise DiskFullError(f"the disk is full: cannot write {path} "
                                f"({_free_bytes(path.parent)} bytes free in {path.parent}); "
                                f"{kept}") from None
        raise
    _fsync_dir(path.parent)


def atomic_write_named(path: str | Path, write: Callable[[Path], Any]) -> None:
    """``atomic_write`` for writers that open their file by name (the gguf package's
    GGUFWriter): ``write(tmp)`` fills a temporary file beside ``path``, which is then
    fsynced and renamed over it, with the same modes and full-disk error."""
    path = Path(path)
    ensure_dir(path.parent)
    fd, name = _mkstemp(path)
    tmp = Path(name)
    try:
        try:
            os.fchmod(fd, _mode_for(path))
        finally:
            os.close(fd)
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise DiskFullError(f"the disk is full: cannot write {path} "
                                f"({_free_bytes(path.parent)} bytes free in {path.parent}); "
                                "the previous file is kept") from None
        raise
    _fsync_dir(path.parent)


def _mkstemp(path: Path) -> tuple[int, str]:
    """The temporary file beside ``path``; a folder that takes no new files (/proc) is
    the user's to fix (a full disk and a folder we may not write are reported as such)."""
    try:
        return tempfile.mkstemp(dir=path.parent, prefix=temporary_name_prefix(path.name),
                                suffix=".tmp")
    except PermissionError:
        raise
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFullError(f"the disk is full: cannot write {path}") from None
        raise UserError(f"cannot create a file in {path.parent}: {exc.strerror or exc}"
                        ) from None


def ensure_dir(path: str | Path, what: str = "folder") -> Path:
    """``path`` as an existing folder, created when missing; a file in the way or a
    folder we may not write is the user's to fix, so it is a UserError naming it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"{what} {path} is (or lies under) a file, not a folder") from None
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFullError(f"the disk is full: cannot create {path}") from None
        raise UserError(f"cannot create {what} {path}: {exc.strerror or exc}") from None
    return path


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps: torch.save re-raises a writer's failure) is a
    full disk or an exhausted quota."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL:
            return True
        if "No space left on device" in str(current) or _short_write(current):
            return True
        current = current.__cause__ or current.__context__
    return False


# numpy's ``tofile`` (the token cache, the gguf package's writer) reports a full disk
# without an errno: a write cut short as ``N requested and M written``, and, for arrays of
# 16 MiB or more, whose room it reserves first, ``Not enough free space to write N bytes
# after offset M``.
_NUMPY_DISK_FULL = re.compile(r"\d+ requested and \d+ written"
                              r"|Not enough free space to write \d+ bytes after offset \d+")


def _short_write(exc: BaseException) -> bool:
    """Whether ``exc`` is numpy's errno-less report of a full disk."""
    return (isinstance(exc, OSError) and exc.errno is None
            and _NUMPY_DISK_FULL.fullmatch(str(exc)) is not None)


class LineAppender:
    """A log file that grows by whole lines: each ``write`` lands entirely or, when the
    disk fills midway, is cut back off (``DiskFullError``), so a reader never finds half a
    line at the end (``metrics.jsonl`` is read line by line as JSON). Unbuffered: a line
    is on the file once ``write`` returns."""

    def __init__(self, path: str | Path, append: bool) -> None:
        self.path = Path(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if append else os.O_TRUNC)
        self._fd: int | None = os.open(self.path, flags, 0o666)  # less the umask

    def write(self, text: str) -> None:
        assert self._fd is not None, "write after close"
        data = memoryview(text.encode("utf-8"))
        start = os.lseek(self._fd, 0, os.SEEK_END)
        written = 0
        try:
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except BaseException as exc:
            if written:
                os.ftruncate(self._fd, start)  # never half a line
            if is_disk_full(exc):
                raise DiskFullError(f"the disk is full: cannot append to {self.path} "
                                    f"({_free_bytes(self.path.parent)} bytes free); its "
                                    "lines so far are whole") from None
            raise

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _mode_for(path: Path) -> int:
    """The replaced file's permission bits, or what the umask gives a new file (mkstemp
    makes it 0600, which would hide a run's files from the rest of a group)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return umask_mode(0o666)


def umask_mode(mode: int) -> int:
    """``mode`` (0o666 for a file, 0o777 for a folder) less the process's umask: what a
    plain ``open`` or ``mkdir`` would give, for what ``mkstemp`` / ``mkdtemp`` made 0600 /
    0700."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def free_bytes(directory: str | Path) -> int:
    """Bytes an unprivileged writer may still put in ``directory``'s file system (0 when
    that cannot be read): what a full-disk error reports."""
    return _free_bytes(Path(directory))


def _free_bytes(directory: Path) -> int:
    try:
        return os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
    except OSError:
        return 0


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
