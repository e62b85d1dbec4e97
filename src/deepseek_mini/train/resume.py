"""What a resumed run may change, and how its schedule continues.

A resume continues the run that was started: the settings that make it that run (the
model, the data and how it is split and tokenized, the seed) stay as they were unless
the user says ``--allow-changes``; schedule, logging and checkpoint settings may change,
and every change is listed. The model can never change: the weights would not fit (but
for ``model.dropout``, which shapes no weight: a change of what the run is); nor
can ``train.optimizer``: the saved optimizer state would not fit (a warm start from the
checkpoint keeps the weights with a fresh optimizer).

Raising (or lowering) ``train.max_steps`` on resume does not re-stretch the cosine: the
decay keeps the horizon the run started with (``train.decay_steps``) and the steps past
it run at ``min_lr``, so the learning rate never rises again. Setting
``train.decay_steps`` on the command line is how to ask for a new horizon.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..checkpoint import config_differences
from ..config import TRAINING_MODEL_KEYS, Config
from ..errors import UserError

# Data keys that do not change which tokens the run sees, in which order.
DATA_FREE = frozenset({"cache_dir", "num_workers"})
IDENTITY_TRAIN = frozenset({"seed"})


def run_changes(saved: dict[str, Any], cfg: Config) -> tuple[list[str], list[str]]:
    """(changes that alter what the run is, other changes), each ``key: old -> new``."""
    current = cfg.to_dict()
    identity: list[str] = []
    other: list[str] = []
    for section in ("model", "data", "train"):
        old, new = saved.get(section, {}), current[section]
        if section == "model":  # the rest of it must match (state.resume_checkpoint)
            old = {k: v for k, v in old.items() if k in TRAINING_MODEL_KEYS}
            new = {k: v for k, v in new.items() if k in TRAINING_MODEL_KEYS}
        free = (DATA_FREE if section == "data" else set() if section == "model"
                else set(new) - IDENTITY_TRAIN)
        for key in sorted(set(old) | set(new)):
            if old.get(key, new.get(key)) == new.get(key):
                continue  # equal, or a key the saved config predates at its default
            target = other if key in free else identity
            target.extend(config_differences({key: old.get(key)}, {key: new.get(key)},
                                             section))
    return identity, other


def check_changes(saved: dict[str, Any], cfg: Config, allow_changes: bool) -> list[str]:
    """Every change from the saved config, listed; a change of what the run is raises
    unless ``allow_changes``."""
    _check_optimizer(saved, cfg)
    identity, other = run_changes(saved, cfg)
    if identity and not allow_changes:
        raise UserError(f"--resume would change what the run is: {'; '.join(identity)} "
                        "(drop these settings to continue the run as it was, or pass "
                        "--allow-changes)")
    return identity + other


def _check_optimizer(saved: dict[str, Any], cfg: Config) -> None:
    old = saved.get("train", {}).get("optimizer", "adamw")
    if old != cfg.train.optimizer:
        raise UserError(f"--resume cannot change train.optimizer ({old} -> "
                        f"{cfg.train.optimizer}): the checkpoint holds {old}'s state; to go on "
                        f"from its weights with {cfg.train.optimizer}, start a new run with "
                        "train.warm_start=PATH/latest.pt")


def val_windows(cfg: Config) -> int:
    """How many fixed validation windows a new run scores: ``train.eval_batches`` batches
    of ``train.batch_size`` (the global batch), whatever ``micro_batch_size``, processes
    or expert parallelism; they are scored a micro batch at a time."""
    return cfg.train.eval_batches * cfg.train.batch_size


def kept_val_windows(ckpt: dict[str, Any], cfg: Config, path: Any) -> tuple[int, str | None]:
    """The validation windows a resumed run goes on scoring, so ``best.pt`` compares CE
    over one set of windows: the count the checkpoint saved, or for a checkpoint from
    before it was saved, the ``micro_batch_size x eval_batches`` it validated on; and a
    note when the config now asks for another count."""
    count = ckpt.get("val_windows")
    if count is None:
        old = ckpt["config"].get("train", {})
        count = old.get("micro_batch_size", 8) * old.get("eval_batches", 20)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise UserError(f"--resume: {path} is damaged: val_windows is {count!r}, not a count")
    asked = val_windows(cfg)
    note = (None if asked == count else
            f"validation keeps this run's {count} windows (train.eval_batches x "
            f"train.batch_size now gives {asked}), so its CE and best.pt stay comparable")
    return count, note


def keep_schedule(saved: dict[str, Any], cfg: Config) -> Config:
    """``cfg`` with the decay horizon the run started with, unless ``cfg`` sets a new one."""
    old = saved.get("train", {})
    horizon = old.get("decay_steps") or old.get("max_steps")
    if cfg.train.decay_steps is not None or horizon is None:
        return cfg
    if horizon == cfg.train.max_steps:
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, decay_steps=horizon))
