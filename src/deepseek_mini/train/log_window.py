"""The log window: device-side sums over the steps since the last log line.

Losses and statistics stay on the device between log lines, so the host waits on the
device only when it prints. The window is kept in checkpoints so a resumed run prints the
same averages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class LogWindow:
    """Sums over the steps since the last log line (the only place they are read)."""

    sums: torch.Tensor  # loss, ce, aux, balance, z, grad_norm, mtp_ce over finite steps
    finite_steps: torch.Tensor
    skipped_total: torch.Tensor
    streak: torch.Tensor  # non-finite steps in a row
    steps: int = 0
    tokens_timed: int = 0
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def zeros(cls, device: torch.device) -> LogWindow:
        return cls(torch.zeros(7, dtype=torch.float64, device=device),
                   torch.zeros((), dtype=torch.int64, device=device),
                   torch.zeros((), dtype=torch.int64, device=device),
                   torch.zeros((), dtype=torch.int64, device=device))

    def add(self, stats: torch.Tensor, finite: torch.Tensor, tokens: int) -> None:
        self.sums += torch.where(finite, stats.double(), 0.0)
        self.finite_steps += finite
        self.skipped_total += ~finite
        self.streak.copy_((self.streak + 1) * ~finite)
        self.steps += 1
        self.tokens_timed += tokens

    def reset(self) -> None:
        self.sums.zero_()
        self.finite_steps.zero_()
        self.steps = 0
        self.tokens_timed = 0
        self.started = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self.sums.cpu(), "finite_steps": int(self.finite_steps),
                "skipped_total": int(self.skipped_total), "streak": int(self.streak),
                "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums.zero_()  # a window saved before mtp_ce existed holds one sum fewer
        self.sums[:len(state["sums"])] = state["sums"]
        self.finite_steps.fill_(state["finite_steps"])
        self.skipped_total.fill_(state["skipped_total"])
        self.streak.fill_(state["streak"])
        self.steps = state["steps"]
