"""``deepseek-mini train``: a run from a config, or ``--resume`` of one."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import Config
from ..errors import UserError
from ..files import CONFIG_FILE
from ..train.loop import train


def run_config(args: argparse.Namespace) -> Config:
    """The config to train with. A resume without ``--config`` starts from the run's saved
    ``config.yaml`` (RUN_DIR's, or train.out_dir's), so ``--set`` changes only what it
    names; with ``--config`` it is that file and ``--set``, as for a new run."""
    sets = list(args.set)
    if args.threads is not None:
        sets.append(f"train.threads={args.threads}")
    if args.resume is None or (args.config is not None and not args.resume):
        return Config.from_yaml(args.config, sets)
    if args.config is not None:
        raise UserError("--resume RUN_DIR continues with the run's own config: drop --config "
                        "(or give --config with a bare --resume)")
    run_dir = Path(args.resume or Config.from_yaml(None, sets).train.out_dir)
    saved = run_dir / CONFIG_FILE
    if not saved.is_file():
        raise UserError(f"--resume: no {CONFIG_FILE} in {run_dir}: not a run folder (train "
                        "without --resume to start a run)")
    cfg = Config.from_yaml(saved, sets)
    if Path(cfg.train.out_dir).resolve() != run_dir.resolve():  # the folder was moved
        cfg = Config.from_yaml(saved, [*sets, f"train.out_dir={run_dir}"])
    return cfg


def run(args: argparse.Namespace) -> int:
    result = train(run_config(args), resume=args.resume is not None,
                   stop_after=args.stop_after, allow_changes=args.allow_changes)
    return 130 if result.interrupted else 0
