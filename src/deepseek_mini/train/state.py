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
    check_finite,
    config_differences,
    load_checkpoint,
    missing_training_state,
    state_dict_mismatch,
    state_tensors,
    weights_checkpoint,
)
from ..config import TRAINING_MODEL_KEYS, Config
from ..data.frequent_ids import most_frequent_ids
from ..errors import UserError
from ..expert_usage import CollapseWatch
from ..files import BEST, DIVERGED, LATEST, atomic_save
from ..interop.hf_import import HF_PREFIX, import_deepseek_v3
from ..interop.warm_start import warm_start_model
from ..model.transformer import DeepSeekMini, load_weights
from .distributed import Parallel, Ranks
from .log_window import LogWindow
from .muon import MuonWithAdamW
from .optim import base_lrs, lr_keys
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
    saved_step: int = 0  # the step of the last good save (a resume's checkpoint counts)
    saved_skips: int = 0  # non-finite steps skipped in all by then
    val_windows: int = 0  # the run's fixed validation windows (resume.val_windows)

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
            "val_windows": self.val_windows,
        }

    def load_state_dict(self, ckpt: dict[str, Any], path: str | Path = LATEST) -> None:
        """Restore a ``latest.pt``; an entry that does not fit this run (a crafted or
        damaged file) is a UserError naming the entry, never a traceback deep in torch."""
        try:
            check_training_state(ckpt, self.model, self.optimizer, path)
        except (TypeError, AttributeError, KeyError) as exc:  # entries of the wrong kinds
            raise UserError(f"--resume: {path} is damaged: its training state is not what "
                            f"a run saves ({_first_line(exc)})") from None
        loads = (
            ("model / optimizer", lambda: self.parallel.load_full_state(
                self.model, self.optimizer, ckpt["model"], ckpt["optimizer"])),
            ("scheduler", lambda: self.scheduler.load_state_dict(ckpt["scheduler"])),
            ("scheduler", self._follow_config_lr),
            ("scaler", lambda: self.precision.scaler.load_state_dict(ckpt["scaler"])),
            ("sampler", lambda: self.sampler.load_state_dict(ckpt["sampler"])),
            ("rng", lambda: set_rng_state(ckpt["rng"])),
            ("log_window", lambda: self.window.load_state_dict(ckpt["log_window"])),
            ("collapse_watch", lambda: self.watch.load_state_dict(ckpt["collapse_watch"])),
        )
        for entry, load in loads:
            try:
                load()
            except (KeyError, TypeError, ValueError, IndexError, AttributeError,
                    RuntimeError) as exc:
                raise UserError(f"--resume: {path} is damaged: its {entry!r} entry cannot be "
                                f"restored ({_first_line(exc)})") from None
        self.step = ckpt["step"]
        self.tokens_seen = ckpt["tokens_seen"]
        self.best_val = ckpt["best_val"]
        self.elapsed_before = ckpt["elapsed_s"]

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


def check_training_state(ckpt: dict[str, Any], model: DeepSeekMini,
                         optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """The counters and the shapes of a ``latest.pt``'s entries, checked before any is
    loaded: torch accepts an optimizer state of other shapes (the fused step then aborts
    the process) and a negative or absurd step silently. Shapes are the whole model's, as
    the checkpoint holds them, whatever share of it this rank keeps (FSDP, experts)."""
    def damaged(why: str) -> UserError:
        return UserError(f"--resume: {path} is damaged: {why}")

    with torch.device("meta"):  # the single-process model's shapes, nothing allocated
        whole = DeepSeekMini(model.config).state_dict()
    full = {name: tuple(t.shape) for name, t in whole.items()}
    mismatch = state_dict_mismatch(whole, ckpt["model"])
    if mismatch is not None:
        raise damaged(f"its model does not fit the config: {mismatch}")
    for name in ("step", "tokens_seen"):
        value = ckpt[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise damaged(f"{name} is {value!r}, not a count")
    saved_max = ckpt["config"].get("train", {}).get("max_steps")
    scheduled = ckpt["scheduler"].get("last_epoch") if isinstance(ckpt["scheduler"],
                                                                  dict) else None
    if scheduled != ckpt["step"] or (isinstance(saved_max, int) and ckpt["step"] > saved_max):
        raise damaged(f"step {ckpt['step']} does not agree with its schedule (at step "
                      f"{scheduled}) and its train.max_steps ({saved_max})")
    for name in ("best_val", "elapsed_s"):
        value = ckpt[name]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise damaged(f"{name} is {value!r}, not a number")
    if not isinstance(ckpt["sampler"], dict) or not all(
            isinstance(ckpt["sampler"].get(k), int) and ckpt["sampler"][k] >= 0
            for k in ("epoch", "position")):
        raise damaged("its sampler state has no epoch and position counts")
    names = {id(p): name for name, p in model.named_parameters()}
    for state, part in _optimizer_parts(ckpt["optimizer"], optimizer, damaged):
        _check_optimizer_state(state, part, damaged,
                               lambda p: full.get(names.get(id(p), ""), tuple(p.shape)))


def _optimizer_parts(state: Any, optimizer: torch.optim.Optimizer, damaged
                     ) -> list[tuple[Any, torch.optim.Optimizer]]:
    """(saved state, optimizer) pairs to check: Muon-with-AdamW saves its two optimizers'
    states side by side (its expert views have no name: their shape is their own)."""
    if not isinstance(optimizer, MuonWithAdamW):
        return [(state, optimizer)]
    if not isinstance(state, dict) or set(state) != {"adamw", "muon"}:
        raise damaged("its optimizer state is not Muon-with-AdamW's (adamw and muon parts)")
    return [(state["adamw"], optimizer.adamw), (state["muon"], optimizer.muon)]


def _check_optimizer_state(state: Any, optimizer: torch.optim.Optimizer, damaged,
                           shape_of) -> None:
    """The saved optimizer's groups hold as many parameters as this run's, and each
    parameter's moments have its (whole) shape, ``shape_of(param)``."""
    groups = state.get("param_groups") if isinstance(state, dict) else None
    per_param = state.get("state") if isinstance(state, dict) else None
    ours = [group["params"] for group in optimizer.param_groups]
    if (not isinstance(groups, list) or not isinstance(per_param, dict)
            or [len(g.get("params", ())) if isinstance(g, dict) else -1 for g in groups]
            != [len(p) for p in ours]):
        raise damaged(f"its optimizer state does not have this run's {len(ours)} parameter "
                      f"group(s) of {', '.join(str(len(p)) for p in ours)} parameters")
    params = [p for group in ours for p in group]
    ids = [i for g in groups for i in g["params"]]
    for index, param in zip(ids, params, strict=True):
        entry = per_param.get(index, {})
        shape = shape_of(param)
        for key, value in (entry.items() if isinstance(entry, dict) else [("", None)]):
            if not isinstance(value, torch.Tensor) or (
                    value.dim() and tuple(value.shape) != shape):
                raise damaged(f"its optimizer state {key!r} of parameter {index} is not a "
                              f"tensor of the parameter's shape {list(shape)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
    _check_model_config(ckpt, cfg, path, free=TRAINING_MODEL_KEYS)  # resume.py lists those
    check_finite(ckpt, path, state=True)  # else NaN steps, then train.lr would be blamed
    return ckpt


def _saved_model_config(ckpt: dict[str, Any]) -> dict[str, Any]:
    return ckpt["config"].get("model", {}) if isinstance(ckpt["config"], dict) else {}


def _check_model_config(ckpt: dict[str, Any], cfg: Config, path: Path,
                        free: tuple[str, ...] = ()) -> None:
    """The checkpoint's model is the config's, but for the keys in ``free``."""
    saved = {k: v for k, v in _saved_model_config(ckpt).items() if k not in free}
    current = {k: v for k, v in cfg.to_dict()["model"].items() if k not in free}
    differences = config_differences(saved, current, "model")
    if differences:
        raise UserError(f"checkpoint {path} was trained with a different model: "
                        f"{'; '.join(differences)}")


def initial_model(cfg: Config, ckpt: dict[str, Any] | None,
                  train_tokens: np.ndarray) -> DeepSeekMini:
    """Fresh weights, or a warm start's; a resumed run's weights come later, with the rest
    (its trimmed head's ids too). A trimmed head (``model.head_vocab``) keeps the most
    frequent ids of ``train_tokens`` unless a warm start's checkpoint brings its own."""
    source = cfg.train.warm_start
    if ckpt is not None:
        return DeepSeekMini(cfg.model)
    has_ids = False
    if source is None:
        model = DeepSeekMini(cfg.model)
    elif source == "smollm2":
        model = warm_start_model(cfg)
    elif source.startswith(HF_PREFIX):
        model = _hf_warm_start(cfg, source.removeprefix(HF_PREFIX))
    else:
        model, has_ids = _checkpoint_warm_start(cfg, Path(source))
    if model.head is not None and not has_ids:
        model.head.set_ids(most_frequent_ids(train_tokens, cfg.model.head_vocab,
                                             cfg.model.vocab_size))
    return model


def _checkpoint_warm_start(cfg: Config, path: Path) -> tuple[DeepSeekMini, bool]:
    """A checkpoint's weights, and whether they bring the trimmed head's: a checkpoint
    trained with another ``model.head_vocab`` gives its trunk and embedding, the head's
    ids and "other" vector start afresh."""
    warm = load_checkpoint(path)
    _check_model_config(warm, cfg, path, free=("head_vocab", *TRAINING_MODEL_KEYS))
    check_finite(warm, path)
    same_head = _saved_model_config(warm).get("head_vocab") == cfg.model.head_vocab
    return _with_weights(cfg, warm["model"], same_head, f"train.warm_start {path}"), same_head


def _with_weights(cfg: Config, state: dict[str, torch.Tensor], same_head: bool,
                  what: str) -> DeepSeekMini:
    """``DeepSeekMini(cfg.model)`` holding ``state``; unless ``same_head``, the trimmed
    head's own entries (``head.*``) are the new model's, not the state's. A state that
    does not fit names its first tensor at fault (``what`` names its origin)."""
    model = DeepSeekMini(cfg.model)
    if not same_head:
        own = {k: v for k, v in model.state_dict().items() if k.startswith("head.")}
        state = {**{k: v for k, v in state.items() if not k.startswith("head.")}, **own}
    load_weights(model, state, what)
    return model


def _hf_warm_start(cfg: Config, folder: str) -> DeepSeekMini:
    """A transformers DeepseekV3 folder's weights; the run's model config must be the
    folder's (``deepseek-mini warm-start --source DIR`` writes one that is), but for a
    trimmed head, which a DeepseekV3 folder never has."""
    full_head = dataclasses.replace(cfg.model, head_vocab=0)
    model = import_deepseek_v3(folder, full_head)
    if cfg.model.head_vocab:
        model = _with_weights(cfg, model.state_dict(), same_head=False,
                              what=f"train.warm_start {HF_PREFIX}{folder}")
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
                        f"state hold inf or NaN ({lr_keys(run.cfg.train)}); "
                        + (f"{' and '.join(str(run.out_dir / k) for k in kept)} from the last "
                           "good save kept" if kept else "nothing was written"))
    skipped = int(run.window.skipped_total) - run.saved_skips
    state = run.state_dict()  # on every rank: under FSDP it gathers the shards
    if skipped:
        _refuse_diverged(run, state, skipped)
    run.saved_step, run.saved_skips = run.step, int(run.window.skipped_total)
    if not run.ranks.is_main:
        return
    if best:
        atomic_save(weights_checkpoint(state["model"], state["config"], step=state["step"],
                                       best_val=state["best_val"]), run.out_dir / BEST)
    if latest:
        atomic_save(state, run.out_dir / LATEST)


def _lr_names(run: Run) -> str:
    tcfg = run.cfg.train
    return "train.muon_lr" if tcfg.optimizer == "muon" and tcfg.muon_lr is not None else "train.lr"


def _refuse_diverged(run: Run, state: dict[str, Any], skipped: int) -> None:
    """A run that skipped non-finite steps since its last good save has diverged, even
    when its weights are still finite (a huge learning rate leaves them at 1e28): its
    state goes to ``diverged.pt`` beside the good ``latest.pt`` / ``best.pt``, which stay,
    and the run ends with an error saying so."""
    out, steps = run.out_dir, run.step - run.saved_step
    since = (f"the last save (step {run.saved_step})" if run.saved_step else
             "the start of the run")
    count = f"all {steps} steps" if skipped == steps else f"{skipped} of the {steps} steps"
    weights = [t.abs().max() for t in state["model"].values()
               if t.is_floating_point() and t.numel()]
    largest = f"; the largest weight is {float(max(weights)):.3g}" if weights else ""
    kept = [str(out / name) for name in (LATEST, BEST) if (out / name).exists()]
    if run.ranks.is_main:
        atomic_save(state, out / DIVERGED)
    raise UserError(f"the run diverged: {count} since {since} were skipped because the loss "
                    f"or gradient was not finite ({lr_keys(run.cfg.train)}, the "
                    f"schedule at {run.scheduler.get_last_lr()[0]:.3g}){largest}; "
                    + (f"{' and '.join(kept)} kept" if kept else "no earlier checkpoint")
                    + f", step {run.step}'s state written to {out / DIVERGED} instead: lower "
                    f"{_lr_names(run)} or try train.precision=fp32 (or, if it recovered, "
                    "rename it "
                    f"{LATEST} and --resume)")
