"""The seed's entry point, kept: ``python train.py --config configs/base.yaml``."""

import sys

from deepseek_mini.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
