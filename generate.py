"""The seed's entry point, kept: ``python generate.py --checkpoint checkpoints/best.pt``."""

import sys

from deepseek_mini.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main(["generate", *sys.argv[1:]]))
