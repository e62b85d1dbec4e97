"""``deepseek-mini plot``: PNGs of a run's metrics."""

from __future__ import annotations

import argparse

from ..plotting import plot_run


def run(args: argparse.Namespace) -> None:
    for path in plot_run(args.run_dir):
        print(path)
