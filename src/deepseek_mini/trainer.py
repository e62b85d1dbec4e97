"""The training loop: ``deepseek-mini train`` and ``train(cfg)``.

One optimizer step takes the global batch of ``train.batch_size`` sequences from the
seeded sampler, splits it into micro batches for gradient accumulation, clips the
gradient norm and steps AdamW on the warm-up + cosine schedule. Losses and statistics
stay on the device between log lines, so the host waits on the device only when it
prints. Everything a run depends on (weights, optimizer, schedule, scaler, sampler
position, random generators, log window, counters) is in ``latest.pt``, so ``--resume``
continues as if the run had never stopped: on CPU in fp32 the losses match bit for bit.

Under torchrun (``train.parallel``: ddp or fsdp, distributed.py) each rank takes its
contiguous share of the same global batch and splits it into micro batches; gradients,
losses and validation are averaged over ranks, every rank computes and rank 0 alone
writes, so checkpoints and metrics read as a single process's.
"""

from __future__ import annotations

import argparse
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import (
    atomic_save,
    atomic_write_text,
    config_differences,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from .config import Config
from .distributed import Parallel, Ranks, setup
from .errors import UserError
from .expert_usage import CollapseWatch, ExpertUsage
from .mfu import format_flops, measure_matmul_peak
from .model import DeepSeekMini, compile_model
from .optim import build_optimizer, build_scheduler
from .precision import Precision, setup_precision
from .runlog import METRICS_FILE, RunLog, continue_metrics
from .sizes import flops_per_token

LATEST = "latest.pt"
BEST = "best.pt"
MAX_NONFINITE_STREAK = 10
TRAINING_STATE = {"optimizer", "scheduler", "scaler", "sampler", "rng", "step", "tokens_seen",
                  "best_val", "elapsed_s", "log_window", "collapse_watch"}
SAMPLE_SUMMARY = "Tom loses his ball at the park, and Lily helps him find it."
SAMPLE_WORDS = "kick, ball, happy"
SAMPLE_FEATURES = "Dialogue"
SAMPLE_TOKENS = 100


@dataclass
class TrainResult:
    step: int
    tokens_seen: int
    best_val: float | None
    last_val: float | None
    last_loss: float | None
    interrupted: bool
    out_dir: Path


@dataclass
class LogWindow:
    """Device-side sums over the steps since the last log line (the only place they are
    read), kept in checkpoints so a resumed run prints the same averages."""

    sums: torch.Tensor  # loss, ce, aux, balance_loss, z_loss, grad_norm over finite steps
    finite_steps: torch.Tensor
    skipped_total: torch.Tensor
    streak: torch.Tensor  # non-finite steps in a row
    steps: int = 0
    tokens_timed: int = 0
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def zeros(cls, device: torch.device) -> LogWindow:
        return cls(torch.zeros(6, dtype=torch.float64, device=device),
                   torch.zeros((), dtype=torch.int64, device=device),
                   torch.zeros((), dtype=torch.int64, device=device),
                   torch.zeros((), dtype=torch.int64, device=device))

    def add(self, stats: torch.Tensor, finite: torch.Tensor, tokens: int) -> None:
        self.sums += torch.where(finite, stats.double(), 0.0)
        self.finite_steps += finite
        self.skipped_total += ~finite
        self.streak.copy_((self.streak + 1) * ~finite)
        self.steps += 1
        self.tokens_timed += tokens

    def reset(self) -> None:
        self.sums.zero_()
        self.finite_steps.zero_()
        self.steps = 0
        self.tokens_timed = 0
        self.started = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self.sums.cpu(), "finite_steps": int(self.finite_steps),
                "skipped_total": int(self.skipped_total), "streak": int(self.streak),
                "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums.copy_(state["sums"])
        self.finite_steps.fill_(state["finite_steps"])
        self.skipped_total.fill_(state["skipped_total"])
        self.streak.fill_(state["streak"])
        self.steps = state["steps"]


class StopRequest:
    """SIGINT / SIGTERM ask the loop to finish its step, save and stop; a second signal
    interrupts at once (the checkpoint writes are atomic, so that is safe too).

    A second signal within ``ECHO_WINDOW_S`` of the first counts as the same request: under
    torchrun, Ctrl-C reaches each worker from the terminal and again from torchrun."""

    ECHO_WINDOW_S = 1.0

    def __init__(self, log: RunLog) -> None:
        self.log = log
        self.requested: str | None = None
        self.requested_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            if time.monotonic() - self.requested_at < self.ECHO_WINDOW_S:
                return
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        self.requested_at = time.monotonic()
        self.log.info(f"{self.requested}: finishing this step, then saving {LATEST} "
                      "(signal again to stop at once)")


@dataclass
class Run:
    """Everything the loop mutates, in one place, so saving and restoring it is plain."""

    cfg: Config
    parallel: Parallel
    precision: Precision
    model: DeepSeekMini
    train_model: nn.Module
    optimizer: torch.optim.AdamW
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
        self.precision.scaler.load_state_dict(ckpt["scaler"])
        self.sampler.load_state_dict(ckpt["sampler"])
        set_rng_state(ckpt["rng"])
        self.step = ckpt["step"]
        self.tokens_seen = ckpt["tokens_seen"]
        self.best_val = ckpt["best_val"]
        self.elapsed_before = ckpt["elapsed_s"]
        self.window.load_state_dict(ckpt["log_window"])
        self.watch.load_state_dict(ckpt["collapse_watch"])


def train(cfg: Config, resume: bool = False, stop_after: int | None = None) -> TrainResult:
    """Train as ``cfg`` says; with ``resume``, continue from ``out_dir/latest.pt``.

    ``stop_after`` ends this session after that many steps, saving ``latest.pt`` as a
    signal would, without touching the schedule (which still runs to ``max_steps``), so a
    long run can be trained in slices. With ``train.parallel`` ddp or fsdp, this is one
    rank of a torchrun launch.
    """
    if stop_after is not None and stop_after <= 0:
        raise UserError(f"--stop-after must be a positive number of steps, got {stop_after}")
    precision = setup_precision(cfg.train)
    parallel = setup(cfg.train, precision)
    try:
        return _train(cfg, resume, stop_after, precision, parallel)
    finally:
        parallel.close()


def _train(cfg: Config, resume: bool, stop_after: int | None, precision: Precision,
           parallel: Parallel) -> TrainResult:
    from .data import BatchSampler, prepare_data, val_batches

    ranks = parallel.ranks
    out_dir = Path(cfg.train.out_dir)
    ckpt = _resume_checkpoint(cfg, out_dir) if resume else None
    data = prepare_data(cfg, progress=ranks.is_main)
    torch.manual_seed(cfg.train.seed)
    model = _initial_model(cfg, ckpt).to(precision.device)
    train_model = parallel.wrap(model, precision)
    if cfg.train.compile:
        train_model = compile_model(train_model)
    optimizer = build_optimizer(model, cfg.train)
    run = Run(cfg, parallel, precision, model, train_model, optimizer,
              build_scheduler(optimizer, cfg.train),
              BatchSampler(data.train, cfg.data.seq_len, cfg.train.batch_size, cfg.train.seed),
              LogWindow.zeros(precision.device), CollapseWatch())
    if ckpt is not None:
        run.load_state_dict(ckpt)
    if ranks.is_main:
        if resume:
            continue_metrics(out_dir / METRICS_FILE, run.step)
        atomic_write_text(cfg.to_yaml(), out_dir / "config.yaml")
    log = RunLog(out_dir, enabled=ranks.is_main, resume=resume,
                 total_steps=cfg.train.max_steps, start_step=run.step)
    try:
        evals = (val_batches(data.val, cfg.data.seq_len, cfg.train.micro_batch_size,
                             cfg.train.eval_batches)
                 if len(data.val) > cfg.data.seq_len else [])
        stop_step = run.step + stop_after if stop_after is not None else None
        interrupted = _loop(run, log, evals, data.tokenizer, ckpt, stop_step)
    finally:
        log.close()
    return TrainResult(run.step, run.tokens_seen, run.best_val, run.last_val, run.last_loss,
                       interrupted, out_dir)


def _resume_checkpoint(cfg: Config, out_dir: Path) -> dict[str, Any]:
    path = out_dir / LATEST
    if not path.is_file():
        raise UserError(f"--resume: no checkpoint to resume from at {path} "
                        "(train without --resume to start a run)")
    ckpt = load_checkpoint(path)
    missing = sorted(TRAINING_STATE - set(ckpt))
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


def _initial_model(cfg: Config, ckpt: dict[str, Any] | None) -> DeepSeekMini:
    """Fresh weights, or a warm start's; a resumed run's weights come later, with the rest."""
    source = cfg.train.warm_start
    if ckpt is not None or source is None:
        return DeepSeekMini(cfg.model)
    if source == "smollm2":
        from .warm_start import warm_start_model

        return warm_start_model(cfg)
    path = Path(source)
    warm = load_checkpoint(path)
    _check_model_config(warm, cfg, path)
    model = DeepSeekMini(cfg.model)
    model.load_state_dict(warm["model"])
    return model


def _loop(run: Run, log: RunLog, evals: list[torch.Tensor], tokenizer: Any,
          ckpt: dict[str, Any] | None, stop_step: int | None) -> bool:
    """Steps until ``max_steps``, ``stop_step`` or a signal; True when a signal stopped it."""
    cfg, tcfg = run.cfg, run.cfg.train
    tokens_per_step = tcfg.batch_size * cfg.data.seq_len
    flops = flops_per_token(cfg.model, cfg.data.seq_len)
    # Every process drives its own device: the run's peak is the sum.
    peak = measure_matmul_peak(run.precision.device, run.precision.dtype) * run.ranks.world_size
    _announce(run, log, ckpt, peak, flops)
    run.window.started = time.perf_counter()
    stopping = False
    with StopRequest(log) as stop:
        end = tcfg.max_steps if stop_step is None else min(stop_step, tcfg.max_steps)
        while run.step < end and not stopping:
            lr = run.scheduler.get_last_lr()[0]
            batch = run.sampler.next_batch(run.ranks.rank, run.ranks.world_size)
            stats, finite = train_step(run.train_model, run.optimizer, batch,
                                       tcfg.micro_batch_size, tcfg.grad_clip, run.precision,
                                       run.parallel)
            run.scheduler.step()
            run.step += 1
            run.tokens_seen += tokens_per_step
            run.window.add(stats, finite, tokens_per_step)
            last = run.step == tcfg.max_steps
            if run.step % tcfg.log_interval == 0 or run.step == 1 or last:
                _log_train(run, log, lr, flops, peak)
            elif run.step % MAX_NONFINITE_STREAK == 0:
                _check_streak(run)
            log.advance(None if run.last_loss is None else f"loss {run.last_loss:.3f}")
            improved = False
            if evals and (run.step % tcfg.eval_interval == 0 or last):
                improved = _evaluate(run, log, evals)
            if run.step % tcfg.sample_interval == 0 or last:
                _sample(run, log, tokenizer)
            stopping = run.parallel.any(stop.requested is not None)
            save_latest = run.step % tcfg.save_interval == 0 or run.step == end or stopping
            if improved or save_latest:
                _save(run, best=improved, latest=save_latest)
    if stopping:
        log.info(f"stopped by {stop.requested or 'a signal to another process'} at step "
                 f"{run.step}; {LATEST} saved (continue with --resume)")
        return True
    if run.step < tcfg.max_steps:
        log.info(f"paused at step {run.step} of {tcfg.max_steps}; {LATEST} saved "
                 "(continue with --resume)")
        return False
    log.info(f"done: {run.step} steps, {run.tokens_seen:,} tokens, "
             f"{run.elapsed():.1f}s; best val CE {_fmt(run.best_val)}")
    return False


def _announce(run: Run, log: RunLog, ckpt: dict[str, Any] | None, peak: float,
              flops: int) -> None:
    cfg = run.cfg
    n_params = sum(p.numel() for p in run.model.parameters())
    world = run.ranks.world_size
    split = (f"{world} {run.parallel.kind} processes x " if world > 1 else "")
    log.info(f"model: {n_params:,} parameters, {flops:,} train FLOPs/token; "
             f"{run.precision.describe()}; batch {cfg.train.batch_size} x {cfg.data.seq_len} "
             f"({split}{cfg.train.grad_accum_steps // world} micro batches of "
             f"{cfg.train.micro_batch_size})")
    log.info(f"MFU against a measured peak of {format_flops(peak)} "
             f"({run.precision.name} {peak_source(run.precision)}"
             + (f", x {world} processes)" if world > 1 else ")"))
    if ckpt is None and (run.out_dir / LATEST).exists():
        log.info(f"starting afresh in {run.out_dir}: its {LATEST} will be overwritten "
                 "(--resume continues it instead)")
    if ckpt is None and cfg.train.warm_start is not None:
        log.info(f"warm start: model weights from {cfg.train.warm_start}; optimizer, schedule "
                 "and data order start fresh")
    if ckpt is not None:
        changed = [d for section in ("data", "train")
                   for d in config_differences(ckpt["config"].get(section, {}),
                                               cfg.to_dict()[section], section)]
        log.info(f"resumed from {run.out_dir / LATEST} at step {run.step}"
                 + (f"; changed settings: {'; '.join(changed)}" if changed else ""))


def peak_source(precision: Precision) -> str:
    if precision.device.type == "cuda":
        return f"linear on {torch.cuda.get_device_name(precision.device)}"
    return f"linear on {torch.get_num_threads()} CPU threads"


def accumulate_gradients(model: nn.Module, batch: torch.Tensor, micro_batch_size: int,
                         precision: Precision, parallel: Parallel | None = None
                         ) -> torch.Tensor:
    """Forward and backward over ``batch`` [rows, seq_len + 1] in micro batches, leaving
    the mean gradient in ``.grad``. Returns the mean (loss, ce, aux, balance, z).

    The load-balance term is a statistic of whichever batch the router sees, so it is
    computed per micro batch; everything else matches one pass over the whole batch.
    Under ``parallel``, ``batch`` is this rank's share and the gradients are averaged
    over ranks after the last micro batch.
    """
    parallel = parallel or Parallel()
    micro = batch.to(precision.device, non_blocking=True).split(micro_batch_size)
    losses = torch.zeros(5, device=precision.device)
    for i, chunk in enumerate(micro):
        with parallel.gradient_sync(model, last=i == len(micro) - 1):
            with precision.autocast():
                out = model(chunk[:, :-1], targets=chunk[:, 1:])
            precision.scaler.scale(out.loss / len(micro)).backward()
        losses += torch.stack([out.loss, out.ce, out.aux, out.balance_loss,
                               out.z_loss]).detach().float()
    return losses / len(micro)


def train_step(model: nn.Module, optimizer: torch.optim.AdamW, batch: torch.Tensor,
               micro_batch_size: int, grad_clip: float, precision: Precision,
               parallel: Parallel | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step. Returns the step's (loss, ce, aux, balance, z, grad norm) and
    whether it was finite, both on the device, without waiting for it: a non-finite step
    is skipped by the fused kernel itself and leaves weights and optimizer state as they
    were. Under ``parallel`` the losses are the mean over ranks, so every rank logs and
    skips alike."""
    parallel = parallel or Parallel()
    losses = parallel.mean(accumulate_gradients(model, batch, micro_batch_size, precision,
                                                parallel))
    scaler = precision.scaler
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = parallel.full(nn.utils.clip_grad_norm_(
        params, grad_clip if grad_clip > 0 else math.inf, foreach=True))
    finite = torch.isfinite(losses[0])
    if scaler.is_enabled():
        scaler.step(optimizer)  # skips on its own when the scaled gradients overflowed
    else:
        finite = finite & torch.isfinite(grad_norm)
        optimizer.found_inf = (~finite).float()  # read by the fused AdamW kernel
        optimizer.step()
        del optimizer.found_inf
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return torch.cat([losses, grad_norm.reshape(1).float()]), finite


def _log_train(run: Run, log: RunLog, lr: float, flops: int, peak: float) -> None:
    window = run.window
    sums, finite, skipped, streak = (window.sums.tolist(), int(window.finite_steps),
                                     int(window.skipped_total), int(window.streak))
    seconds = max(time.perf_counter() - window.started, 1e-9)
    tokens_per_s = window.tokens_timed / seconds
    mean = [s / finite if finite else math.nan for s in sums]
    loss, ce, aux, balance, z, grad_norm = mean
    mfu = flops * tokens_per_s / peak
    run.last_loss = loss
    elapsed = run.elapsed()
    skipped_now = window.steps - finite
    log.info(f"step {run.step:>6}/{run.cfg.train.max_steps} | loss {loss:.4f} | ce {ce:.4f} | "
             f"aux {aux:.4f} | lr {lr:.2e} | {elapsed:7.1f}s | {tokens_per_s:,.0f} tok/s | "
             f"grad {grad_norm:.3f} | mfu {100 * mfu:.1f}%"
             + (f" | skipped {skipped_now} non-finite steps ({skipped} in all)"
                if skipped_now else ""))
    log.metrics({"step": run.step, "loss": loss, "ce": ce, "aux": aux, "lr": lr,
                 "tokens_per_s": tokens_per_s, "elapsed_s": elapsed, "grad_norm": grad_norm,
                 "mfu": mfu, "balance_loss": balance, "z_loss": z,
                 "tokens_seen": run.tokens_seen, "skipped_steps": skipped})
    window.reset()
    _raise_on_streak(run, streak)


def _check_streak(run: Run) -> None:
    """A read of one counter every ``MAX_NONFINITE_STREAK`` steps between log lines."""
    _raise_on_streak(run, int(run.window.streak))


def _raise_on_streak(run: Run, streak: int) -> None:
    if streak >= MAX_NONFINITE_STREAK:
        raise UserError(f"the loss was not finite for {streak} steps in a row (up to step "
                        f"{run.step}): lower train.lr ({run.cfg.train.lr:g}) or try "
                        "train.precision=fp32")


@torch.no_grad()
def _evaluate(run: Run, log: RunLog, batches: list[torch.Tensor]) -> bool:
    """Validation CE over the fixed batches, with expert usage; True when it is the best
    so far.

    Ranks take every ``world_size``-th batch and the sums are all-reduced. Under FSDP
    every forward is a collective, so a rank left without a batch in the last round
    runs the first one again and discards it.
    """
    model, device = run.model, run.precision.device
    rank, world = run.ranks.rank, run.ranks.world_size
    model.eval()
    cfg = run.cfg.model
    sums = torch.zeros(1 + cfg.num_layers * (cfg.num_experts + 1), dtype=torch.float64,
                       device=device)  # ce, expert counts, router entropy
    for index in range(rank, math.ceil(len(batches) / world) * world, world):
        batch = batches[index if index < len(batches) else 0].to(device, non_blocking=True)
        with run.precision.autocast():
            out = model(batch[:, :-1], targets=batch[:, 1:])
        if index < len(batches):
            sums += torch.cat([out.ce.reshape(1), out.expert_counts.flatten(),
                               out.router_entropy]).double()
    model.train()
    sums = run.parallel.sum(sums).cpu()
    val_ce = float(sums[0]) / len(batches)
    counts = sums[1:1 + cfg.num_layers * cfg.num_experts].view(cfg.num_layers, -1)
    usage = ExpertUsage.from_counts(counts, sums[-cfg.num_layers:] / len(batches))
    improved = math.isfinite(val_ce) and (run.best_val is None or val_ce < run.best_val)
    if improved:
        run.best_val = val_ce
    run.last_val = val_ce
    log.info(f"step {run.step:>6} | val ce {val_ce:.4f} (best {_fmt(run.best_val)}) | "
             f"{usage.summary()}")
    for warning in run.watch.update(usage):
        log.info(warning)
    log.metrics({"step": run.step, "val_ce": val_ce, "best_val_ce": run.best_val,
                 **usage.to_dict()})
    return improved


def _sample(run: Run, log: RunLog, tokenizer: Any) -> None:
    """A greedy continuation of a fixed prompt: the quickest read of what the model has
    learnt. Greedy draws no random numbers, so it leaves a resumed run's RNG untouched."""
    from .generation import generate, instruct_prompt

    prompt_text = instruct_prompt(SAMPLE_SUMMARY, SAMPLE_WORDS, SAMPLE_FEATURES)
    prompt = torch.tensor([tokenizer.encode(prompt_text)], device=run.precision.device)
    room = min(SAMPLE_TOKENS, run.cfg.model.max_position - prompt.shape[1])
    if room <= 0:
        return
    run.model.eval()  # on every rank: under FSDP each forward gathers from all of them
    ids = generate(run.model, prompt, max_new_tokens=room, temperature=0.0,
                   eos_id=tokenizer.eos_id)
    run.model.train()
    if not run.ranks.is_main:
        return
    text = tokenizer.decode(ids[0, prompt.shape[1]:].tolist()).split("<|endoftext|>")[0]
    log.info(f"sample at step {run.step} (greedy, after the prompt's Summary: "
             f"{SAMPLE_SUMMARY!r}):{text}")


def _save(run: Run, best: bool, latest: bool) -> None:
    state = run.state_dict()  # on every rank: under FSDP it gathers the shards
    if not run.ranks.is_main:
        return
    if best:
        atomic_save(state, run.out_dir / BEST)
    if latest:
        atomic_save(state, run.out_dir / LATEST)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def run_cli(args: argparse.Namespace) -> int:
    from .cli import load_config

    result = train(load_config(args), resume=args.resume, stop_after=args.stop_after)
    return 130 if result.interrupted else 0
