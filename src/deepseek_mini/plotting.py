"""Pictures of a training run from its ``metrics.jsonl``: losses, learning rate, throughput
and where the router sends tokens.

Figures are drawn on matplotlib's ``Figure`` directly (the Agg renderer), never through
pyplot, so no display, backend choice or global state is involved; each PNG is written
beside the metrics through a temporary file, so a reader never sees half of one.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UserError
from .files import METRICS_FILE, atomic_write

Rows = list[dict[str, Any]]


def read_metrics(run_dir: str | Path) -> Rows:
    """The JSON rows of ``RUN_DIR/metrics.jsonl``; lines that are not a JSON object (the last
    line of a run still writing) are skipped with a note on stderr."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise UserError(f"no {METRICS_FILE} in {run_dir}: is it a training run's out_dir?")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    rows, skipped = [], 0
    for line in filter(str.strip, lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        else:
            skipped += 1
    if skipped:
        print(f"note: skipped {skipped} unreadable line(s) of {path}", file=sys.stderr)
    if not rows:
        raise UserError(f"{path} holds no metrics rows yet")
    return rows


def series(rows: Rows, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows where ``key`` is a number (null marks a skipped value)."""
    points = [(r["step"], r[key]) for r in rows
              if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [s for s, _ in points], [v for _, v in points]


def _figure(**kwargs: Any) -> Any:
    from matplotlib.figure import Figure

    return Figure(layout="constrained", **kwargs)


def _lines(ax, rows: Rows, curves: list[tuple[str, str]], ylabel: str) -> bool:
    """Draw each present (key, label) curve on ``ax``; False when none has data."""
    drawn = False
    for key, label in curves:
        steps, values = series(rows, key)
        if steps:
            ax.plot(steps, values, label=label, marker="o" if len(steps) < 30 else None,
                    markersize=3)
            drawn = True
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend()
    return drawn


def loss_figure(rows: Rows) -> Any | None:
    fig = _figure(figsize=(8, 7))
    ce_ax, aux_ax = fig.subplots(2, 1, sharex=True)
    ce_ax.set_title("cross-entropy (nats/token)")
    aux_ax.set_title("auxiliary losses (load balance + router z-loss)")
    drawn = _lines(ce_ax, rows, [("ce", "train"), ("val_ce", "validation"),
                                 ("mtp_ce", "MTP (train)"), ("val_mtp_ce", "MTP (validation)")],
                   "CE")
    ce_ax.set_xlabel("")
    drawn |= _lines(aux_ax, rows, [("aux", "aux (train)"), ("balance_loss", "load balance"),
                                   ("z_loss", "z-loss")],
                    "aux")
    return fig if drawn else None


def lr_figure(rows: Rows) -> Any | None:
    fig = _figure(figsize=(8, 4))
    ax = fig.subplots()
    ax.set_title("learning rate")
    return fig if _lines(ax, rows, [("lr", "lr")], "lr") else None


def throughput_figure(rows: Rows) -> Any | None:
    fig = _figure(figsize=(8, 4))
    ax = fig.subplots()
    ax.set_title("training throughput")
    return fig if _lines(ax, rows, [("tokens_per_s", "tokens/s")], "tokens/s") else None


def experts_figure(rows: Rows) -> Any | None:
    """Layers × experts heatmap of the routed-slot fractions at the last evaluation; the
    rows are the MoE layers, labelled with their index in the model (``expert_layers``:
    leading dense layers have no row)."""
    evals = [r for r in rows if r.get("expert_fractions")]
    if not evals:
        return None
    last = evals[-1]
    fractions = last["expert_fractions"]
    layers, experts = len(fractions), len(fractions[0])
    names = last.get("expert_layers") or list(range(layers))
    fig = _figure(figsize=(max(4.0, 0.7 * experts + 2), max(3.0, 0.35 * layers + 1.5)))
    ax = fig.subplots()
    image = ax.imshow(fractions, aspect="auto", cmap="viridis", vmin=0.0)
    fig.colorbar(image, ax=ax, label="fraction of the layer's routed slots")
    ax.set_title(f"expert load at step {last['step']} (uniform: {1 / experts:.3f})")
    ax.set_xticks(range(experts))
    ax.set_yticks(range(layers), [str(n) for n in names])
    ax.set_xlabel("expert (cells: % of slots)")
    ax.set_ylabel("layer")
    if layers * experts <= 256:
        for layer, row in enumerate(fractions):
            for e, f in enumerate(row):
                ax.text(e, layer, f"{100 * f:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if f < 0.6 * max(row) else "black")
    return fig


FIGURES: dict[str, Callable[[Rows], Any | None]] = {
    "loss.png": loss_figure,
    "lr.png": lr_figure,
    "throughput.png": throughput_figure,
    "experts.png": experts_figure,
}


def save_png(fig: Any, path: Path) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write every figure the metrics have data for; returns their paths."""
    rows = read_metrics(run_dir)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("plot needs matplotlib: pip install 'deepseek-mini[plot]'") from None
    written = []
    for name, draw in FIGURES.items():
        fig = draw(rows)
        if fig is not None:
            path = Path(run_dir) / name
            save_png(fig, path)
            written.append(path)
    if not written:
        raise UserError(f"{Path(run_dir) / METRICS_FILE} has none of the metrics plot draws "
                        "(ce, val_ce, aux, lr, tokens_per_s, expert_fractions)")
    return written

