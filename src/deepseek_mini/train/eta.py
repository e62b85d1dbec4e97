"""The time a run has left: an estimate from the steps measured so far, honest about what
a naive average gets wrong.

The first steps pay for warm-up (allocation, lazy initialisation, compilation), so the
rate is measured from ``SETTLE_STEPS`` steps into the session, and nothing is promised
before then. Validation, samples and saves come every so many steps and take much longer
than a step: the step rate leaves their time out, and each kind's last measured duration
is counted once for every time it is still to come before ``end``. So an estimate made
before the first validation is low by that validation's cost only until it has run once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

SETTLE_STEPS = 3


@dataclass
class Eta:
    """Fed by the loop: ``periodic`` after each validation, sample or save, and
    ``step_done`` at the end of every step; asked ``seconds_left`` at a log line."""

    start: int  # the step this session starts from
    end: int  # the step it stops at
    max_steps: int
    intervals: dict[str, int]  # periodic work ("eval", "sample", "save") -> its interval
    tokens_per_step: int
    settled_at: float | None = None
    periodic_s: float = 0.0  # periodic work since settling
    last: dict[str, float] = field(default_factory=dict)  # kind -> its last duration

    @property
    def settle_step(self) -> int:
        return self.start + SETTLE_STEPS

    def periodic(self, kind: str, seconds: float) -> None:
        self.last[kind] = seconds
        if self.settled_at is not None:
            self.periodic_s += seconds

    def step_done(self, step: int) -> None:
        if step == self.settle_step:
            self.settled_at = time.perf_counter()

    def step_seconds(self, step: int) -> float | None:
        """Seconds per training step since settling, periodic work left out; None before
        a step past the settling one has run."""
        if self.settled_at is None or step <= self.settle_step:
            return None
        steps = step - self.settle_step
        return max(time.perf_counter() - self.settled_at - self.periodic_s, 0.0) / steps

    def tokens_per_s(self, step: int) -> float | None:
        seconds = self.step_seconds(step)
        return None if not seconds else self.tokens_per_step / seconds

    def seconds_left(self, step: int) -> float | None:
        """Seconds until ``end``, asked at step ``step``'s log line (its own periodic work
        still to come); None while nothing is measured."""
        per_step = self.step_seconds(step)
        if per_step is None:
            return None
        left = (self.end - step) * per_step
        for kind, seconds in self.last.items():
            left += self.remaining(kind, step) * seconds
        return left

    def remaining(self, kind: str, step: int) -> int:
        """How many times ``kind`` still runs, from step ``step`` to ``end``: at every
        multiple of its interval, and at the last step (validation and samples at
        ``max_steps``, a save wherever the session ends)."""
        interval = self.intervals.get(kind)
        if not interval:
            return 0
        count = self.end // interval - (step - 1) // interval
        final = self.end if kind == "save" else self.max_steps
        if final == self.end and self.end % interval and step <= self.end:
            count += 1
        return max(count, 0)


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``: the estimate's precision, no more."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
