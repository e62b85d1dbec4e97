"""A run's state: everything the training loop mutates, and its checkpoint.

``Run`` holds the model, optimizer, schedule, scaler, sampler, random generators, log
window and counters; ``state_dict`` is ``latest.pt``'s contents (the format is
checkpoint.py's), so ``--resume`` continues as if the run had never stopped: on CPU in
fp32 the losses match bit for bit. Resume and warm-start loading are here too.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checkpoint import (
    all_finite,
    config_differences,
    load_checkpoint,
    missing_training_state,
    state_tensors,
    weights_checkpoint,
)
from ..config import Config
from ..errors import UserError
from ..expert_usage import CollapseWatch
from ..files import BEST, LATEST, atomic_save
from ..interop.hf_import import HF_PREFIX, import_deepseek_v3
from ..interop.warm_start import warm_start_model
from ..model.transformer import DeepSeekMini
from .distributed import Parallel, Ranks
from .log_window import LogWindow
from .optim import base_lrs
from .precision import Precision


@dataclass
class Run:
    """Everything the loop mutates, in one place, so saving and restoring it is plain."""

    cfg: Config
    parallel: Parallel
    precision: Precision
    model: DeepSeekMini
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: Any
    window: LogWindow
    watch: CollapseWatch
    step: int = 0
    tokens_seen: int = 0
    best_val: float | None = None
    last_val: float | None = None
    last_loss: float | None = None
    elapsed_before: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    @property
    def ranks(self) -> Ranks:
        return self.parallel.ranks

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.train.out_dir)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's contents; under FSDP a collective that fills rank 0's only."""
        model_state, optim_state = self.parallel.full_state(self.model, self.optimizer)
        return {
            "model": model_state,
            "optimizer": optim_state,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.precision.scaler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": rng_state(),
            "config": self.cfg.to_dict(),
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "best_val": self.best_val,
            "elapsed_s": self.elapsed(),
            "log_window": self.window.state_dict(),
            "collapse_watch": self.watch.state_dict(),
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.parallel.load_full_state(self.model, self.optimizer, ckpt["model"],
                                      ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self._follow_config_lr()
        self.precision.scaler.load_state_dict(ckpt["scaler"])
        self.sampler.load_state_dict(ckpt["sampler"])
        set_rng_state(ckpt["rng"])
        self.step = ckpt["step"]
        self.tokens_seen = ckpt["tokens_seen"]
        self.best_val = ckpt["best_val"]
        self.elapsed_before = ckpt["elapsed_s"]
        self.window.load_state_dict(ckpt["log_window"])
        self.watch.load_state_dict(ckpt["collapse_watch"])

    def _follow_config_lr(self) -> None:
        """The loaded schedule takes the config's ``lr`` (and ``muon_lr``): LambdaLR
        restores the base rates it saved, which would ignore a rate changed on resume.
        The same product LambdaLR computes, so an unchanged config resumes bit for bit."""
        self.scheduler.base_lrs = base_lrs(self.optimizer, self.cfg.train)
        rates = [base * fn(self.scheduler.last_epoch)
                 for base, fn in zip(self.scheduler.base_lrs, self.scheduler.lr_lambdas,
                                     strict=True)]
        for group, base, rate in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                     rates, strict=True):
            group["initial_lr"], group["lr"] = base, rate
        self.scheduler._last_lr = rates


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


def _local_state_finite(run: Run) -> bool:
    """This rank's weights and optimizer state are finite (its shards, under FSDP)."""
    tensors = [*run.model.parameters(), *run.model.buffers(),
               *state_tensors(list(run.optimizer.state.values()))]
    return all_finite(t.to_local() if hasattr(t, "to_local") else t for t in tensors)


def resume_checkpoint(cfg: Config, out_dir: Path) -> dict[str, Any]:
    path = out_dir / LATEST
    if not path.is_file():
        raise UserError(f"--resume: no checkpoint to resume from at {path} "
                        "(train without --resume to start a run)")
    ckpt = load_checkpoint(path)
    missing = missing_training_state(ckpt)
    if missing:
        raise UserError(f"--resume: {path} holds no training state ({', '.join(missing)} "
                        "missing); to start from its weights use train.warm_start instead")
    _check_model_config(ckpt, cfg, path)
    return ckpt


def _check_model_config(ckpt: dict[str, Any], cfg: Config, path: Path) -> None:
    saved = ckpt["config"].get("model", {}) if isinstance(ckpt["config"], dict) else {}
    differences = config_differences(saved, cfg.to_dict()["model"], "model")
    if differences:
        raise UserError(f"checkpoint {path} was trained with a different model: "
                        f"{'; '.join(differences)}")


def initial_model(cfg: Config, ckpt: dict[str, Any] | None) -> DeepSeekMini:
    """Fresh weights, or a warm start's; a resumed run's weights come later, with the rest."""
    source = cfg.train.warm_start
    if ckpt is not None or source is None:
        return DeepSeekMini(cfg.model)
    if source == "smollm2":
        return warm_start_model(cfg)
    if source.startswith(HF_PREFIX):
        return _hf_warm_start(cfg, source.removeprefix(HF_PREFIX))
    path = Path(source)
    warm = load_checkpoint(path)
    _check_model_config(warm, cfg, path)
    model = DeepSeekMini(cfg.model)
    model.load_state_dict(warm["model"])
    return model


def _hf_warm_start(cfg: Config, folder: str) -> DeepSeekMini:
    """A transformers DeepseekV3 folder's weights; the run's model config must be the
    folder's (``deepseek-mini warm-start --source DIR`` writes one that is)."""
    model = import_deepseek_v3(folder, cfg.model)
    differences = config_differences(dataclasses.asdict(model.config),
                                     dataclasses.asdict(cfg.model), "model")
    if differences:
        raise UserError(f"train.warm_start {HF_PREFIX}{folder}: the folder's model differs from "
                        f"the config's: {'; '.join(differences)}")
    return model


def save(run: Run, best: bool, latest: bool) -> None:
    """Write ``best.pt`` and / or ``latest.pt``; a collective under FSDP, so every rank
    calls it and rank 0 writes. ``best.pt`` is for using the model: weights, config
    (whose data.tokenizer names the tokenizer), step and validation CE, a third of
    ``latest.pt``'s size; only ``latest.pt`` carries the state a resume needs. A model
    with a non-finite weight or optimizer state is never saved: the files from the last
    good save stay, and the run ends with an error."""
    if run.parallel.any(not _local_state_finite(run)):
        kept = [name for name, wanted in ((BEST, best), (LATEST, latest))
                if wanted and (run.out_dir / name).exists()]
        raise UserError(f"refusing to save step {run.step}: the model's weights or optimizer "
                        f"state hold inf or NaN (train.lr is {run.cfg.train.lr:g}); "
                        + (f"{' and '.join(str(run.out_dir / k) for k in kept)} from the last "
                           "good save kept" if kept else "nothing was written"))
    state = run.state_dict()  # on every rank: under FSDP it gathers the shards
    if not run.ranks.is_main:
        return
    if best:
        atomic_save(weights_checkpoint(state["model"], state["config"], step=state["step"],
                                       best_val=state["best_val"]), run.out_dir / BEST)
    if latest:
        atomic_save(state, run.out_dir / LATEST)
