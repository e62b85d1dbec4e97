"""``deepseek-mini warm-start``: the model built from SmolLM2-135M's weights, with the
table of what was mapped how; or, from a transformers DeepseekV3 folder, that model
imported exactly."""

from __future__ import annotations

import argparse
import dataclasses

import torch

from ..checkpoint import weights_checkpoint
from ..config import Config
from ..files import atomic_save
from ..interop.hf_import import import_deepseek_v3, is_deepseek_v3_folder
from ..interop.smollm2 import load_smollm2
from ..interop.warm_start import format_table, geometry_check, save_warm_start, warm_start
from ..progress import Progress


def run(args: argparse.Namespace) -> None:
    cfg = Config.from_yaml(args.config, args.set)
    # A trimmed head's ids come from a run's training split, which this command never
    # reads: the file holds the full head, and the run trims it (train/state.py).
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, head_vocab=0))
    if args.source is not None and is_deepseek_v3_folder(args.source):
        model = import_deepseek_v3(args.source, cfg.model)
        cfg = dataclasses.replace(cfg, model=model.config)
        atomic_save(weights_checkpoint(model.state_dict(), cfg.to_dict(),
                                       warm_start={"source": f"hf:{args.source}"}), args.out)
        print(f"imported {args.source} (DeepseekV3) exactly; wrote {args.out}")
        return
    torch.manual_seed(cfg.train.seed)
    weights = load_smollm2(args.source, check=geometry_check(cfg.model))
    with Progress(2 * cfg.model.num_layers, "mapping SmolLM2", unit="layer steps") as bar:
        result = warm_start(cfg.model, weights, seed=cfg.train.seed, on_layer=bar.update)
    print(format_table(result))
    save_warm_start(result, cfg, args.out)
    print(f"wrote {args.out}")
