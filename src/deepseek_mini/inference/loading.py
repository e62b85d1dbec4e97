"""A trained model ready to use: the checkpoint's model, its tokenizer and its config, as
generate, eval, the server and the Python API need them."""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import check_finite, load_checkpoint
from ..config import Config, ConfigError
from ..data.tokenizer import Tokenizer, load_tokenizer
from ..errors import UserError
from ..model.quantize import check_device, check_mode
from ..model.quantize import quantize as quantize_model
from ..model.transformer import DeepSeekMini


def load_for_inference(path: str | Path, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32, tokenizer: str | None = None,
                       quantize: str | None = None
                       ) -> tuple[DeepSeekMini, Tokenizer, Config]:
    """The checkpoint's model (eval mode, on ``device`` in ``dtype``), its tokenizer (or
    ``tokenizer`` instead) and the config it was trained with. ``quantize`` (``"int8"``
    or ``"bf16"``) quantizes the weights as they load (model/quantize.py): the file stays
    full precision."""
    if quantize is not None:  # before the (slow) read
        check_mode(quantize)
        check_device(device, quantize)
    ckpt = load_checkpoint(path)
    check_finite(ckpt, path)
    model = DeepSeekMini.from_checkpoint_dict(ckpt, path).to(device=device, dtype=dtype).eval()
    try:
        config = Config.from_dict(ckpt["config"], f"checkpoint {path}")
    except ConfigError as exc:
        raise UserError(f"checkpoint {path} has an unusable config: {exc}") from None
    del ckpt  # its copy of the float weights, before quantizing makes another
    if quantize is not None:
        quantize_model(model, quantize)
    tok = load_tokenizer(tokenizer or config.data.tokenizer, config.data.cache_dir,
                         model.config.vocab_size)
    return model, tok, config
