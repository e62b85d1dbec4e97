"""What a training run tells the world: console lines, ``train.log`` and ``metrics.jsonl``.

On a terminal the console gets a tqdm bar and the log lines print above it; elsewhere
(CI, ``| tee``, a scheduler's log file) plain lines only, since a redrawn bar turns into
noise there. Only the main process of a run writes (``enabled``), so a later distributed
run can hand every rank the same object. Trackers (TensorBoard, W&B) get every metrics
row and text sample from here.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..console import silence_stdout
from ..files import LOG_FILE, METRICS_FILE, LineAppender, atomic_write_text
from .trackers import Tracker, scalars


def continue_metrics(path: Path, step: int) -> int:
    """Cut ``metrics.jsonl`` back to the rows of steps ``<= step`` before a resume: rows
    written after the checkpoint would be written again, and a line cut short by a crash
    is not JSON. Returns how many lines were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line)
        else:
            dropped += 1
    atomic_write_text("".join(f"{line}\n" for line in kept), path)
    return dropped


def json_value(value: Any) -> Any:
    """JSON has no inf or NaN; a skipped-step loss (at any depth) is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_value(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    return value


class RunLog:
    def __init__(self, out_dir: Path, *, enabled: bool, resume: bool, total_steps: int,
                 start_step: int, trackers: list[Tracker] | None = None) -> None:
        self.enabled = enabled
        self.trackers = trackers or []
        self.bar: tqdm | None = None
        self.console_gone = False  # stdout's reader left (``train ... | head``)
        self._log: LineAppender | None = None
        self._metrics: LineAppender | None = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        # whole lines only: a full disk cuts a line back off rather than leave half of it
        self._log = LineAppender(out_dir / LOG_FILE, append=resume)
        self._metrics = LineAppender(out_dir / METRICS_FILE, append=resume)
        if sys.stderr.isatty():
            # The rate and time left are the loop's (train/eta.py), in the postfix: tqdm's
            # own count the first step's warm-up and every validation pause.
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step",
                            dynamic_ncols=True, leave=False,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")

    def info(self, line: str) -> None:
        if not self.enabled:
            return
        assert self._log is not None
        self._log.write(line + "\n")
        self._console(line)

    def _console(self, line: str) -> None:
        """The line on the console, unless its reader has gone: then the run goes on,
        logging to ``train.log`` alone (and says so there)."""
        if self.console_gone:
            return
        try:
            if self.bar is not None:
                self.bar.write(line)
            else:
                print(line, flush=True)
        except BrokenPipeError:
            self.console_gone = True
            silence_stdout()
            assert self._log is not None
            self._log.write("note: the console's reader has gone (a closed pipe): training "
                            f"goes on, logging to {LOG_FILE} only\n")

    def metrics(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        assert self._metrics is not None
        self._metrics.write(json.dumps(json_value(row), allow_nan=False) + "\n")
        if self.trackers:
            values = scalars(row)
            for tracker in self.trackers:
                tracker.scalars(row["step"], values)

    def text(self, step: int, tag: str, text: str) -> None:
        """A text sample for the trackers (the log line is the caller's)."""
        if self.enabled:
            for tracker in self.trackers:
                tracker.text(step, tag, text)

    def advance(self, postfix: str | None = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if postfix:
                self.bar.set_postfix_str(postfix, refresh=False)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        if self.bar is not None:
            self.bar.close()
        for f in (self._log, self._metrics):
            if f is not None:
                f.close()
