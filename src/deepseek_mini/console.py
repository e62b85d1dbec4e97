"""The terminal or pipe a command prints to, and a reader that goes away.

``deepseek-mini generate ... | head -c 3`` closes the pipe while the command still
writes: Python then raises BrokenPipeError at the next write and again when it flushes
stdout at exit. A command that prints ends quietly (the reader has what it wanted); a
training run goes on and keeps logging to ``train.log``. Both need to know that it was
stdout's reader that left, and to stop writing there.
"""

from __future__ import annotations

import os
import select
import sys


def stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on its
    write end), as opposed to another broken pipe, which stays a bug."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no fd (captured in tests) or no poll
        return False


def silence_stdout() -> None:
    """Point stdout's file descriptor at /dev/null, so what is still buffered, and any
    later print, goes nowhere instead of raising BrokenPipeError again (at exit, too)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
