"""deepseek-mini: a compact DeepSeek-style language model (MLA attention, MoE feed-forward).

The model, ``generate`` and ``quantize`` are imported on first use: they pull in torch
(seconds), which commands that only read a config or a metrics file (``info``, ``plot``, a
config error) never need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import Config, DataConfig, ModelConfig, TrainConfig
from .errors import UserError

if TYPE_CHECKING:
    from .inference.generate import generate
    from .inference.loading import load_for_inference
    from .model.quantize import quantize
    from .model.transformer import DeepSeekMini, ModelOutput

_LAZY = {"DeepSeekMini": "model.transformer", "ModelOutput": "model.transformer",
         "generate": "inference.generate", "load_for_inference": "inference.loading",
         "quantize": "model.quantize"}

__all__ = ["Config", "DataConfig", "DeepSeekMini", "ModelConfig", "ModelOutput", "TrainConfig",
           "UserError", "generate", "load_for_inference", "quantize"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
