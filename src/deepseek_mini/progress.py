"""Signs of life for long work (eval, prepare, warm start, export): a tqdm bar on a
terminal, and where the output is a file or a pipe, where a redrawn bar would be
carriage-return noise, one plain line every ``every`` percent instead (every
``UNKNOWN_TOTAL_S`` seconds when the total is not known). It writes to
stderr, so a command's result on stdout (``eval --json``) stays clean."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

UNKNOWN_TOTAL_S = 30.0


class Progress:
    """``update(n)`` as work is done; a context manager that closes the bar."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", enabled: bool = True,
                 stream: TextIO | None = None, every: int = 10) -> None:
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.done = 0
        self._next = every
        self._last_line = time.monotonic()
        self.bar: tqdm | None = None
        if enabled and _is_terminal(self.stream):
            self.bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream,
                            dynamic_ncols=True, leave=False)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and self.total:
            percent = min(100, 100 * self.done // self.total)
            if percent >= self._next:
                self._line(f"{percent}% ({self.done:,} of {self.total:,} {self.unit})")
                self._next = (percent // self.every + 1) * self.every
        elif self.enabled and time.monotonic() - self._last_line >= UNKNOWN_TOTAL_S:
            self._line(f"{self.done:,} {self.unit}")

    def _line(self, text: str) -> None:
        print(f"{self.desc}: {text}", file=self.stream, flush=True)
        self._last_line = time.monotonic()

    def set_postfix(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
