"""``deepseek-mini warm-start``: the model built from SmolLM2-135M's weights, with the
table of what was mapped how."""

from __future__ import annotations

import argparse

import torch

from ..config import Config
from ..interop.smollm2 import load_smollm2
from ..interop.warm_start import format_table, save_warm_start, warm_start
from ..progress import Progress


def run(args: argparse.Namespace) -> None:
    cfg = Config.from_yaml(args.config, args.set)
    torch.manual_seed(cfg.train.seed)
    weights = load_smollm2(args.source)
    with Progress(2 * cfg.model.num_layers, "mapping SmolLM2", unit="layer steps") as bar:
        result = warm_start(cfg.model, weights, seed=cfg.train.seed, on_layer=bar.update)
    print(format_table(result))
    save_warm_start(result, cfg, args.out)
    print(f"wrote {args.out}")
