"""``deepseek-mini train``: a run from a config, or ``--resume`` of one."""

from __future__ import annotations

import argparse

from ..config import Config
from ..train.loop import train


def run(args: argparse.Namespace) -> int:
    result = train(Config.from_yaml(args.config, args.set), resume=args.resume,
                   stop_after=args.stop_after)
    return 130 if result.interrupted else 0
