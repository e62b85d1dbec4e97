"""One run per run folder: the lock that keeps a second training out, and the tidying a
run does once it holds the folder.

Two runs writing one ``out_dir`` interleave ``metrics.jsonl`` mid-line and leave
whichever ``latest.pt`` saved last, so a run holds an exclusive lock on
``out_dir/.lock`` (which names its pid and host) from start to end. The lock is opened
without following a link and rewritten only when it is a regular file of its own that
is empty or names a holder, so a ``.lock`` that points at someone's file is refused,
never truncated. POSIX ``flock`` is
released by the kernel when its process dies, however it dies, so a killed run's lock is
simply taken; where ``fcntl`` is missing the lock is a file created with ``O_EXCL``,
taken over when the pid it names on this host is gone. Under torchrun rank 0 alone
locks and tidies, and every rank learns whether it could.

Holding the folder, a run removes the temporary files a killed save left behind (never
the only copy: the rename is the commit) and, when it starts afresh, moves an older
run's files aside so one folder never mixes two runs.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ..errors import UserError
from ..files import (
    CONFIG_FILE,
    LATEST,
    LOCK_FILE,
    LOG_FILE,
    METRICS_FILE,
    RUN_FILES,
    ensure_dir,
)
from .distributed import Parallel

try:
    import fcntl
except ImportError:  # not POSIX: the O_EXCL lock file below
    fcntl = None  # type: ignore[assignment]

PREVIOUS_RUNS = "previous-runs"
# atomic_write's temporaries: ``.NAME.`` + mkstemp's 8 random characters + ``.tmp``
_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
_HOLDER = re.compile(rb"\A\d+ \S+\n?\Z")  # what a lock holds: "PID HOST"
_HOLDER_MAX_BYTES = 300


@dataclass
class RunFolder:
    """A run folder held by this process; ``notes`` are what claiming it did, to log."""

    path: Path
    notes: list[str] = field(default_factory=list)
    _handle: IO | None = None
    _exclusive_file: bool = False

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing drops the flock
            self._handle = None
        if self._exclusive_file:
            (self.path / LOCK_FILE).unlink(missing_ok=True)
            self._exclusive_file = False


def claim_for_ranks(out_dir: Path, resume: bool, parallel: Parallel) -> RunFolder | None:
    """Rank 0 claims ``out_dir`` (``claim``); a refusal ends every rank, rank 0 with the
    reason. Returns rank 0's held folder, None on the other ranks."""
    folder, refusal = None, None
    if parallel.ranks.is_main:
        try:
            folder = claim(out_dir, resume)
        except UserError as exc:
            refusal = exc
    if parallel.any(refusal is not None):
        if refusal is not None:
            raise refusal
        raise UserError(f"rank 0 could not claim the run folder {out_dir} (see its error)")
    return folder


def claim(out_dir: Path, resume: bool) -> RunFolder:
    """Lock ``out_dir`` for this run, clear stale temporaries and, unless ``resume``, move
    an older run's files aside."""
    folder = RunFolder(ensure_dir(out_dir, "train.out_dir"))
    _lock(folder)
    try:
        if resume:
            _refuse_linked_logs(folder)
        _remove_temporaries(folder)
        if not resume:
            _move_older_run_aside(folder)
    except OSError as exc:
        folder.release()
        raise UserError(f"cannot tidy the run folder {out_dir}: {exc}") from None
    return folder


def _refuse_linked_logs(folder: RunFolder) -> None:
    """A resumed run appends to ``train.log`` and rewrites ``metrics.jsonl``: where either
    is a symbolic or hard link, that write would land in another file, so the run is
    refused, as a lock that is a link is (``_open_lock``)."""
    for name in (LOG_FILE, METRICS_FILE):
        path = folder.path / name
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        what = ("a symbolic link" if stat.S_ISLNK(st.st_mode) else
                f"a hard link ({st.st_nlink} names)"
                if stat.S_ISREG(st.st_mode) and st.st_nlink != 1 else None)
        if what is not None:
            folder.release()
            raise UserError(f"{path} is {what}: a resumed run writes to its own log files "
                            "only, so it is left untouched; replace the link with a copy of "
                            "the file, or choose another train.out_dir")


def _lock(folder: RunFolder) -> None:
    path = folder.path / LOCK_FILE
    try:
        if fcntl is not None:
            _flock(folder, path)
        else:
            _exclusive_file(folder, path)
    except PermissionError:
        raise UserError(f"cannot write in the run folder {folder.path}: permission "
                        "denied") from None


def _flock(folder: RunFolder, path: Path) -> None:
    handle = os.fdopen(_open_lock(path), "r+b")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise _busy(folder.path, path) from None
    held = handle.read(_HOLDER_MAX_BYTES + 1)
    if held and not _HOLDER.match(held):  # a file of ours holds "PID HOST" or nothing
        handle.close()
        raise _not_a_lock(path, "holds something other than a run's pid and host")
    handle.seek(0)
    handle.truncate()
    handle.write(_holder_line().encode())
    handle.flush()
    folder._handle = handle


def _open_lock(path: Path) -> int:
    """The lock file, opened for reading and writing without following a symbolic link
    (``O_NOFOLLOW``) and refused unless it is a regular file with no other name (a hard
    link): the lock is rewritten with the holder's pid, and a link would have that write
    land in someone's file."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        what = {errno.ELOOP: "is a symbolic link", errno.EISDIR: "is a folder",
                errno.ENXIO: "is not a regular file"}.get(exc.errno)
        if what is None:
            raise
        raise _not_a_lock(path, what) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise _not_a_lock(path, "is not a regular file" if not stat.S_ISREG(st.st_mode)
                          else f"is a hard link ({st.st_nlink} names)")
    os.set_blocking(fd, True)
    return fd


def _not_a_lock(path: Path, what: str) -> UserError:
    return UserError(f"the run folder's lock {path} {what}, so it is not a lock this project "
                     "wrote and is left untouched: remove or rename it, or choose another "
                     "train.out_dir")


def _exclusive_file(folder: RunFolder, path: Path) -> None:
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid, host = read_holder(path)
            if pid is None or host != socket.gethostname() or _alive(pid):
                raise _busy(folder.path, path) from None
            path.unlink(missing_ok=True)
            folder.notes.append(f"took over the lock of {folder.path} left by pid {pid}, "
                                "which has ended")
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(_holder_line())
        folder._exclusive_file = True
        return
    raise _busy(folder.path, path)


def read_holder(path: Path) -> tuple[int | None, str | None]:
    """(pid, host) written in a lock file; Nones when it is unreadable or empty."""
    try:
        pid, host = path.read_text(encoding="utf-8").split()[:2]
        return int(pid), host
    except (OSError, ValueError):
        return None, None


def _holder_line() -> str:
    return f"{os.getpid()} {socket.gethostname()}\n"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _busy(out_dir: Path, path: Path) -> UserError:
    pid, host = read_holder(path)
    who = f"pid {pid} on {host}" if pid is not None else "another process"
    return UserError(f"the run folder {out_dir} is in use by another training run ({who}, "
                     f"lock {path}): wait for it to end or choose another train.out_dir")


def _remove_temporaries(folder: RunFolder) -> None:
    stale = [p for p in folder.path.iterdir() if _TEMPORARY.match(p.name) and p.is_file()]
    if not stale:
        return
    reclaimed = 0
    for p in stale:
        reclaimed += p.stat().st_size
        p.unlink()
    folder.notes.append(f"removed {len(stale)} temporary file(s) left by an interrupted save "
                        f"in {folder.path}, reclaiming {reclaimed:,} bytes")


def _move_older_run_aside(folder: RunFolder) -> None:
    """Move what an older run left to ``previous-runs/<time>/``. A ``config.yaml`` with no
    run file beside it is no run's, but the user's own (perhaps the very ``--config``):
    it is moved aside all the same, as the run writes its own there, and said so."""
    older = [name for name in RUN_FILES if (folder.path / name).exists()]
    if not older:
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = folder.path / PREVIOUS_RUNS / stamp
    suffix = 1
    while target.exists():
        suffix += 1
        target = folder.path / PREVIOUS_RUNS / f"{stamp}-{suffix}"
    target.mkdir(parents=True)
    for name in older:
        os.replace(folder.path / name, target / name)
    if older == [CONFIG_FILE]:
        folder.notes.append(f"starting in {folder.path}: its {CONFIG_FILE}, written by no run "
                            f"(no {LATEST} or {METRICS_FILE} beside it), moved to {target}, "
                            f"as the run writes its own {CONFIG_FILE}")
        return
    folder.notes.append(f"starting afresh in {folder.path}: the older run's "
                        f"{', '.join(older)} moved to {target} (--resume continues a run "
                        "instead)")
