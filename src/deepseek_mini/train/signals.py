"""Ctrl-C and SIGTERM during training: finish the step, save, stop."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from ..files import LATEST


class StopRequest:
    """SIGINT / SIGTERM ask the loop to finish its step, save and stop; a second signal
    interrupts at once (the checkpoint writes are atomic, so that is safe too).

    A second signal within ``ECHO_WINDOW_S`` of the first counts as the same request: under
    torchrun, Ctrl-C reaches each worker from the terminal and again from torchrun."""

    ECHO_WINDOW_S = 1.0

    def __init__(self, notify: Callable[[str], None]) -> None:
        self.notify = notify
        self.requested: str | None = None
        self.requested_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            if time.monotonic() - self.requested_at < self.ECHO_WINDOW_S:
                return
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        self.requested_at = time.monotonic()
        self.notify(f"{self.requested}: finishing this step, then saving {LATEST} "
                      "(signal again to stop at once)")
