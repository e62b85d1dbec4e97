"""Import a transformers DeepseekV3 folder (``train.warm_start: hf:DIR``, ``deepseek-mini
warm-start --source DIR``): its config becomes a latent_rope + sigmoid ModelConfig and its
weights our state dict, exactly (hf_layout.py); export then import gives back the same
bits. A key or shape that does not fit is an error naming the first one."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import UserError
from ..model.transformer import DeepSeekMini, check_model_fits
from .hf_layout import from_hf, model_config_from_hf

HF_PREFIX = "hf:"


def is_deepseek_v3_folder(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    return _read_json(config).get("model_type") == "deepseek_v3"


def import_deepseek_v3(folder: str | Path, base: ModelConfig) -> DeepSeekMini:
    """The folder's model, with ``base``'s training-only keys."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: no config.json (expected a transformers DeepseekV3 folder)")
    raw = _read_json(folder / "config.json")
    cfg = model_config_from_hf(raw, base, str(folder))
    # The meta model below skips the memory check a real one makes, and a config.json of
    # ten million layers would spend minutes and gigabytes building Python modules first.
    check_model_fits(cfg, f"{folder}'s model")
    with torch.device("meta"):
        expected = {k: v.shape for k, v in DeepSeekMini(cfg).state_dict().items()}
    state = from_hf(cfg, _read_tensors(folder), raw.get("rope_interleave", True), expected,
                    str(folder))
    model = DeepSeekMini(cfg)
    model.load_state_dict(state)
    return model


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object")
    return value


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """``model.safetensors``, or the shards a ``model.safetensors.index.json`` lists."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise UserError("importing needs safetensors: pip install 'deepseek-mini[hf]'") from None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(_read_json(index).get("weight_map", {}).values()))
    else:
        files = ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise UserError(f"{folder}: weights file {name} not found")
        try:
            tensors.update(load_file(str(path)))
        except Exception as exc:  # noqa: BLE001 - a damaged file raises several kinds
            raise UserError(f"cannot read {path}: {exc}") from None
    return tensors
