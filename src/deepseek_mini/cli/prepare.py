"""``deepseek-mini prepare``: tokenise the configured data into the cache."""

from __future__ import annotations

import argparse

from ..config import Config
from ..data.tokens import prepare_data


def run(args: argparse.Namespace) -> None:
    cfg = Config.from_yaml(args.config, args.set)
    data = prepare_data(cfg.data, cfg.train.seed, cfg.model.vocab_size, cfg.model.max_position)
    m = data.meta
    print(f"source: {m['source']}  documents: {m['documents']['train']:,} train / "
          f"{m['documents']['val']:,} val")
    print(f"tokens: {m['tokens']['train']:,} train / {m['tokens']['val']:,} val  "
          f"(tokenizer {data.tokenizer.path}, sha256 {data.tokenizer.digest[:12]})")
    print(f"cache: {data.path}")
