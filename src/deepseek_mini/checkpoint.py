"""The checkpoint format, in one place: what a checkpoint holds, and reading one safely.

A checkpoint is a plain dict of tensors and primitives. Every checkpoint has ``model``
(the state dict) and ``config`` (the run's config as a dict, whose ``data.tokenizer``
names the tokenizer); a training checkpoint (``latest.pt``) also has the
``TRAINING_STATE`` entries that ``--resume`` needs (train/state.py fills and reads
them). ``best.pt`` and warm-start files are weights checkpoints: model and config, plus
a few primitives (``step``, ``best_val``). Writing is ``files.atomic_save``; reading
is ``torch.load(weights_only=True)``, which refuses anything that could run code. A
checkpoint never holds a non-finite weight: ``all_finite`` is the check, made before a
save and after a load.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .config import ConfigError, ModelConfig, model_config_from_dict, upgrade_model_dict
from .errors import UserError

TRAINING_STATE = frozenset({"optimizer", "scheduler", "scaler", "sampler", "rng", "step",
                            "tokens_seen", "best_val", "elapsed_s", "log_window",
                            "collapse_watch"})


# The model's only tensors that are not floating point: the trimmed head's kept ids.
INTEGER_TENSORS = frozenset({"head.ids"})
# The floating-point types a checkpoint's weights and training state may have.
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def weights_checkpoint(model_state: dict[str, Any], config: dict[str, Any],
                       **extra: Any) -> dict[str, Any]:
    """A checkpoint without training state: what warm start and ``best.pt`` hold."""
    return {"model": model_state, "config": config, **extra}


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint dict; a missing, unreadable or corrupt file is a UserError. A
    config stored before a key was renamed comes back in today's keys."""
    import torch

    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # torch's warnings are not the user's business here
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # Not torch's advice to retry with weights_only=False: that would run the payload.
        raise UserError(f"cannot load checkpoint {path}: it is not a deepseek-mini checkpoint, "
                        "or is corrupt (it holds Python objects other than tensors and plain "
                        "data)") from None
    except PermissionError:
        raise UserError(f"cannot read checkpoint {path}: permission denied") from None
    except Exception as exc:  # noqa: BLE001 - junk bytes raise KeyError, IndexError, ... too
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load checkpoint {path}: {first}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"checkpoint {path} is not a deepseek-mini checkpoint "
                        "(no 'model' or 'config' entry)")
    model = ckpt["model"]
    if not isinstance(model, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()):
        raise UserError(f"checkpoint {path} is not a deepseek-mini checkpoint (its 'model' "
                        "entry is not a state dict of named tensors)")
    # load_state_dict would cast integer or boolean values into float weights (or floats
    # into the id list) without a word.
    odd = next((k for k, v in model.items()
                if v.is_floating_point() == (k in INTEGER_TENSORS)), None)
    if odd is not None:
        kind = "integer" if odd in INTEGER_TENSORS else "floating point"
        raise UserError(f"checkpoint {path} is not a deepseek-mini checkpoint: its tensor "
                        f"{odd} is {str(model[odd].dtype).removeprefix('torch.')}, where it is "
                        f"{kind}")
    problem = next((f"its tensor {name} {why}" for name, t in model.items()
                    if (why := unusable_tensor(t)) is not None), None)
    problem = problem or _head_ids_problem(model, ckpt["config"])
    if problem is not None:
        raise UserError(f"checkpoint {path} cannot be used: {problem}")
    config = ckpt["config"]
    where = ("" if not isinstance(config, dict) else
             next((f"'s {name!r} section" for name in ("model", "data", "train")
                   if not isinstance(config.get(name, {}), dict)), None))
    if where is not None:
        raise UserError(f"checkpoint {path} is not a deepseek-mini checkpoint (its "
                        f"config{where} is not a mapping)")
    if "model" in config:
        ckpt["config"] = {**config, "model": upgrade_model_dict(config["model"])}
    return ckpt


def unusable_tensor(t: Any) -> str | None:
    """Why a loaded tensor cannot be a weight or training state, in a phrase; None when it
    can. ``torch.load`` takes sparse (COO, CSR, ...) and meta tensors and 8-bit floats,
    which neither the finiteness check nor the model's layers can read."""
    import torch

    if t.layout != torch.strided:
        return f"is sparse ({str(t.layout).removeprefix('torch.')}), not a dense tensor"
    if t.is_meta:
        return "holds no data (a meta tensor)"
    dtype = str(t.dtype).removeprefix("torch.")
    if t.is_floating_point() and dtype not in FLOAT_DTYPES:
        return f"is {dtype}, not one of {', '.join(FLOAT_DTYPES)}"
    return None


def _head_ids_problem(model: dict[str, Any], config: Any) -> str | None:
    """What is wrong with a trimmed head's kept ids (``head.ids``): they must be distinct
    ids of the vocabulary, or the head would index outside its tables (an IndexError at
    the first token) or score one id twice."""
    ids = model.get("head.ids")
    if ids is None:
        return None
    vocab = config.get("model", {}).get("vocab_size") if isinstance(config, dict) else None
    if ids.dim() != 1:
        return f"its tensor head.ids has shape {list(ids.shape)}, where it is a list of ids"
    if not ids.numel():
        return None
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (isinstance(vocab, int) and high >= vocab):
        bad = low if low < 0 else high
        return (f"its tensor head.ids holds the id {bad}, outside the vocabulary "
                f"(0 to {vocab - 1 if isinstance(vocab, int) else 'vocab_size - 1'})")
    if ids.unique().numel() != ids.numel():
        return "its tensor head.ids holds an id more than once: the kept ids must be distinct"
    return None


def state_dict_mismatch(expected: dict[str, Any], given: dict[str, Any]) -> str | None:
    """The first way ``given`` (a state dict) does not fit a model whose state dict is
    ``expected``, in one phrase naming the tensor; None when it fits. What
    ``load_state_dict`` would say over many lines, under a heading that names none."""
    for name, tensor in expected.items():
        if name not in given:
            return f"tensor {name} is missing"
        if tuple(given[name].shape) != tuple(tensor.shape):
            return (f"tensor {name} has shape {list(given[name].shape)}, the model's is "
                    f"{list(tensor.shape)}")
    extra = next((name for name in given if name not in expected), None)
    return None if extra is None else f"tensor {extra} is not one of the model's"


def all_finite(tensors: Iterable[Any]) -> bool:
    """Whether every floating-point tensor among ``tensors`` is free of inf and NaN.

    It runs before every save over all weights and optimizer state, so it must be cheap:
    each tensor's min and max (``aminmax``, which propagates NaN and cannot overflow as a
    sum or a 2-norm could) stay on the device, are stacked, and the verdict is read once
    per device, not a host sync per tensor; a fused ``_foreach_norm`` with ord=inf cost
    more than the save itself on CPU (BENCHMARKS.md, "Reliability costs")."""
    import torch

    by_device: dict[Any, list[torch.Tensor]] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            by_device.setdefault(t.device, []).append(t.detach())
    verdicts = [torch.cat([torch.stack(torch.aminmax(t)).double() for t in group])
                .isfinite().all() for group in by_device.values()]
    return all(bool(v) for v in verdicts)


def check_finite(ckpt: dict[str, Any], path: str | Path, state: bool = False) -> None:
    """Refuse a checkpoint with an inf or NaN weight (and, with ``state``, optimizer
    state): training never saves one, so it was made elsewhere or broken since, and a
    model built from it computes only NaN."""
    tensors = list(ckpt["model"].values())
    if state:
        optimizer = [t for t in state_tensors(ckpt.get("optimizer")) if _is_tensor(t)]
        problem = next((why for t in optimizer if (why := unusable_tensor(t)) is not None),
                       None)
        if problem is not None:
            raise UserError(f"checkpoint {path} cannot be resumed: a tensor of its optimizer "
                            f"state {problem}")
        tensors += optimizer
    if not all_finite(tensors):
        raise UserError(f"checkpoint {path} holds non-finite weights (inf or NaN)"
                        + (" or optimizer state" if state else "")
                        + ": it was saved from a diverged run and cannot be used")


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def state_tensors(state: Any) -> Iterable[Any]:
    """Every tensor inside a nested dict / list state (a state dict, an optimizer's)."""
    if isinstance(state, dict):
        for value in state.values():
            yield from state_tensors(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from state_tensors(value)
    else:
        yield state


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
