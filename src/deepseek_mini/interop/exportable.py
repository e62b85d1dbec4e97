"""What an exported model file cannot hold, checked before anything is written: every
exporter calls ``check_exportable`` first, so a refusal leaves no half-made output."""

from __future__ import annotations

from ..config import ModelConfig
from ..errors import UserError


def check_exportable(cfg: ModelConfig, source: str, target: str) -> None:
    """A trimmed head (``model.head_vocab``) puts "other" ids at one shared logit minus
    log(V - N): a bias no exported LM head has (neither transformers' DeepseekV3 nor
    llama.cpp's deepseek2), and a plain weight row cannot give a constant."""
    if cfg.head_vocab:
        raise UserError(f"{target}: {source} has a trimmed LM head (model.head_vocab: "
                        f"{cfg.head_vocab}), which {target} cannot hold; train with "
                        "model.head_vocab: 0 to export")
