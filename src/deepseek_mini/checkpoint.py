"""Checkpoints: plain dicts of tensors and primitives, written atomically, loaded safely.

Atomic: write a temporary file beside the target, fsync it, then rename over the target,
so a crash at any moment leaves either the old file or the new one, never half of one.
Safe: ``torch.load(weights_only=True)`` refuses anything that could run code, so
everything stored is tensors, dicts, lists, tuples, numbers, strings or None: the random
generators' states below are converted to and from such plain forms.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from .config import ConfigError, model_config_from_dict
from .errors import UserError


def atomic_save(obj: Any, path: str | Path) -> None:
    _atomic_write(path, "wb", lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | Path) -> None:
    _atomic_write(path, "w", lambda f: f.write(text))


def _atomic_write(path: str | Path, mode: str, write: Callable[[IO], Any]) -> None:
    """Write a temporary file beside ``path``, fsync it, rename it over ``path``: a crash
    at any moment leaves either the old file or the new one, whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint dict; a missing, unreadable or corrupt file is a UserError."""
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
    return ckpt


def load_model(path: str | Path, map_location: str | torch.device = "cpu"):
    """Rebuild the model a checkpoint describes and load its weights."""
    return model_from_checkpoint(load_checkpoint(path, map_location), path).to(map_location)


def model_from_checkpoint(ckpt: dict, path: str | Path):
    """The model of an already loaded checkpoint dict (``path`` only names it in errors),
    for callers that also need the checkpoint's other entries."""
    from .model import DeepSeekMini

    try:
        cfg = model_config_from_dict(ckpt["config"].get("model", {}), f"checkpoint {path}")
    except (ConfigError, AttributeError) as exc:
        raise UserError(f"checkpoint {path} has an unusable model config: {exc}") from None
    model = DeepSeekMini(cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"checkpoint {path} does not match its model config: {first}") from None
    return model


def rng_state() -> dict[str, Any]:
    """Every random generator a run may draw from, in a weights_only-loadable form."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                  "cached_gaussian": float(np_gauss)},
        "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32),
                         np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def config_differences(saved: dict[str, Any], current: dict[str, Any],
                       prefix: str) -> list[str]:
    """``prefix.key: saved -> current`` for each key whose value differs."""
    keys = sorted(set(saved) | set(current))
    return [f"{prefix}.{k}: {saved.get(k)!r} -> {current.get(k)!r}"
            for k in keys if saved.get(k) != current.get(k)]
