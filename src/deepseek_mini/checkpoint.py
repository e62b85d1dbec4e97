"""The checkpoint format, in one place: what a checkpoint holds, and reading one safely.

A checkpoint is a plain dict of tensors and primitives. Every checkpoint has ``model``
(the state dict) and ``config`` (the run's config as a dict, whose ``data.tokenizer``
names the tokenizer); a training checkpoint (``latest.pt``) also has the
``TRAINING_STATE`` entries that ``--resume`` needs (train/state.py fills and reads
them). ``best.pt`` and warm-start files are weights checkpoints: model and config, plus
a few primitives (``step``, ``best_val``). Writing is ``files.atomic_save``; reading
is ``torch.load(weights_only=True)``, which refuses anything that could run code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import ConfigError, ModelConfig, model_config_from_dict, upgrade_model_dict
from .errors import UserError

TRAINING_STATE = frozenset({"optimizer", "scheduler", "scaler", "sampler", "rng", "step",
                            "tokens_seen", "best_val", "elapsed_s", "log_window",
                            "collapse_watch"})


def weights_checkpoint(model_state: dict[str, Any], config: dict[str, Any],
                       **extra: Any) -> dict[str, Any]:
    """A checkpoint without training state: what warm start and ``best.pt`` hold."""
    return {"model": model_state, "config": config, **extra}


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint dict; a missing, unreadable or corrupt file is a UserError. A
    config stored before a key was renamed comes back in today's keys."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - junk bytes raise KeyError, IndexError, ... too
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load checkpoint {path}: {first}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"checkpoint {path} is not a deepseek-mini checkpoint "
                        "(no 'model' or 'config' entry)")
    if isinstance(ckpt["config"], dict) and isinstance(ckpt["config"].get("model"), dict):
        ckpt["config"] = {**ckpt["config"], "model": upgrade_model_dict(ckpt["config"]["model"])}
    return ckpt


def model_config_of(ckpt: dict[str, Any], path: str | Path) -> ModelConfig:
    """The validated model config a checkpoint was written with."""
    try:
        return model_config_from_dict(ckpt["config"].get("model", {}), f"checkpoint {path}")
    except (ConfigError, AttributeError) as exc:
        raise UserError(f"checkpoint {path} has an unusable model config: {exc}") from None


def missing_training_state(ckpt: dict[str, Any]) -> list[str]:
    """The training-state entries a checkpoint lacks (empty: it can be resumed)."""
    return sorted(TRAINING_STATE - set(ckpt))


def config_differences(saved: dict[str, Any], current: dict[str, Any],
                       prefix: str) -> list[str]:
    """``prefix.key: saved -> current`` for each key whose value differs."""
    keys = sorted(set(saved) | set(current))
    return [f"{prefix}.{k}: {saved.get(k)!r} -> {current.get(k)!r}"
            for k in keys if saved.get(k) != current.get(k)]
