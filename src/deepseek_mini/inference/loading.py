"""A trained model ready to use: the checkpoint's model, its tokenizer and its config, as
generate, eval, the server and the Python API need them."""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import check_finite, load_checkpoint
from ..config import Config, ConfigError
from ..data.tokenizer import Tokenizer, load_tokenizer
from ..errors import UserError
from ..model.transformer import DeepSeekMini


def load_for_inference(path: str | Path, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32, tokenizer: str | None = None
                       ) -> tuple[DeepSeekMini, Tokenizer, Config]:
    """The checkpoint's model (eval mode, on ``device`` in ``dtype``), its tokenizer (or
    ``tokenizer`` instead) and the config it was trained with."""
    ckpt = load_checkpoint(path)
    check_finite(ckpt, path)
    model = DeepSeekMini.from_checkpoint_dict(ckpt, path).to(device=device, dtype=dtype).eval()
    try:
        config = Config.from_dict(ckpt["config"], f"checkpoint {path}")
    except ConfigError as exc:
        raise UserError(f"checkpoint {path} has an unusable config: {exc}") from None
    tok = load_tokenizer(tokenizer or config.data.tokenizer, config.data.cache_dir,
                         model.config.vocab_size)
    return model, tok, config
