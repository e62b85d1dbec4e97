"""deepseek-mini: a compact DeepSeek-style language model (MLA attention, MoE feed-forward)."""

from .config import Config, DataConfig, ModelConfig, TrainConfig
from .errors import UserError
from .generation import generate
from .model import DeepSeekMini, ModelOutput

__all__ = ["Config", "DataConfig", "DeepSeekMini", "ModelConfig", "ModelOutput", "TrainConfig",
           "UserError", "generate"]
__version__ = "0.1.0"
