"""Run tracking: TensorBoard and Weights & Biases get what ``metrics.jsonl`` and the log
get, through ``RunLog`` (its metrics rows and text samples), so no training code calls a
tracker itself. Each is an optional extra, imported only when a run lists it; only the
main process opens one, as it alone holds a ``RunLog`` that writes."""

from __future__ import annotations

import html
import importlib.util
import math
from pathlib import Path
from typing import Any, Protocol

from ..errors import UserError

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # name -> module it needs
TB_DIR = "tb"
WANDB_PROJECT = "deepseek-mini"


class Tracker(Protocol):
    def scalars(self, step: int, values: dict[str, float]) -> None: ...
    def text(self, step: int, tag: str, text: str) -> None: ...
    def close(self) -> None: ...


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """A metrics row as flat scalars: per-layer lists become ``name/layer{i}`` and the
    expert loads ``experts/layer{i}/expert{j}``, ``i`` being the layer's index in the
    model (``expert_layers``: leading dense layers have no statistics); ``step`` and
    missing values are left out."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key in ("step", "expert_layers") or value is None or isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            out[key] = float(value)
        elif isinstance(value, list):
            for layer, v in zip(layer_names(row, len(value)), value, strict=True):
                if key == "expert_fractions":
                    out.update({f"experts/layer{layer}/expert{j}": float(x)
                                for j, x in enumerate(v)})
                elif isinstance(v, int | float) and not isinstance(v, bool):
                    out[f"{key}/layer{layer}"] = float(v)
    return {k: v for k, v in out.items() if math.isfinite(v)}


def layer_names(row: dict[str, Any], count: int) -> list[int]:
    """The model's layer index of each of a row's ``count`` per-layer values: its
    ``expert_layers``, or 0, 1, ... in a row written before those were recorded."""
    names = row.get("expert_layers")
    return names if isinstance(names, list) and len(names) == count else list(range(count))


class TensorBoard:
    """Event files under ``out_dir/tb``; a resumed run adds a new file beside the old."""

    def __init__(self, out_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out_dir / TB_DIR))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def text(self, step: int, tag: str, text: str) -> None:
        self.writer.add_text(tag, text, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A W&B run in ``out_dir/wandb`` holding the run's config; ``WANDB_MODE=offline``
    keeps it on disk for a later ``wandb sync``."""

    def __init__(self, out_dir: Path, config: dict[str, Any]) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=WANDB_PROJECT, name=out_dir.name, dir=str(out_dir),
                              config=config)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        self.run.log({tag: self.wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def close(self) -> None:
        self.run.finish()


def check_trackers(names: list[str]) -> None:
    """Fail before training when a listed tracker's package is not installed."""
    for name in names:
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise UserError(f"train.trackers lists {name}, which is not installed: "
                            f"pip install 'deepseek-mini[{name}]'")


def open_trackers(names: list[str], out_dir: Path, config: dict[str, Any]) -> list[Tracker]:
    check_trackers(names)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [TensorBoard(out_dir) if name == "tensorboard" else WandB(out_dir, config)
            for name in names]
